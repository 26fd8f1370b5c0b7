"""The serving layout of one compressed Linear: the input channels grouped by width, each group's codes
packed the way the Triton kernels read them, and the grid parameters they need.

Why a layout of its own: the packed checkpoint (format v1) stores each width's codes as one LSB-first bit
stream of the kept weights, which is compact but can only be read sequentially. A kernel wants, for each
width, a dense (rows x columns) block of codes it can tile, so here

* the columns of each width form a *bucket*; a bucket's columns are kept in ascending original order
  (so a bucket's group indices only ever increase along it);
* a bucket is cut into *units* of C codes that fill W 32-bit words exactly (C * bits == 32 * W):
    2 bits: 16 codes in 1 word      4 bits: 8 in 1      8 bits: 4 in 1
    3 bits: 32 codes in 3 words (10 per word in bits 0..29, codes 30-31 in the 3 x 2 spare top bits)
    6 bits: 16 codes in 3 words (5 per word in bits 0..29, code 15 in the 3 x 2 spare top bits)
  so every width costs its nominal bits, and 30 of every 32 three-bit codes (15 of 16 six-bit ones) are
  read with one mask of one word, like the power-of-two widths (see NOTES.md for why not bit planes);
* 16 consecutive units form a *panel* (the kernels' step along K). Word w of every unit is stored as its
  own plane, (units, rows) row-major -- output rows contiguous -- so a program's tile of one plane is 16
  runs of BLOCK_N consecutive words, read with 16-byte loads whose alignment the compiler can prove;
* inside a panel, slot c (the c-th code of each unit) of units 0..15 holds 16 *consecutive* bucket
  columns: position p = panel*16*C + c*16 + u in the permuted activation vector. A kernel therefore reads,
  for each slot, one code per (row, unit) from one word and 16 contiguous activations, and with groups of
  a multiple of 16 columns every slot of a uniform layer lies inside one group;
* pruned weights are codes like any other: their code is the zero point, which dequantizes to exactly 0.

Grid parameters: every width of a row (group) derives its grid from the same range (quant.QuantGrid), so the
layout stores the span (xmax - xmin) once per row (group) -- fp32 per row, fp16 per group -- and one fp32
factor per width, shrink_b / (2**b - 1) (the clip factor folded in): scale_b = span * factor_b. Zero points
are stored per row (group) and width as uint8 (asymmetric grids; symmetric ones use 2**(b-1)), taken from
quant.py's own rounding so that they are exactly the ones the codes were made with.

Memory (`predicted_bytes`, what the bits predict): codes at nominal width, rows * sum_b K_b * b / 8, plus the
spans (4 or 2 bytes per row and group) and zero points (1 byte per row, group and width, asymmetric only).
What is stored on top (`stored_bytes`): each bucket's last unit padded to C codes, the permutation (int16 per
position; int32 past 32767 positions) and, with groups, one group index per position (and per slot).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from quant import QuantGrid

WIDTHS = (2, 3, 4, 6, 8)  # the widths a layout may hold; their order is the kernels' bucket order (slot index)
PANEL_UNITS = 16  # units per panel: the K step of the kernels, and the length of a slot's activation run
META_FIELDS = 8  # int32 fields per width in the metadata table (see `ServingLayout.meta`)
# metadata fields per width (row = index of the width in WIDTHS); the last row holds the total cost in field 0
# and, in field 1, the bits of the float 2**23 (see kernel_common: read from memory, so that the compiler keeps
# it in a register and (w & mask) | magic is one 3-input logic instruction instead of two)
UNITS, PANELS, WORD_OFFSET, X_OFFSET, ZERO_OFFSET, COST_OFFSET, SLOT_OFFSET = range(7)
TOTAL_COST_ROW = len(WIDTHS)
MAGIC_BITS = 0x4B000000


@dataclass(frozen=True)
class WidthPacking:
    """How C codes of one width fill W 32-bit words: S per word at bits b*i (i < S), the remaining C - W*S
    ("spare") codes spread over the 32 - S*b top bits of each word, word 0 first."""

    bits: int
    codes_per_unit: int  # C
    words_per_unit: int  # W
    codes_per_word: int  # S

    @property
    def spares(self) -> int:
        return self.codes_per_unit - self.words_per_unit * self.codes_per_word

    @property
    def spare_bits_per_word(self) -> int:
        return 32 - self.codes_per_word * self.bits


PACKINGS: dict[int, WidthPacking] = {
    2: WidthPacking(2, 16, 1, 16),
    3: WidthPacking(3, 32, 3, 10),
    4: WidthPacking(4, 8, 1, 8),
    6: WidthPacking(6, 16, 3, 5),
    8: WidthPacking(8, 4, 1, 4),
}


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_units(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, units, C) integer codes -> (W, units, rows) int32 planes (see `WidthPacking`)."""
    spec = PACKINGS[bits]
    rows, units, per_unit = codes.shape
    if per_unit != spec.codes_per_unit:
        raise ValueError(f"{bits}-bit units hold {spec.codes_per_unit} codes, got {per_unit}")
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise ValueError(f"codes outside 0..{2 ** bits - 1} for {bits} bits")
    words = torch.zeros(spec.words_per_unit, rows, units, dtype=torch.int64, device=codes.device)
    for c in range(spec.words_per_unit * spec.codes_per_word):
        words[c // spec.codes_per_word] |= codes[:, :, c] << (bits * (c % spec.codes_per_word))
    for j in range(spec.spares):
        code = codes[:, :, spec.words_per_unit * spec.codes_per_word + j]
        for t in range(bits):  # bit t of spare j is bit j*bits + t of the words' spare bits, word 0 first
            stream = j * bits + t
            word, bit = divmod(stream, spec.spare_bits_per_word)
            words[word] |= ((code >> t) & 1) << (spec.codes_per_word * bits + bit)
    return _to_int32(words).transpose(1, 2).contiguous()


def unpack_units(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_units`: (W, units, rows) int32 -> (rows, units, C) int64 codes."""
    spec = PACKINGS[bits]
    words = planes.transpose(1, 2).to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*words.shape[1:], spec.codes_per_unit, dtype=torch.int64, device=planes.device)
    mask = (1 << bits) - 1
    for c in range(spec.words_per_unit * spec.codes_per_word):
        out[:, :, c] = (words[c // spec.codes_per_word] >> (bits * (c % spec.codes_per_word))) & mask
    for j in range(spec.spares):
        code = torch.zeros_like(out[:, :, 0])
        for t in range(bits):
            word, bit = divmod(j * bits + t, spec.spare_bits_per_word)
            code |= ((words[word] >> (spec.codes_per_word * bits + bit)) & 1) << t
        out[:, :, spec.words_per_unit * spec.codes_per_word + j] = code
    return out


def slot_positions(units: int, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(units, C) position of each code of a bucket in the bucket's stretch of the permuted activations:
    unit panel*16+u, code c -> panel*16*C + c*16 + u. Positions of a last, partial panel's missing units
    are never used (the activations there are holes, read as 0)."""
    per_unit = PACKINGS[bits].codes_per_unit
    unit = torch.arange(units, device=device)
    panel, u = unit // PANEL_UNITS, unit % PANEL_UNITS
    c = torch.arange(per_unit, device=device)
    return panel[:, None] * (PANEL_UNITS * per_unit) + c[None, :] * PANEL_UNITS + u[:, None]


@dataclass
class Bucket:
    """Where one width's data sits in a `ServingLayout` (host-side ints; the kernels read `meta`)."""

    bits: int
    columns: int  # K_b: original columns of this width
    units: int  # ceil(K_b / C)
    panels: int  # ceil(units / 16)
    word_offset: int  # first int32 of its planes in `codes`; plane w starts at word_offset + w * units * rows
    x_offset: int  # first position of its stretch of the permuted activations
    zero_offset: int  # first column of its zero points in `zeros`
    cost_offset: int  # its first panel's place in the split-K work order (one unit of cost = one plane panel)
    slot_offset: int  # first entry of its slots in `group_of_slot`

    @property
    def positions(self) -> int:
        return self.panels * PANEL_UNITS * PACKINGS[self.bits].codes_per_unit

    @property
    def cost(self) -> int:
        return self.panels * PACKINGS[self.bits].words_per_unit


GROUP_NONE, GROUP_PER_SLOT, GROUP_PER_POSITION = 0, 1, 2


@dataclass
class ServingLayout:
    """Everything a `QuantLinear` holds for one Linear (tensors on one device) and how to read it."""

    rows: int
    columns: int
    sym: bool
    groupsize: int  # columns per group; == columns when the grid is per row
    groups: int  # groups per row (1 when per row)
    buckets: list[Bucket]
    codes: torch.Tensor  # int32 (sum over buckets of W * rows * units,): the planes, bucket after bucket
    perm: torch.Tensor  # int16 (int32 past 32767 positions) (positions,): original column of each position, -1 = hole
    spans: torch.Tensor  # (rows, groups): xmax - xmin of each row (group); fp32 per row, fp16 per group
    factors: torch.Tensor  # fp32 (len(WIDTHS),): shrink_b / (2**b - 1) per width (0 where absent)
    zeros: torch.Tensor | None  # uint8 (rows, buckets * groups): zero points, None for symmetric grids
    group_of_position: torch.Tensor | None  # int16 (positions,): the group of each position's column (grouped only)
    group_of_slot: torch.Tensor | None  # int16 (sum of panels * C,): the group of each slot run, when each lies in one
    meta: torch.Tensor  # int32 (len(WIDTHS) + 1, META_FIELDS): per width UNITS, PANELS, ...; last row TOTAL_COST

    @property
    def positions(self) -> int:
        return int(self.perm.numel())

    @property
    def group_mode(self) -> int:
        """GROUP_NONE (one grid per row), GROUP_PER_SLOT (every slot run lies inside one group: the kernels
        load one scale per row and slot) or GROUP_PER_POSITION (a scale per row and position)."""
        if self.groups == 1:
            return GROUP_NONE
        return GROUP_PER_SLOT if self.group_of_slot is not None else GROUP_PER_POSITION

    @property
    def width_mask(self) -> int:
        """Bit i set when WIDTHS[i] has a bucket (the kernels' compile-time choice of bucket loops)."""
        return sum(1 << WIDTHS.index(b.bits) for b in self.buckets)

    @property
    def total_cost(self) -> int:
        return sum(b.cost for b in self.buckets)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"codes": self.codes, "perm": self.perm, "spans": self.spans, "factors": self.factors,
                "zeros": self.zeros, "group_of_position": self.group_of_position,
                "group_of_slot": self.group_of_slot, "meta": self.meta}

    def with_tensors(self, tensors: dict[str, torch.Tensor | None]) -> "ServingLayout":
        """The same layout over other tensors (a module's buffers after .to(device))."""
        return replace(self, **tensors)

    def to(self, device: torch.device | str) -> "ServingLayout":
        return self.with_tensors({k: None if t is None else t.to(device) for k, t in self.tensors().items()})

    def stored_bytes(self) -> int:
        """Bytes of every tensor the layout holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)

    def predicted_bytes(self) -> int:
        """What the bits predict: codes at nominal width plus spans and zero points (module docstring)."""
        return predicted_bytes(self.rows, {b.bits: b.columns for b in self.buckets}, self.groups, self.sym)

    def signature(self) -> dict[str, Any]:
        """What decides a kernel's speed, for the autotuning cache key."""
        return {"rows": self.rows, "columns": {b.bits: b.columns for b in self.buckets}, "groupsize": self.groupsize
                if self.groups > 1 else 0, "group_mode": self.group_mode, "sym": self.sym}


def predicted_bytes(rows: int, columns_by_width: dict[int, int], groups: int, sym: bool) -> int:
    """rows * (sum_b K_b * b / 8 + groups * span bytes + [asym] groups * widths * 1): see the module docstring."""
    code_bits = rows * sum(k * b for b, k in columns_by_width.items())
    span_bytes = rows * groups * (4 if groups == 1 else 2)
    zero_bytes = 0 if sym else rows * groups * len([k for k in columns_by_width.values() if k > 0])
    return math.ceil(code_bits / 8) + span_bytes + zero_bytes


def width_params(grid: QuantGrid, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (rows, groups), of width `bits` for every row (group): quant.py's own
    computation (column_params on a copy of the grid with one column per group)."""
    groups = grid.xmin.shape[1]
    per_group = replace(grid, groupsize=1)
    scale, zero, _ = per_group.column_params(0, groups, torch.full((groups,), bits, device=grid.xmin.device))
    return scale, zero


def build_layout(codes: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor | None, grid: QuantGrid,
                 device: torch.device | str | None = None) -> ServingLayout:
    """The serving layout of one Linear from what a compression produces.

    codes: (rows, columns) integer codes on `grid` (quant.QuantGrid.codes_of gives them; only kept ones are read);
    bits: (columns,) width of each input column, from WIDTHS; keep: (rows, columns) bool, False where the weight
    was pruned (None: all kept); grid: the Linear's QuantGrid (ranges, shrink factors, symmetry, group size).
    The layout is built where `codes` is (a GPU builds a large one in a fraction of a second) and then moved
    to `device` (default: stays there).
    """
    codes = codes.detach()
    work = codes.device
    rows, columns = codes.shape
    bits = bits.detach().to(work, torch.int64)
    if bits.shape != (columns,):
        raise ValueError(f"bits has shape {tuple(bits.shape)}, expected ({columns},)")
    present = sorted(set(bits.tolist()))
    if any(b not in WIDTHS for b in present):
        raise ValueError(f"widths {present}: the serving kernels handle {WIDTHS}")
    grid = replace(grid, xmin=grid.xmin.detach().to(work).float(), xmax=grid.xmax.detach().to(work).float(),
                   row_scale=None if grid.row_scale is None else grid.row_scale.detach().to(work).float())
    groups = grid.xmin.shape[1]
    if grid.xmin.shape[0] != rows or groups != -(-columns // grid.groupsize):
        raise ValueError(f"grid ranges {tuple(grid.xmin.shape)} do not fit {rows}x{columns} with groupsize "
                         f"{grid.groupsize}")
    if keep is not None:
        keep = keep.detach().to(work).bool()
    group_of_column = torch.arange(columns, device=work) // grid.groupsize

    # span per row (group): every width's scale is span * shrink_b / maxq_b (quant.grid_params)
    span = grid.xmax - grid.xmin
    if grid.row_scale is not None:
        span = span * grid.row_scale
    spans = span.float() if groups == 1 else span.to(torch.float16)
    factors = torch.zeros(len(WIDTHS), dtype=torch.float32, device=work)

    planes, perm_parts, gpos_parts, gslot_parts, zero_parts = [], [], [], [], []
    buckets: list[Bucket] = []
    word_offset = x_offset = cost_offset = slot_offset = 0
    slot_aligned = groups > 1
    for b in present:
        spec = PACKINGS[b]
        cols = (bits == b).nonzero().squeeze(1)  # ascending original order
        k_b = cols.numel()
        units = -(-k_b // spec.codes_per_unit)
        panels = -(-units // PANEL_UNITS)
        factors[WIDTHS.index(b)] = grid.shrink.get(b, 1.0) / (2 ** b - 1)

        _, zero = width_params(grid, b)  # (rows, groups), integer valued
        q = codes[:, cols].to(torch.int64)
        zero_cols = zero[:, group_of_column[cols]].round().to(torch.int64)
        if keep is not None:  # a pruned weight is its zero point's code: it dequantizes to exactly 0
            q = torch.where(keep[:, cols], q, zero_cols)
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** b):
            raise ValueError(f"codes of the {b}-bit columns outside 0..{2 ** b - 1}")

        # positions of the units' codes, in ascending position order: the first k_b take the columns
        pos = slot_positions(units, b, work)  # (units, C)
        order = pos.flatten().argsort()
        unit_codes = torch.zeros(rows, units * spec.codes_per_unit, dtype=torch.int64, device=work)
        unit_codes[:, order[:k_b]] = q
        planes.append(pack_units(unit_codes.view(rows, units, spec.codes_per_unit), b).flatten())

        n_positions = panels * PANEL_UNITS * spec.codes_per_unit
        perm = torch.full((n_positions,), -1, dtype=torch.int64, device=work)
        perm[pos.flatten()[order[:k_b]]] = cols
        perm_parts.append(perm)
        if groups > 1:
            gpos = torch.zeros(n_positions, dtype=torch.int64, device=work)
            gpos[pos.flatten()[order[:k_b]]] = group_of_column[cols]
            # slots (panel, c): the positions panel*16*C + c*16 + [0, 16); aligned if their valid ones share a group
            slot_groups = gpos.view(panels * spec.codes_per_unit, PANEL_UNITS)
            valid = perm.view(panels * spec.codes_per_unit, PANEL_UNITS) >= 0
            first = torch.where(valid, slot_groups, torch.iinfo(torch.int64).max).min(1).values
            last = torch.where(valid, slot_groups, -1).max(1).values
            slot_aligned &= bool(((first == last) | ~valid.any(1)).all())
            # a slot with no column reads group 0 (its activations are 0)
            gslot_parts.append(torch.where(valid.any(1), first, 0))
            gpos_parts.append(gpos)
        if not grid.sym:
            zero_parts.append(zero.round().to(torch.uint8))

        zero_offset = 0 if grid.sym else len(buckets) * groups
        buckets.append(Bucket(b, k_b, units, panels, word_offset, x_offset, zero_offset, cost_offset, slot_offset))
        word_offset += spec.words_per_unit * rows * units
        x_offset += n_positions
        cost_offset += panels * spec.words_per_unit
        slot_offset += panels * spec.codes_per_unit

    index_dtype = torch.int16 if x_offset < 2 ** 15 and groups < 2 ** 15 else torch.int32
    meta = torch.zeros(len(WIDTHS) + 1, META_FIELDS, dtype=torch.int32)
    for bucket in buckets:
        meta[WIDTHS.index(bucket.bits), [UNITS, PANELS, WORD_OFFSET, X_OFFSET, ZERO_OFFSET, COST_OFFSET,
                                         SLOT_OFFSET]] = torch.tensor(
            [bucket.units, bucket.panels, bucket.word_offset, bucket.x_offset, bucket.zero_offset,
             bucket.cost_offset, bucket.slot_offset], dtype=torch.int32)
    meta[TOTAL_COST_ROW, 0] = cost_offset
    meta[TOTAL_COST_ROW, 1] = MAGIC_BITS
    if word_offset >= 2 ** 31:
        raise ValueError(f"{word_offset} code words do not fit the kernels' int32 offsets")
    layout = ServingLayout(
        rows=rows, columns=columns, sym=grid.sym, groupsize=grid.groupsize, groups=groups, buckets=buckets,
        codes=torch.cat(planes) if planes else torch.zeros(0, dtype=torch.int32, device=work),
        perm=torch.cat(perm_parts).to(index_dtype),
        spans=spans.contiguous(),
        factors=factors,
        zeros=None if grid.sym else torch.cat(zero_parts, 1).contiguous(),
        group_of_position=torch.cat(gpos_parts).to(index_dtype) if groups > 1 else None,
        group_of_slot=torch.cat(gslot_parts).to(index_dtype) if groups > 1 and slot_aligned else None,
        meta=meta.to(work),
    )
    return layout if device is None else layout.to(device)


# ---------------------------------------------------------------- reading it back (CPU fallback, tests)


def position_codes(layout: ServingLayout) -> torch.Tensor:
    """(rows, positions) int64: the code at each position of the permuted activations (holes: 0)."""
    out = torch.zeros(layout.rows, layout.positions, dtype=torch.int64, device=layout.codes.device)
    for bucket in layout.buckets:
        spec = PACKINGS[bucket.bits]
        size = spec.words_per_unit * layout.rows * bucket.units
        planes = layout.codes[bucket.word_offset:bucket.word_offset + size].view(
            spec.words_per_unit, bucket.units, layout.rows)
        unit_codes = unpack_units(planes, bucket.bits)  # (rows, units, C)
        pos = slot_positions(bucket.units, bucket.bits, out.device) + bucket.x_offset
        out[:, pos.flatten()] = unit_codes.flatten(1)
    return out


def position_grid(layout: ServingLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (rows, positions) fp32, of every position, as the kernels compute them."""
    device = layout.codes.device
    scale = torch.zeros(layout.rows, layout.positions, device=device)
    zero = torch.zeros(layout.rows, layout.positions, device=device)
    for index, bucket in enumerate(layout.buckets):
        stretch = slice(bucket.x_offset, bucket.x_offset + bucket.positions)
        if layout.groups == 1:
            group = torch.zeros(bucket.positions, dtype=torch.int64, device=device)
        else:
            group = layout.group_of_position[stretch].to(torch.int64)
        factor = layout.factors[WIDTHS.index(bucket.bits)]
        scale[:, stretch] = layout.spans.float()[:, group] * factor
        if layout.zeros is None:
            zero[:, stretch] = float(2 ** (bucket.bits - 1))
        else:
            zero[:, stretch] = layout.zeros[:, bucket.zero_offset + group].float()
    return scale, zero


def dequantized_positions(layout: ServingLayout) -> torch.Tensor:
    """(rows, positions) fp32: the weight at each position of the permuted activations (holes: 0).
    What the CPU fallback multiplies with; the columns of the original weight are `perm`'s."""
    scale, zero = position_grid(layout)
    w = scale * (position_codes(layout).float() - zero)
    return torch.where(layout.perm.to(torch.int64)[None, :] >= 0, w, 0.0)


def dequantized_weight(layout: ServingLayout) -> torch.Tensor:
    """(rows, columns) fp32 weight in the original column order (inverse of the permutation)."""
    w = dequantized_positions(layout)
    perm = layout.perm.to(torch.int64)
    valid = perm >= 0
    out = torch.zeros(layout.rows, layout.columns, device=w.device)
    out[:, perm[valid]] = w[:, valid]
    return out


def permute_activations(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x[..., perm] with holes (perm == -1) read as 0: the activations in the layout's order."""
    x_pad = torch.nn.functional.pad(x, (0, 1))
    index = torch.where(perm >= 0, perm.to(torch.int64), x.shape[-1])
    return x_pad.index_select(-1, index)

"""Uniform integer quantization grids for weight matrices.

One grid per row (or per group of columns within a row), as in GPTQ: the scale and zero
point come from the range [min(w, 0), max(w, 0)] of that row. Every bit-width derives its
scale/zero from the same range, so a layer whose columns use different widths stores one
range per row (group) -- no more than a uniform layer -- plus the per-column bit map.

A width may shrink that range by one factor per layer (`QuantGrid.shrink`): at 2-3 bits the
min-max grid spends its few levels on rare extremes, and a clipped one loses far less. The
factor is one number per width and layer, so it costs next to nothing to store.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

MAX_WIDTH = 16

def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """The integer code q in {0..maxq} of each value (what a packed checkpoint stores)."""
    return torch.clamp(torch.round(x / scale) + zero, torch.zeros_like(maxq), maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The value of code q on the grid scale * (q - zero)."""
    return scale * (q - zero)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Round x to the nearest point of its grid (the dequantized value)."""
    return dequantize(codes(x, scale, zero, maxq), scale, zero)


def weight_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row range (xmin, xmax) of a 2-D weight slice, always containing 0.

    Zero must be representable so that pruned weights stay exactly zero after quantization.
    Symmetric grids mirror the larger side; an all-zero row gets [-1, 1] to avoid a zero scale.
    """
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(1)[0], zeros)
    xmax = torch.maximum(w.max(1)[0], zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    return xmin, xmax


def grid_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32) and zero point of a (2**bits)-level grid over [xmin, xmax]; broadcasts over maxq."""
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.zeros_like(scale) + (maxq + 1) / 2
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


@dataclass
class QuantGrid:
    """Where the per-row grids of one weight matrix come from.

    `xmin`/`xmax` have shape (rows, ngroups); column j uses group j // groupsize. Ungrouped
    grids (groupsize = columns) are fixed from the dense weights before solving; grouped ones
    are filled in by the solver from the error-updated weights when it reaches each group,
    exactly as GPTQ does.
    """

    sym: bool
    groupsize: int
    xmin: torch.Tensor
    xmax: torch.Tensor
    shrink: dict[int, float] = field(default_factory=dict)  # width -> factor on the range; absent = 1
    row_scale: torch.Tensor | None = None  # (rows, 1) factor on each row's ranges: copies of rows on scaled grids
    row_bits: torch.Tensor | None = None  # (rows, 1) each row's width, in place of the columns': copies at other widths

    @classmethod
    def for_weight(cls, w: torch.Tensor, sym: bool, groupsize: int = 0, shrink: dict[int, float] | None = None
                   ) -> "QuantGrid":
        rows, columns = w.shape
        shrink = dict(shrink or {})
        if groupsize <= 0 or groupsize >= columns:
            xmin, xmax = weight_range(w, sym)
            return cls(sym, columns, xmin[:, None], xmax[:, None], shrink)
        ngroups = -(-columns // groupsize)
        empty = torch.zeros(rows, ngroups, device=w.device)
        return cls(sym, groupsize, empty, empty.clone(), shrink)

    @property
    def grouped(self) -> bool:
        return self.xmin.shape[1] > 1

    def fill_groups(self, w: torch.Tensor, start: int, stop: int) -> None:
        """Set the ranges of the groups that begin in columns [start, stop) of the current weights."""
        if not self.grouped:
            return
        first = -(-start // self.groupsize) * self.groupsize
        for g0 in range(first, stop, self.groupsize):
            g = g0 // self.groupsize
            self.xmin[:, g], self.xmax[:, g] = weight_range(w[:, g0:g0 + self.groupsize], self.sym)

    def column_params(self, start: int, stop: int, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale, zero (rows, stop-start) and maxq (stop-start,) for columns [start, stop) at widths `bits`; with
        `row_bits`, at each row's width instead, and maxq (rows, stop-start).

        The columns of a span share a few (group, width) pairs: the parameters are computed once per pair, on
        (rows, pairs), and gathered per column (the same values as computing each column's, at a fraction of the
        work: a solve asks for spans of up to 1,024 columns, and the clip search stacks thousands of rows)."""
        device = self.xmin.device
        first, last = start // self.groupsize, -(-stop // self.groupsize)  # the groups the span touches
        group = torch.arange(start, stop, device=device) // self.groupsize
        xmin, xmax = self.xmin[:, first:last], self.xmax[:, first:last]
        if self.row_bits is not None:  # (rows, 1): one width per row
            widths, column_pair = self.row_bits.to(device, torch.int64), group - first
        else:
            every = MAX_WIDTH + 1  # pair p: group first + p // every at width p % every (no device sync)
            widths = torch.arange(every, device=device).repeat(xmin.shape[1])[None, :]
            xmin, xmax = xmin.repeat_interleave(every, 1), xmax.repeat_interleave(every, 1)
            column_pair = (group - first) * every + bits.to(device, torch.int64)
        maxq = (2 ** widths - 1).float()
        if self.shrink:
            factor = torch.tensor([self.shrink.get(b, 1.0) for b in range(MAX_WIDTH + 1)], device=device)
            xmin, xmax = xmin * factor[widths], xmax * factor[widths]
        if self.row_scale is not None:
            xmin, xmax = xmin * self.row_scale, xmax * self.row_scale
        scale, zero = grid_params(xmin, xmax, maxq, self.sym)
        if self.row_bits is not None and last - first == 1:  # one pair per row: every column's view of it
            return scale.expand(-1, stop - start), zero.expand(-1, stop - start), maxq.expand(-1, stop - start)
        scale, zero = scale[:, column_pair], zero[:, column_pair]
        if self.row_bits is not None:
            return scale, zero, maxq.expand(-1, stop - start)
        return scale, zero, maxq[0, column_pair]

    def round_at(self, w: torch.Tensor, width: int, shrink: float = 1.0) -> torch.Tensor:
        """Every value of w to the nearest point of its grid at one width, the range scaled by `shrink`:
        `round` with the grid parameters computed per group instead of per column, for the error model,
        which rounds whole matrices at one width many times."""
        maxq = torch.tensor(float(2 ** width - 1), device=self.xmin.device)
        scale, zero = grid_params(self.xmin * shrink, self.xmax * shrink, maxq, self.sym)
        if self.grouped:
            group = torch.arange(w.shape[1], device=self.xmin.device) // self.groupsize
            scale, zero = scale[:, group], zero[:, group]
        return quantize(w, scale, zero, maxq)

    def codes_of(self, w: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero) of the values w (rows, columns) on this grid, computed where w lives
        (an exporter gets weights moved to the CPU and grids left on the GPU)."""
        grid = replace(self, xmin=self.xmin.to(w.device).float(), xmax=self.xmax.to(w.device).float())
        scale, zero, maxq = grid.column_params(0, w.shape[1], bits)
        return codes(w, scale, zero, maxq), scale, zero

    @classmethod
    def rounding(cls, w: torch.Tensor, sym: bool, groupsize: int = 0, shrink: dict[int, float] | None = None
                 ) -> "QuantGrid":
        """The grid that round-to-nearest uses: every range (groups too) from `w` itself."""
        grid = cls.for_weight(w, sym, groupsize, shrink)
        grid.fill_groups(w, 0, w.shape[1])
        return grid

    def round(self, w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Each value of w to the nearest point of its column's grid."""
        return quantize(w, *self.column_params(0, w.shape[1], bits))


def round_to_nearest(w: torch.Tensor, bits: int, sym: bool, groupsize: int = 0) -> torch.Tensor:
    """Round-to-nearest baseline (GPTQ's `--nearest`): each value to its row's (group's) grid."""
    w = w.float()
    return QuantGrid.rounding(w, sym, groupsize).round(w, torch.full((w.shape[1],), bits))

"""Packed export of a compressed OPT: the real on-disk form whose size `storage_bits` predicts.

A directory written by `export_compressed` holds

    config.json           model.config
    packed.safetensors    per quantized Linear NAME (the header's metadata holds the format version and each
                          layer's layout: shape, dtype, sym, groupsize, widths, code counts):
        NAME.codes.B      uint8: codes of the kept weights of the columns of width B, B bits each, row-major
        NAME.bitmap       uint8: each column's index into the layer's widths, `index_bits` each (mixed widths only)
        NAME.mask         uint8: 1 bit per weight, set where the weight is nonzero (pruned models only)
        NAME.xmin, .xmax  float32 (rows, groups): the ranges every width derives its scale and zero from
        NAME.shrink       float32: the range factor of each clipped width (layout `shrink_widths`), if any
    dense.safetensors     every other tensor at its own dtype (embeddings, norms, biases, unquantized Linears)
    compression.json      the run's config and results, and the tokenizer's files (what `write_extras` writes)

Streams are LSB first: value i occupies bits [i*B, (i+1)*B) of the stream, and bit k of byte j is bit 8*j + k.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import safe_open

from mixed.stats import storage_bits
from quant import MAX_WIDTH, QuantGrid, dequantize
from systems.atomic_io import atomic_directory

if TYPE_CHECKING:
    from transformers import OPTForCausalLM

FORMAT = "opt-enhanced-packed"
VERSION = 1
PACKED, DENSE, CONFIG, EXTRA = "packed.safetensors", "dense.safetensors", "config.json", "compression.json"


# ---------------------------------------------------------------- bit streams


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """The low `width` bits of each value of a 1-D tensor, LSB first, 8 to a byte, last byte zero-padded.

    One (n, width) bit matrix instead of a loop over values; it stays uint8 while the width fits a byte,
    so packing n values costs n * width bytes of scratch."""
    dtype = torch.uint8 if width <= 8 else torch.int32
    shifts = torch.arange(width, dtype=dtype, device=values.device)
    bits = ((values.to(dtype)[:, None] >> shifts) & 1).to(torch.uint8).flatten()
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(1, dtype=torch.uint8)


def unpack_bits(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values of `width` bits each, as int64."""
    if stream.numel() != -(-count * width // 8):
        raise ValueError(f"packed stream has {stream.numel()} bytes, expected {-(-count * width // 8)} "
                         f"for {count} values of {width} bits (corrupt file?)")
    bits = (stream[:, None] >> torch.arange(8, dtype=torch.uint8, device=stream.device)) & 1
    bits = bits.flatten()[: count * width].view(count, width).to(torch.int32)
    return (bits << torch.arange(width, dtype=torch.int32, device=stream.device)).sum(1)


# ---------------------------------------------------------------- one Linear


def index_bits(n_options: int) -> int:
    """Width of one bit-map entry, as `storage_bits` counts it."""
    return max(1, math.ceil(math.log2(n_options)))


def pack_linear(name: str, weight: torch.Tensor, grid: QuantGrid, bits: torch.Tensor, pruned: bool,
                n_options: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The packed tensors of one quantized weight and its layout (JSON-able).

    Codes are recomputed from the final weights rather than kept from the solver, then checked: the
    file must rebuild exactly the weights that were evaluated, so a grid that disagrees with them is an error."""
    W = weight.detach().float()
    rows, columns = W.shape
    bits = bits.to(W.device, torch.int64)
    ngroups = -(-columns // grid.groupsize)
    if bits.shape != (columns,) or grid.xmin.shape != (rows, ngroups) or grid.xmax.shape != (rows, ngroups):
        raise ValueError(f"{name}: bits {tuple(bits.shape)} / grid {tuple(grid.xmin.shape)} do not fit weight "
                         f"{rows}x{columns} with groupsize {grid.groupsize}")
    widths = sorted(set(bits.tolist()))
    if widths[0] < 1 or widths[-1] > MAX_WIDTH:
        raise ValueError(f"{name}: widths {widths} outside 1..{MAX_WIDTH}")
    q, scale, zero = grid.codes_of(W, bits)
    keep = W != 0 if pruned else torch.ones_like(W, dtype=torch.bool)
    rebuilt = torch.where(keep, dequantize(q, scale, zero), 0.0).to(weight.dtype)
    if not torch.equal(rebuilt, weight.detach()):
        bad = rebuilt != weight.detach()
        raise ValueError(f"{name}: {int(bad.sum())} of {W.numel()} weights are not on their quantization grid "
                         f"(the grid and the weights disagree: model changed after compress(), or wrong grids?)")
    q = q.to(torch.int64)

    tensors = {f"{name}.xmin": grid.xmin.cpu().contiguous(), f"{name}.xmax": grid.xmax.cpu().contiguous()}
    if pruned:
        tensors[f"{name}.mask"] = pack_bits(keep.flatten(), 1).cpu()
    layout: dict[str, Any] = dict(rows=rows, columns=columns, dtype=str(weight.dtype).removeprefix("torch."),
                                  sym=grid.sym, groupsize=grid.groupsize, pruned=pruned, widths=widths, counts=[],
                                  shrink_widths=sorted(grid.shrink))
    if grid.shrink:
        tensors[f"{name}.shrink"] = torch.tensor([grid.shrink[b] for b in layout["shrink_widths"]], dtype=torch.float32)
    if len(widths) > 1:
        layout["index_bits"] = index_bits(n_options)
        if len(widths) > 2 ** layout["index_bits"]:
            raise ValueError(f"{name}: {len(widths)} distinct widths do not fit n_options={n_options}")
        index = torch.searchsorted(torch.tensor(widths, device=bits.device), bits)
        tensors[f"{name}.bitmap"] = pack_bits(index, layout["index_bits"]).cpu()
    for b in widths:
        cols = (bits == b).nonzero().squeeze(1)
        kept = q[:, cols][keep[:, cols]]
        tensors[f"{name}.codes.{b}"] = pack_bits(kept, b).cpu()
        layout["counts"].append(kept.numel())
    return tensors, layout


@dataclass
class PackedLinear:
    """One Linear as the packed file holds it: each weight's integer code (pruned weights 0), each column's width,
    the keep mask (None: nothing pruned), the grid the codes are on, and the weight's dtype."""

    codes: torch.Tensor  # (rows, columns) int64
    bits: torch.Tensor  # (columns,) int64
    keep: torch.Tensor | None  # (rows, columns) bool
    grid: QuantGrid
    dtype: torch.dtype

    def weight(self) -> torch.Tensor:
        """The dequantized weight, exactly the one `pack_linear` checked it rebuilds."""
        scale, zero, _ = self.grid.column_params(0, self.codes.shape[1], self.bits)
        w = dequantize(self.codes.float(), scale, zero)
        return (w if self.keep is None else torch.where(self.keep, w, 0.0)).to(self.dtype)


def read_linear(f, name: str, layout: dict[str, Any]) -> PackedLinear:
    """One Linear from its packed tensors in the open file `f` (inverse of `pack_linear`)."""
    rows, columns, widths = layout["rows"], layout["columns"], layout["widths"]
    if len(widths) > 1:
        index = unpack_bits(f.get_tensor(f"{name}.bitmap"), layout["index_bits"], columns)
        bits = torch.tensor(widths)[index]
    else:
        bits = torch.full((columns,), widths[0])
    keep = None
    if layout["pruned"]:
        keep = unpack_bits(f.get_tensor(f"{name}.mask"), 1, rows * columns).view(rows, columns).bool()
    codes = torch.zeros(rows, columns, dtype=torch.int64)
    for b, count in zip(widths, layout["counts"]):
        cols = (bits == b).nonzero().squeeze(1)
        sub_keep = keep[:, cols] if keep is not None else torch.ones(rows, len(cols), dtype=torch.bool)
        if int(sub_keep.sum()) != count:
            raise ValueError(f"{name}: mask keeps {int(sub_keep.sum())} weights of width {b}, stream holds {count}")
        sub = torch.zeros(rows, len(cols), dtype=torch.int64)
        sub[sub_keep] = unpack_bits(f.get_tensor(f"{name}.codes.{b}"), b, count).to(torch.int64)
        codes[:, cols] = sub
    clipped = layout.get("shrink_widths", [])
    shrink = dict(zip(clipped, f.get_tensor(f"{name}.shrink").tolist())) if clipped else {}
    grid = QuantGrid(layout["sym"], layout["groupsize"], f.get_tensor(f"{name}.xmin"), f.get_tensor(f"{name}.xmax"),
                     shrink)
    return PackedLinear(codes, bits.to(torch.int64), keep, grid, getattr(torch, layout["dtype"]))


# ---------------------------------------------------------------- the model


@dataclass
class ExportReport:
    """Sizes in bytes of what `export_compressed` wrote, against the `storage_bits` prediction."""

    packed_bytes: int  # packed.safetensors on disk: payload + safetensors header (names, offsets, layouts)
    packed_payload_bytes: int  # its tensors alone: what storage_bits models, up to byte padding
    other_bytes: int  # dense.safetensors on disk
    total_bytes: int  # every file written, JSON included
    fp16_bytes: int  # all parameters of the model at 2 bytes each (tied ones once)
    predicted_bytes: float  # sum of storage_bits / 8 over the quantized Linears
    layers: int  # quantized Linears packed

    def summary(self) -> str:
        mib, ratio = 2 ** 20, self.packed_bytes / max(self.predicted_bytes, 1)
        return (f"packed Linears {self.packed_bytes / mib:.3f} MiB measured vs {self.predicted_bytes / mib:.3f} MiB "
                f"predicted ({ratio:.4f}x); total {self.total_bytes / mib:.3f} MiB "
                f"vs fp16 {self.fp16_bytes / mib:.3f} MiB ({self.fp16_bytes / self.total_bytes:.2f}x smaller)")


def write_run_record(directory: str, record: dict[str, Any]) -> None:
    """The run's config and results as compression.json in an export directory being written.
    default=str: a stray tuple or Path in them must not lose the export."""
    with open(os.path.join(directory, EXTRA), "w") as f:
        json.dump(record, f, indent=1, default=str)


def dense_tensors(model: nn.Module, packed: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every state_dict tensor but the packed weights. A tensor tied to another (OPT's lm_head and token
    embedding) is stored once and its other name kept as an alias: safetensors refuses shared storage."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key in packed:
            first.setdefault(ident, key)
        elif t.numel() and ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
            tensors[key] = t.detach().cpu().contiguous()
    return tensors, aliases


def export_compressed(model: nn.Module, grids: dict[str, QuantGrid], bits: dict[str, torch.Tensor], directory: str,
                      pruned: bool, n_options: int, write_extras: Callable[[str], None] | None = None
                      ) -> ExportReport:
    """Write `model` (after `compress`) to a new `directory` in the packed format, atomically.

    `grids`/`bits` are `Compressed.grids`/`.bits`, `pruned` whether sparsity was applied, `n_options` the
    number of allowed widths (the bit-map entry width); `write_extras(tmp)` adds the caller's files (the
    tokenizer, the run record). Everything lands in a temporary directory beside `directory` that is renamed
    at the end, so a failure never leaves a partial export behind."""
    if set(grids) != set(bits):
        raise ValueError("grids and bits must name the same Linears")
    with atomic_directory(directory, prefix=".export-") as tmp:
        packed: dict[str, torch.Tensor] = {}
        layouts: dict[str, Any] = {}
        predicted = 0
        with torch.no_grad():
            for name in sorted(grids):
                weight = model.get_submodule(name).weight
                tensors, layouts[name] = pack_linear(name, weight, grids[name], bits[name], pruned, n_options)
                packed.update(tensors)
                groups = grids[name].xmin.shape[1]
                kept = (weight != 0).sum(0) if pruned else torch.full((weight.shape[1],), weight.shape[0])
                predicted += storage_bits(weight.shape[0], kept, bits[name], groups, pruned, n_options,
                                          len(grids[name].shrink))
        dense, aliases = dense_tensors(model, {f"{name}.weight" for name in grids})
        header = {"format": FORMAT, "version": str(VERSION), "layers": json.dumps(layouts)}
        safetensors.torch.save_file(packed, os.path.join(tmp, PACKED), metadata=header)
        safetensors.torch.save_file(dense, os.path.join(tmp, DENSE),
                                    metadata={"format": FORMAT, "version": str(VERSION), "aliases": json.dumps(aliases)})
        model.config.save_pretrained(tmp)  # config.json
        if write_extras is not None:  # inside the temporary directory, so the rename publishes them with the rest
            write_extras(tmp)
        size = lambda f: os.path.getsize(os.path.join(tmp, f))
        report = ExportReport(
            packed_bytes=size(PACKED),
            packed_payload_bytes=sum(t.numel() * t.element_size() for t in packed.values()),
            other_bytes=size(DENSE),
            total_bytes=sum(size(f) for f in os.listdir(tmp)),
            fp16_bytes=2 * sum(p.numel() for p in model.parameters()),
            predicted_bytes=predicted / 8,
            layers=len(grids),
        )
    return report


def _damaged(path: str, what: str) -> ValueError:
    return ValueError(f"{path} is damaged ({what}): export the model again")


def open_export_file(path: str):
    """safe_open on one of an export's files, a damaged or truncated one reported as ValueError naming it (safetensors
    raises its own SafetensorError, which says neither which file nor what to do)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: the export is incomplete; export the model again")
    try:
        return safe_open(path, "pt")
    except Exception as e:  # SafetensorError (truncated, bad header), OSError
        raise _damaged(path, " ".join(str(e).split())[:200]) from None


def check_export(directory: str) -> None:
    """ValueError naming the file when a packed export cannot be what `export_compressed` wrote, from the headers
    alone (no tensor is read): a missing, truncated or damaged safetensors file, a layout that does not parse, a
    stream or range tensor missing or of another length than its layout gives."""
    path = os.path.join(directory, PACKED)
    with open_export_file(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            return  # load_compressed says what it is not
        try:
            layouts = json.loads(meta["layers"])
        except (KeyError, ValueError) as e:
            raise _damaged(path, f"its header's layer layouts do not parse: {e}") from None
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        for name, layout in layouts.items():
            try:
                expected = packed_shapes(name, layout)
            except (KeyError, TypeError, ValueError) as e:
                raise _damaged(path, f"the layout of {name} is incomplete: {e}") from None
            for key, shape in expected.items():
                if key not in shapes:
                    raise _damaged(path, f"{key} is missing")
                if shapes[key] != shape:
                    raise _damaged(path, f"{key} has shape {list(shapes[key])}, its layout gives {list(shape)}")
    with open_export_file(os.path.join(directory, DENSE)):
        pass


def packed_shapes(name: str, layout: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor `pack_linear` writes for one Linear of this layout."""
    rows, columns, widths = int(layout["rows"]), int(layout["columns"]), list(layout["widths"])
    groups = -(-columns // int(layout["groupsize"])) if int(layout["groupsize"]) > 0 else 1
    stream = lambda count, width: (-(-count * width // 8),)
    shapes = {f"{name}.xmin": (rows, groups), f"{name}.xmax": (rows, groups)}
    if layout["pruned"]:
        shapes[f"{name}.mask"] = stream(rows * columns, 1)
    if layout.get("shrink_widths"):
        shapes[f"{name}.shrink"] = (len(layout["shrink_widths"]),)
    if len(widths) > 1:
        shapes[f"{name}.bitmap"] = stream(columns, int(layout["index_bits"]))
    if len(layout["counts"]) != len(widths):
        raise ValueError(f"{len(widths)} widths but {len(layout['counts'])} code counts")
    for b, count in zip(widths, layout["counts"]):
        shapes[f"{name}.codes.{b}"] = stream(int(count), int(b))
    return shapes


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While the block runs, every parameter a module registers moves to the meta device (no memory, no
    initialisation), and buffers are made where their module makes them.

    Why not `with torch.device("meta")`: that puts the buffers there too, and the non-persistent ones (the
    rotary embedding's inv_freq of Llama, Mistral and Qwen2) are in no checkpoint, so nothing would ever fill
    them: the model would fail at its first forward ("Cannot copy out of meta tensor"). Computed by their
    module's __init__, as from_pretrained computes them, they hold the values the run evaluated with."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config) -> nn.Module:
    """The causal LM of `config` with its parameters on the meta device, to be filled by `load_state_dict(...,
    assign=True)`, and its buffers computed (`parameters_on_meta`)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config)


def left_on_meta(model: nn.Module) -> list[str]:
    """The parameters and buffers of `model` that hold no data (still on the meta device)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in tensors if t.device.type == "meta"]


def load_compressed(directory: str, device: torch.device | str | None = None) -> "OPTForCausalLM":
    """The model `export_compressed` wrote, its compressed Linears as serving.QuantLinear modules that hold the
    codes in the serving layout (never a float copy of the weights, on any device): on CUDA they run the Triton
    kernels, on the CPU a fallback that dequantizes per call. Every other tensor comes from the files but the
    non-persistent buffers, which the model computes (`skeleton`). `device`: where the modules are built (the
    CPU by default; `.to()` moves them later)."""
    from transformers import AutoConfig

    from serving.qlinear import QuantLinear

    check_export(directory)
    with open_export_file(os.path.join(directory, PACKED)) as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) > VERSION:
        raise ValueError(f"{directory}: not a {FORMAT} v{VERSION} export (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    with open_export_file(os.path.join(directory, DENSE)) as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    for alias, source in aliases.items():
        state[alias] = state[source]
    model = skeleton(AutoConfig.from_pretrained(directory))
    with open_export_file(os.path.join(directory, PACKED)) as f:
        for name, layout in json.loads(meta["layers"]).items():
            linear = read_linear(f, name, layout)
            bias = state.pop(f"{name}.bias", None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantLinear.from_codes(linear.codes, linear.bits, linear.keep, linear.grid,
                                           None if bias is None else bias.to(linear.dtype), device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    packed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    missing = [k for k in missing if k.rpartition(".")[0] not in packed]  # a QuantLinear holds its own buffers
    if missing or unexpected:
        raise ValueError(f"{directory}: the export's tensors do not fit its config ({len(missing)} missing: "
                         f"{', '.join(missing[:3])}; {len(unexpected)} unexpected: {', '.join(unexpected[:3])})")
    model.tie_weights()  # assign=True gives tied names separate Parameters; make them one again
    empty = left_on_meta(model)
    if empty:
        raise ValueError(f"{directory}: the export holds no values for {', '.join(empty[:3])}"
                         f"{', ...' if len(empty) > 3 else ''}; export the model again")
    return model.eval() if device is None else model.to(device).eval()

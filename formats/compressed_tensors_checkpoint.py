"""Export to compressed-tensors: the checkpoint format llm-compressor writes, which transformers loads
with `from_pretrained` (on CPU too) and vLLM and SGLang serve.

The directory holds `config.json` with a `quantization_config` (`quant_method: compressed-tensors`,
`format: pack-quantized`, one config group per width whose targets name the Linears at that width,
`ignore: ["lm_head"]`), `model.safetensors` with, per quantized Linear, `weight_packed` (int32, codes
packed by compressed-tensors' own `pack_to_int32`), `weight_scale` (fp16, per row or per group),
`weight_zero_point` (asymmetric grids only, packed likewise) and `weight_shape`, every other tensor as
it is, and the tokenizer.

The format has one width per Linear and no sparse compressor: pruned weights are stored as exact zeros
(a code like any other), so a pruned model takes as much space as a dense one at the same width.

Its scales are fp16, where the run's grids (like the reference's) have fp32 scales. The scales are rounded
here, when writing, never while solving: an output flag must not change the model a run computes. The codes
are the run's own, so a reloaded weight s16 * (q - z) differs from the evaluated s32 * (q - z) by
|q - z| * |s16 - s32| <= |w| * 2^-11 (fp16's relative rounding of a normal scale; below fp16's smallest normal,
6.1e-5, the absolute spacing 2^-24 of its subnormals), before the reloaded weight's own rounding to its dtype.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import safetensors.torch
import torch
import torch.nn as nn

from formats.packed import dense_tensors
from quant import QuantGrid, dequantize
from systems.atomic_io import atomic_directory

MAX_WIDTH = 8  # pack_to_int32 packs 1..8 bits


def available() -> bool:
    """Whether the compressed-tensors package is installed (without importing it: that takes seconds)."""
    return importlib.util.find_spec("compressed_tensors") is not None


def check_layout(cfg, config, error: type[Exception] = ValueError) -> None:
    """Before any work, for a run that exports compressed-tensors (`cfg`: the run's settings, `config`: the model's):
    with --groupsize G every Linear the run quantizes must have a multiple of G columns, since the format's groups
    tile each row (a remainder group would be refused only when writing, after compression and evaluation).
    Raises `error` with a group size that fits every such Linear."""
    if not cfg.export or cfg.export_format != "compressed-tensors" or cfg.groupsize <= 0 or not cfg.quantize:
        return
    from modelutils import linear_shapes

    chosen = [(i, name, columns) for i, layer in enumerate(linear_shapes(config))
              for name, (_, columns) in layer.items() if cfg.selected(i, name)]
    bad = [(i, name, columns) for i, name, columns in chosen if columns % cfg.groupsize]
    if not bad:
        return
    common = math.gcd(*(columns for *_, columns in chosen))
    fits = [g for g in range(1, common + 1) if common % g == 0 and g >= min(16, common)]
    nearest = min(fits, key=lambda g: (abs(math.log(g / cfg.groupsize)), -g))
    i, name, columns = bad[0]
    raise error(f"--groupsize {cfg.groupsize} with --export_format compressed-tensors: layer {i}'s {name} has "
                f"{columns} columns, not a multiple of {cfg.groupsize} (the format's groups tile each row); choose "
                f"a group size that divides {common}, e.g. {nearest}, or --export_format packed")


def check_checkpoint(directory: str, quantization: dict[str, Any]) -> None:
    """ValueError naming the file when a compressed-tensors checkpoint (pack-quantized, as written here) holds
    tensors of other shapes than its config.json's `quantization_config` gives: codes packed at another width
    (a config edited to 8 bits over 4-bit tensors), scales of another group size. transformers would load such a
    checkpoint and fail at the first forward with a bare tensor-size message. Reads the safetensors headers and the
    `weight_shape` entries (two integers each) only."""
    from safetensors import safe_open

    if quantization.get("format") != "pack-quantized":
        return  # another compressor's layout: transformers' loader checks it
    groups = [(args.get("targets") or [], args.get("weights") or {}) for args in
              (quantization.get("config_groups") or {}).values()]
    for path in sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")):
        try:
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
                for key in sorted(k for k in keys if k.endswith(".weight_packed")):
                    name = key.removesuffix(".weight_packed")
                    weights = next((w for targets, w in groups if any(_targets(t, name) for t in targets)), None)
                    if weights is None or f"{name}.weight_shape" not in keys:
                        continue
                    rows, columns = (int(v) for v in f.get_tensor(f"{name}.weight_shape").tolist())
                    bits, group = int(weights.get("num_bits", 0)), weights.get("group_size") or columns
                    found = {s: tuple(f.get_slice(f"{name}.{s}").get_shape()) for s in
                             ("weight_packed", "weight_scale") if f"{name}.{s}" in keys}
                    expected = {"weight_packed": (rows, math.ceil(columns * bits / 32)),
                                "weight_scale": (rows, math.ceil(columns / group))}
                    for what, shape in found.items():
                        if shape != expected[what]:
                            raise ValueError(f"{path}: {name}.{what} has shape {list(shape)}, but config.json's "
                                             f"quantization_config ({bits} bits, groups of {group} columns over "
                                             f"{columns}) gives {list(expected[what])}: the config and the tensors "
                                             f"disagree (edited?); export the model again")
        except ValueError:
            raise
        except Exception as e:  # SafetensorError: truncated or damaged
            raise ValueError(f"{path} is damaged ({' '.join(str(e).split())[:200]}): export the model again") from None


def _targets(target: str, name: str) -> bool:
    """Whether a config group's target (a module name regex "re:...", or a module class, which every quantized
    Linear here is) names the Linear `name`."""
    import re

    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == "Linear"


@dataclass
class CompressedTensorsReport:
    """Sizes in bytes of what `export_compressed_tensors` wrote."""

    total_bytes: int  # every file written
    weights_bytes: int  # model.safetensors on disk
    linear_bytes: int  # the quantized Linears' tensors in it (codes, scales, zero points, shapes)
    predicted_linear_bytes: int  # the same, from shapes and widths alone
    fp16_bytes: int  # all parameters at 2 bytes each (tied ones once)
    layers: int
    widths: dict[int, int]  # width -> Linears at it

    def summary(self) -> str:
        mib = 2 ** 20
        return (f"compressed-tensors: quantized Linears {self.linear_bytes / mib:.3f} MiB "
                f"(predicted {self.predicted_linear_bytes / mib:.3f} MiB; pruned weights are stored as zeros), "
                f"total {self.total_bytes / mib:.3f} MiB vs fp16 {self.fp16_bytes / mib:.3f} MiB "
                f"({self.fp16_bytes / self.total_bytes:.2f}x smaller)")


def predicted_bytes(rows: int, columns: int, width: int, groups: int, sym: bool) -> int:
    """Bytes of one Linear in pack-quantized form: codes (each row packed into int32s), fp16 scales,
    packed zero points (asymmetric), the int64 shape."""
    packed = rows * math.ceil(columns * width / 32) * 4
    zero = 0 if sym else groups * math.ceil(rows * width / 32) * 4
    return packed + 2 * rows * groups + zero + 2 * 8


def linear_tensors(name: str, weight: torch.Tensor, grid: QuantGrid, width: int) -> dict[str, torch.Tensor]:
    """The compressed-tensors entries of one Linear quantized at one width on `grid`.

    Codes are recomputed from the final weights and checked to rebuild them exactly on the run's grid; the
    scales are then stored at fp16 (the module docstring gives the bound)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    W = weight.detach().float()
    rows, columns = W.shape
    q, scale, zero = grid.codes_of(W, torch.full((columns,), width, dtype=torch.int64))
    if not torch.equal(dequantize(q, scale, zero).to(weight.dtype), weight.detach()):
        raise ValueError(f"{name}: weights are not on their quantization grid (the model changed after "
                         "compress(), or wrong grids?)")
    step = grid.groupsize
    offset = 2 ** (width - 1)  # compressed-tensors' codes are signed: q - 2^(b-1)
    tensors = {
        f"{name}.weight_packed": pack_to_int32((q - offset).to(torch.int8).cpu(), width),
        f"{name}.weight_scale": scale[:, ::step].to(torch.float16).cpu().contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, columns]),
    }
    if not grid.sym:
        tensors[f"{name}.weight_zero_point"] = pack_to_int32((zero[:, ::step] - offset).to(torch.int8).cpu(), width,
                                                            packed_dim=0).contiguous()
    return tensors


def quantization_config(widths: dict[str, int], sym: bool, groupsize: int) -> dict[str, Any]:
    """`config.json`'s quantization_config: one group per width, targeting its Linears by name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for k, width in enumerate(sorted(set(widths.values()))):
        names = sorted(n for n, w in widths.items() if w == width)
        args = QuantizationArgs(num_bits=width, type="int", symmetric=sym,
                                strategy="group" if groupsize > 0 else "channel",
                                group_size=groupsize if groupsize > 0 else None)
        groups[f"group_{k}"] = QuantizationScheme(targets=[f"re:^{n}$" for n in names], weights=args)
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", ignore=["lm_head"],
                                quantization_status="compressed")
    return config.model_dump(exclude_none=True, mode="json")


def export_compressed_tensors(model: nn.Module, grids: dict[str, QuantGrid], bits: dict[str, torch.Tensor],
                              directory: str, write_extras: Callable[[str], None] | None = None
                              ) -> CompressedTensorsReport:
    """Write `model` (after `compress`) as a compressed-tensors checkpoint to a new `directory`, atomically.

    `grids`/`bits` are `Compressed.grids`/`.bits`; every Linear must have one width (uniform runs, or
    `--bit_granularity linear`) and one grid layout. `write_extras(tmp)` adds the caller's files (the
    tokenizer, the run record)."""
    if not available():
        raise ValueError("--export_format compressed-tensors needs the compressed-tensors package: "
                         "pip install 'compressed-tensors>=0.17'")
    widths = {}
    for name, b in bits.items():
        distinct = set(b.tolist())
        if len(distinct) != 1:
            raise ValueError(f"{name} has {len(distinct)} widths; compressed-tensors stores one per Linear: use "
                             "--bit_granularity linear, or --export_format packed")
        widths[name] = distinct.pop()
        if not 1 <= widths[name] <= MAX_WIDTH:
            raise ValueError(f"{name}: compressed-tensors packs 1..{MAX_WIDTH} bits, not {widths[name]}")
    layouts = {(g.sym, g.groupsize if g.grouped else -1) for g in grids.values()}
    if len(layouts) > 1:
        raise ValueError("compressed-tensors needs one grid layout (sym, groupsize) for every Linear")
    sym, groupsize = layouts.pop() if layouts else (False, -1)
    if groupsize > 0:
        for name in grids:
            columns = model.get_submodule(name).weight.shape[1]
            if columns % groupsize:
                raise ValueError(f"{name}: {columns} columns are not a multiple of --groupsize {groupsize}; "
                                 "compressed-tensors' groups must tile the rows")
    with atomic_directory(directory, prefix=".export-") as tmp:
        state, _ = dense_tensors(model, {f"{name}.weight" for name in grids})
        linear: dict[str, torch.Tensor] = {}
        predicted = 0
        with torch.no_grad():
            for name, grid in grids.items():
                weight = model.get_submodule(name).weight
                linear.update(linear_tensors(name, weight, grid, widths[name]))
                predicted += predicted_bytes(*weight.shape, widths[name], grid.xmin.shape[1], sym)
        state.update(linear)
        safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config(widths, sym, groupsize)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if write_extras is not None:
            write_extras(tmp)
        size = lambda f: os.path.getsize(os.path.join(tmp, f))
        counts: dict[int, int] = {}
        for w in widths.values():
            counts[w] = counts.get(w, 0) + 1
        report = CompressedTensorsReport(
            total_bytes=sum(size(f) for f in os.listdir(tmp)),
            weights_bytes=size("model.safetensors"),
            linear_bytes=sum(t.numel() * t.element_size() for t in linear.values()),
            predicted_linear_bytes=predicted,
            fp16_bytes=2 * sum(p.numel() for p in model.parameters()),
            layers=len(grids),
            widths=dict(sorted(counts.items())),
        )
    return report

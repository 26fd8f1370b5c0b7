"""The established low-bit kernels the serving benchmark measures ours against: gemlite's A16Wn Triton kernels and
torch's int4 weight-only matmul (tinygemm), each on a random weight of the benchmark's shapes.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch


class Anchor:
    """An established uniform low-bit kernel on a random layer: fn(x) -> y, its weights' bytes, and the error
    of its output against its own dequantized weights (so a timing of a wrong setup is visible)."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], weight_bytes: int, x_dtype: torch.dtype,
                 reference: torch.Tensor, bias: torch.Tensor | None):
        self.name, self.fn, self.weight_bytes, self.x_dtype = name, fn, weight_bytes, x_dtype
        self.reference, self.bias = reference, bias

    def error(self, m: int) -> float:
        x = torch.randn(m, self.reference.shape[1], device=self.reference.device, dtype=self.x_dtype)
        y = self.fn(x).float()
        ref = x.float() @ self.reference.t() + (self.bias.float() if self.bias is not None else 0.0)
        return float((y - ref).norm() / ref.norm())


def seed_gemlite_configs(n: int, k: int, group: int) -> dict[str, str]:
    """gemlite ships launch configurations tuned on an H100 for common LLM shapes (exactly 4096x4096 and
    2048x2048 among ours) and autotunes any other shape on first use, compiling each candidate (minutes for
    our six shapes and four batch sizes). On a GPU whose name matches none of its files (an H200), the H100
    ones are loaded (same sm_90 and SM count). For a shape it has no entry for, copy the entries of the nearest
    shape it has (in log N + log K; e.g. Llama's 14336 x 4096 for OPT's 16384 x 4096), per kernel type and
    batch bucket. Returns, per kernel type, which shape's configurations were used."""
    import ast

    import gemlite
    import gemlite.core as core

    if not core.GEMLITE_TRITON_CONFIG_CACHE:  # gemlite loads configs by device name; an H200 gets the H100's
        core.GemLiteLinear.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json"))
    used = {}
    for name, entries in core.GEMLITE_TRITON_CONFIG_CACHE.items():
        keys = [ast.literal_eval(key) for key in entries]
        same = [t for t in keys if len(t) >= 6 and t[3] == group and t[4] == 8]  # 4-bit codes, 8 per int32
        shapes = {(t[1], t[2]) for t in same}
        if not shapes:
            continue
        if (n, k) in shapes:
            used[name] = f"{n}x{k} (tuned)"
            continue
        near = min(shapes, key=lambda s: abs(math.log(s[0] / n)) + abs(math.log(s[1] / k)))
        for t in same:
            if (t[1], t[2]) == near:
                entries.setdefault(str((t[0], n, k, *t[3:])), entries[str(t)])
        used[name] = f"{near[0]}x{near[1]}"
    return used


def gemlite_anchor(rows: int, columns: int, group: int, bias: torch.Tensor, seed: int) -> Anchor:
    from gemlite.helper import A16Wn

    configs = seed_gemlite_configs(rows, columns, group)

    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (rows, columns), generator=g, device="cuda", dtype=torch.uint8)
    scales = (torch.rand(rows, columns // group, generator=g, device="cuda") * 0.002 + 0.001).half()
    zeros = torch.randint(5, 11, (rows, columns // group), generator=g, device="cuda").half()
    reference = ((codes.float().view(rows, -1, group) - zeros.float()[..., None]) * scales.float()[..., None])
    layer = A16Wn(device="cuda", dtype=torch.float16).from_weights(codes, scales, zeros, W_nbits=4, group_size=group,
                                                                   bias=bias)
    weight_bytes = sum(t.numel() * t.element_size() for t in (layer.W_q, layer.scales, layer.zeros))
    anchor = Anchor("gemlite-u4-g128", layer, weight_bytes, torch.float16, reference.view(rows, columns), bias)
    anchor.configs = configs
    return anchor


def tinygemm_anchor(rows: int, columns: int, group: int, bias: torch.Tensor, seed: int) -> Anchor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (rows, columns), generator=g, device="cuda", dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    scales = torch.rand(columns // group, rows, generator=g, device="cuda") * 0.002 + 0.001
    offsets = (torch.rand(columns // group, rows, generator=g, device="cuda") - 0.5) * 0.01
    scales_zeros = torch.stack([scales, offsets], 2).to(torch.bfloat16).contiguous()
    bias_bf16 = bias.to(torch.bfloat16)
    sz = scales_zeros.float()  # tinygemm: w = (q - 8) * scale + offset, per group of input channels
    reference = (q.float().view(rows, -1, group) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_zeros) + bias_bf16

    weight_bytes = packed.numel() * packed.element_size() + scales_zeros.numel() * 2
    return Anchor("tinygemm-u4-g128", fn, weight_bytes, torch.bfloat16, reference.view(rows, columns), bias_bf16)

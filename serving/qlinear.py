"""QuantLinear: a Linear whose weight lives only as codes and grid parameters (the serving layout), never as
an fp16 copy on any device; and the swap of a transformers model's nn.Linear modules for it.

forward: on CUDA the Triton kernels (mixed_matmul.py: one launch per call, autotuned per shape); on the CPU
a plain-torch fallback that dequantizes the weight for each call (slow, but exact to the layout and needing
nothing but torch), so that a model swapped on a machine without a GPU still runs.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from quant import QuantGrid

from . import mixed_matmul as mm
from .layout import ServingLayout, build_layout, dequantized_positions, permute_activations

LayerData = ServingLayout | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, QuantGrid]


class QuantLinear(nn.Module):
    """y = x W^T + b with W held in a ServingLayout (buffers: codes, perm, spans, factors, zeros, group tables,
    meta; plus bias). `.to(device)` moves them like any buffers."""

    def __init__(self, layout: ServingLayout, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = layout.columns
        self.out_features = layout.rows
        self._host = layout  # the ints that describe where things are; its tensors are replaced by the buffers
        for name, tensor in layout.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._bound: tuple[tuple[int, ...], ServingLayout] | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor | None, grid: QuantGrid,
                   bias: torch.Tensor | None = None, device: torch.device | str | None = None) -> "QuantLinear":
        """From what a compression produces: integer codes (rows, columns), each column's width (columns,),
        the keep mask (None: nothing pruned) and the QuantGrid (see layout.build_layout)."""
        layout = build_layout(codes, bits, keep, grid, device)
        if bias is not None and device is not None:
            bias = bias.to(device)
        return cls(layout, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: QuantGrid, bits: torch.Tensor, pruned: bool = False,
                    device: torch.device | str | None = None) -> "QuantLinear":
        """From a Linear whose weights already lie on `grid` (a compressed model): the codes are recomputed
        from the weights, as the packed export does, and zeros are pruned weights when `pruned`."""
        weight = linear.weight.detach().float()
        codes, _, _ = grid.codes_of(weight, bits.to(weight.device))
        keep = weight != 0 if pruned else None
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_codes(codes, bits, keep, grid, bias, device)

    def layout(self) -> ServingLayout:
        """The layout over this module's current buffers (rebuilt only when a buffer was replaced)."""
        tensors = {name: getattr(self, name) for name in self._host.tensors()}
        ident = tuple(id(t) for t in tensors.values())
        if self._bound is None or self._bound[0] != ident:
            self._bound = (ident, self._host.with_tensors(tensors))
        return self._bound[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout()
        if x.is_cuda and mm.is_available():
            return mm.mixed_matmul(x, layout, self.bias)
        return dequantize_matmul(x, layout, self.bias)

    def extra_repr(self) -> str:
        widths = ", ".join(f"{b.bits}b:{b.columns}" for b in self._host.buckets)
        group = f"group {self._host.groupsize}" if self._host.groups > 1 else "per-row"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {widths}, {group}, "
                f"{'sym' if self._host.sym else 'asym'}, bias={self.bias is not None}")


def dequantize_matmul(x: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU path: dequantize the weight (in the layout's column order) for this call and multiply in fp32."""
    w = dequantized_positions(layout)  # (rows, positions)
    y = permute_activations(x.float(), layout.perm) @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def swap_linears(model: nn.Module, layers: dict[str, LayerData], device: torch.device | str | None = None,
                 ) -> dict[str, QuantLinear]:
    """Replace each named nn.Linear of `model` by a QuantLinear built from `layers[name]` (a ServingLayout, or
    (codes, bits, keep, grid) as build_layout takes them); the Linear's bias is kept. The replaced weights are
    dropped with their modules. Returns the new modules by name."""
    swapped: dict[str, QuantLinear] = {}
    for name, data in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        layout = data if isinstance(data, ServingLayout) else build_layout(*data)
        if (layout.rows, layout.columns) != (old.out_features, old.in_features):
            raise ValueError(f"{name}: layout is {layout.rows}x{layout.columns}, the Linear "
                             f"{old.out_features}x{old.in_features}")
        target = device if device is not None else old.weight.device
        bias = None if old.bias is None else old.bias.detach().to(target)
        module = QuantLinear(layout.to(target), bias)
        setattr(parent, child, module)
        swapped[name] = module
    return swapped


def quantized_bytes(modules: Iterable[QuantLinear]) -> tuple[int, int]:
    """(stored, predicted) bytes of the weights of these modules (biases excluded)."""
    stored = predicted = 0
    for module in modules:
        layout = module.layout()
        stored += layout.stored_bytes()
        predicted += layout.predicted_bytes()
    return stored, predicted

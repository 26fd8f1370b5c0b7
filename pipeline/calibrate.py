"""Calibration statistics of a decoder layer: the Hessian of each distinct Linear input, from a forward pass of
the calibration windows, and which Linears a run selects.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from modelutils import LayerInputs, feed_inputs, find_linears
from pipeline.config import RunConfig
from sparsegpt_enhanced import SparseGPT
from systems import distributed
from systems.solve_graphs import SolveGraphs


def solve_graphs(cfg: RunConfig, dev: torch.device) -> SolveGraphs | None:
    """Where a compression's small solves are captured and replayed (`SolveGraphs`): CUDA with the fused kernel;
    --no_fused keeps the reference loop, launch by launch."""
    return SolveGraphs() if dev.type == "cuda" and not cfg.no_fused else None


def collect_hessians(layer: nn.Module, names: list[str], inputs: LayerInputs, dev: torch.device,
                     shared: dict[str, str], prefix: str = "", graphs: SolveGraphs | None = None,
                     out: torch.Tensor | None = None) -> dict[str, SparseGPT]:
    """The SparseGPT (Hessian) of each of `names`, filled by a forward pass: one per distinct input, so
    Linears that read the same activations (`shared`: q/k/v, gate/up) share one. `prefix` + name names
    each in messages (`model.decoder.layers.3.`); `graphs`: where their small solves are replayed; `out`: where the
    layer's output goes too (`feed_inputs`)."""
    linears = find_linears(layer)
    keys = sorted({shared.get(n, n) for n in names})
    solvers = {k: SparseGPT(linears[k].in_features, dev, name=prefix + k, graphs=graphs) for k in keys}
    feed_inputs(layer, {k: linears[k] for k in keys}, lambda k, x: solvers[k].add_batch(x), inputs, out)
    distributed.reduce_hessians(solvers)  # under torchrun `inputs` is this rank's shard of the windows
    return solvers


def selected_names(layer: nn.Module, i: int, cfg: RunConfig) -> list[str]:
    return [n for n in find_linears(layer) if cfg.selected(i, n)]

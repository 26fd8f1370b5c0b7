"""Each row's quantization range chosen by actual solves (`--row_ranges search`; off by default).

The reference grid takes each row's range from the dense weights before solving. With sparsity the
solve then moves the kept weights (each pruned weight's error is pushed onto them) past that range, where
they are clamped. A row's range is stored whatever its value, so choosing it better costs no bits; on
opt-mini's first layers the search leaves about 60% of the output error that quantization adds to pruning's
(experiments/probes/row_range_error.py).
Candidates: the range of the dense weights and (with pruning) of the weights as a prune-only solve leaves
them, each scaled by a few factors; each row keeps the candidate after which an actual solve left it the
least output error (w_i - q_i)^T X^T X (w_i - q_i) on the calibration inputs.

It fits the calibration text closer, which is not always better elsewhere: measured on opt-mini it wins
3-bit GPTQ by 2 perplexity on WikiText-2 and C4 and loses PTB at 50% sparsity (benchmarks/mixed_precision.md), so it is
not a default.

Model-agnostic like the solver: a weight matrix, its solver and the solve settings.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from quant import QuantGrid
from sparsegpt_enhanced import SolveSettings, SparseGPT

RANGE_FACTORS = (1.0, 0.9, 0.8)  # each candidate range is also tried scaled by these


def candidate_grids(weight: torch.Tensor, sources: list[torch.Tensor], sym: bool, shrink: dict[int, float],
                    factors: tuple[float, ...]) -> list[QuantGrid]:
    """One per-row grid per source matrix and factor, each width's `shrink` on top."""
    grids = []
    for source in sources:
        base = QuantGrid.for_weight(source, sym, 0, shrink)
        grids += [replace(base, xmin=base.xmin * f, xmax=base.xmax * f) for f in factors]
    return grids


def search_row_ranges(weight: torch.Tensor, solver: SparseGPT, settings: SolveSettings, bits: torch.Tensor,
                      order: torch.Tensor | None, shrink: dict[int, float],
                      factors: tuple[float, ...] = RANGE_FACTORS) -> QuantGrid:
    """The per-row grid (no groups) whose row i has the candidate range after which a solve at `bits` (in
    `order`) left row i the least output error. Costs one solve per candidate, and a prune-only solve with
    pruning.

    Rows are solved independently, except that an unstructured mask is chosen per block over all rows, so
    the combined grid's solve differs slightly from each candidate's in the rows' masks."""
    W = weight.float()
    sources = [W]
    if settings.prune.active:
        sources.append(solver.fasterprune(W, settings, None, None, order).weight)
    grids = candidate_grids(W, sources, settings.sym, shrink, factors)
    errors = []
    for grid in grids:
        D = W - solver.fasterprune(W, settings, grid, bits, order).weight
        errors.append(((D @ solver.xtx) * D).sum(1))
    pick = torch.stack(errors).argmin(0)[None]
    xmin = torch.stack([g.xmin[:, 0] for g in grids]).gather(0, pick)[0]
    xmax = torch.stack([g.xmax[:, 0] for g in grids]).gather(0, pick)[0]
    return replace(grids[0], xmin=xmin[:, None], xmax=xmax[:, None])

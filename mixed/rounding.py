"""The solver's own estimate of its loss when a Linear's columns are rounded at any width, made before solving:
what the mixed-precision cost model prices channels with (`rounding_model`, `RoundingModel`), and the mask rule
that predicts which weights a pruned solve keeps (`predicted_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant import QuantGrid
from sparsegpt_enhanced import PruneSpec, SolveSettings, SparseGPT, unstructured_mask


@dataclass
class RoundingModel:
    """Estimated solver loss of rounding a matrix's columns (`rounding_model`).

    loss_j(b) = sum_i r_i kept_ij (w_ij - Q_b(w_ij))^2 / U_jj^2, with r_i = row_weight (default 1),
    what an error in output i costs downstream. Everything is held in solve order; results come
    back in stored order."""

    weight: torch.Tensor  # solve order, dead columns zeroed
    kept: torch.Tensor  # bool: weights the mask rule keeps on the dense weights
    cost: torch.Tensor  # (columns,) 1 / U_jj^2, 0 for dead columns
    uncompensated: torch.Tensor  # (columns,) H_jj: the cost if no later column absorbed the error
    row_weight: torch.Tensor  # (rows, 1)
    sym: bool
    groupsize: int
    restore: torch.Tensor | None  # argsort of the solve order; None = stored order
    grid: QuantGrid | None = None  # the round-to-nearest ranges of `weight`, made on first use

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.restore is None else x[..., self.restore]

    def kept_per_column(self) -> torch.Tensor:
        """Predicted count of stored (kept) weights in each column."""
        return self._stored(self.kept.sum(0))

    def rounding_error(self, width: int, shrink: float = 1.0) -> torch.Tensor:
        """(columns,) in solve order: sum_i r_i kept_ij (w_ij - Q_b(w_ij))^2, before any per-column cost."""
        if self.grid is None:
            self.grid = QuantGrid.rounding(self.weight, self.sym, self.groupsize)
        return (self.row_weight * (self.weight - self.grid.round_at(self.weight, width, shrink)) ** 2 * self.kept).sum(0)

    def priced(self, error: torch.Tensor, compensated: bool = True) -> torch.Tensor:
        """`rounding_error` at each column's cost, in stored order: 1/U_jj^2 (what the solver cannot push
        onto later columns) or, with `compensated` False, H_jj (as if nothing absorbed it)."""
        return self._stored(error * (self.cost if compensated else self.uncompensated))

    def loss(self, width: int, shrink: float = 1.0, compensated: bool = True) -> torch.Tensor:
        """(columns,) estimated loss of rounding every column at `width`, its range scaled by `shrink`."""
        return self.priced(self.rounding_error(width, shrink), compensated)


def rounding_model(solver: SparseGPT, weight: torch.Tensor, settings: SolveSettings,
               order: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> RoundingModel:
    """The solver's loss for rounding each column at any width, estimated before solving.

    The solver pushes each column's rounding error onto the columns after it; what it cannot
    push costs 1/U_jj^2 per unit (U in solve order). That lies between 1/[H^-1]_jj (the first
    column: all of it can be compensated) and H_jj (the last: none can), so it ranks channels
    far better than H_jj alone. Pruned weights cost the same at every width, so only the
    weights that the mask rule keeps on the dense weights are counted; the same prediction
    gives each column's count of stored weights, which the bit budget is spent on."""
    factor = solver.inverse_factor(settings.percdamp, order)
    W = weight.float().clone() if order is None else weight.float()[:, order]
    W[:, factor.dead] = 0
    d = torch.diag(factor.upper)
    kept = ~predicted_mask(W, d, settings.prune, settings.blocksize)
    cost = 1 / d ** 2
    cost[factor.dead] = 0
    uncompensated = solver.hessian_diag.float() if order is None else solver.hessian_diag.float()[order]
    uncompensated[factor.dead] = 0
    r = torch.ones_like(W[:, :1]) if row_weight is None else row_weight.float()[:, None]
    return RoundingModel(W, kept, cost, uncompensated, r, settings.sym, settings.groupsize,
                         None if order is None else torch.argsort(order))


def predicted_mask(W: torch.Tensor, d: torch.Tensor, prune: PruneSpec, blocksize: int) -> torch.Tensor:
    """The solver's mask rule applied to the weights as given (True = pruned): exact for the first
    block, a prediction for the later ones, whose weights the solver changes before it masks them.
    Each block (unstructured) or row group (N:M) keeps exactly what the solver's keeps."""
    mask = torch.zeros_like(W, dtype=torch.bool)
    if prune.prunen > 0:
        for i1 in range(0, W.shape[1], blocksize):
            i2 = min(i1 + blocksize, W.shape[1])
            for g in range(i1, i2, prune.prunem):
                score = W[:, g:min(g + prune.prunem, i2)] ** 2 / d[None, g:min(g + prune.prunem, i2)] ** 2
                n = min(prune.prunen, score.shape[1])
                mask[:, g:g + score.shape[1]].scatter_(1, torch.topk(score, n, dim=1, largest=False).indices, True)
    elif prune.sparsity > 0:
        for i1 in range(0, W.shape[1], blocksize):
            i2 = min(i1 + blocksize, W.shape[1])
            mask[:, i1:i2] = unstructured_mask(W[:, i1:i2], d[i1:i2], prune.sparsity)
    return mask

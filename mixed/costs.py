"""What each input channel of a Linear costs at each width: the mixed-precision allocators' inputs.

Model-agnostic, like the solver: a weight matrix, its solver (the Hessian of its inputs) and the run's
`SolveSettings`, never the network around them. The pieces:
- five importance metrics per channel, combined into one importance (`channel_metrics`, `combine_metrics`);
- an error model: the solver's own estimate of its loss when a channel is rounded at each width
  (`rounding.rounding_model`), weighted by the importance;
- each width's range shrunk by the factor that minimises an estimate (`clip_ranges`) or, with the "solve"
  objective, after which actual solves of a sample of rows leave the least output error (`solved_shrink`);
- the bit target counted on *stored* weights: with sparsity only the weights the mask keeps carry codes, so
  each channel is priced by its predicted count of kept weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from mixed.precision import CLIP_SAMPLE_ROWS, SEARCH_INNER_BLOCKSIZE, ClipSearch, MixedPrecision
from quant import QuantGrid, round_to_nearest
from mixed.rounding import RoundingModel, rounding_model
from sparsegpt_enhanced import SolveResult, SolveSettings, SparseGPT


METRICS = ("energy", "outlier", "weight", "obs", "sensitivity")


def channel_metrics(
    weight: torch.Tensor, hessian_diag: torch.Tensor, peak: torch.Tensor, inverse_diag: torch.Tensor,
    quantized: torch.Tensor,
) -> torch.Tensor:
    """The five raw importance metrics of every input channel, shape (5, columns).

    energy       sqrt(H_jj) ~ ||X[:, j]||: how much signal the channel carries.
    outlier      peak |X[:, j]| / rms(X[:, j]): rare large activations that a coarse grid clips.
    weight       ||W[:, j]||: how much the layer reads from the channel.
    obs          sum_i W_ij^2 / [H^-1]_jj: OBS cost of removing the channel given all others.
    sensitivity  H_jj * ||W[:, j] - Q(W[:, j])||^2: output error of rounding it at the base width.
    """
    W = weight.float()
    rms = torch.sqrt(hessian_diag / 2)  # H = 2/n X^T X, so H_jj / 2 is the mean square
    energy = rms
    outlier = torch.where(rms > 0, peak / rms.clamp_min(1e-30), torch.zeros_like(rms))
    col_norm2 = (W ** 2).sum(0)
    obs = col_norm2 / inverse_diag
    sensitivity = hessian_diag * ((W - quantized) ** 2).sum(0)
    return torch.stack([energy, outlier, col_norm2.sqrt(), obs, sensitivity])


def combine_metrics(metrics: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Each metric normalised to mean 1 within the layer, then the weighted mean of the five."""
    mean = metrics.mean(1, keepdim=True)
    normalised = torch.where(mean > 0, metrics / mean.clamp_min(1e-30), torch.ones_like(metrics))
    w = torch.tensor(weights, dtype=metrics.dtype, device=metrics.device)
    return (w[:, None] * normalised).sum(0) / w.sum()


# ---------------------------------------------------------------- the error model


@dataclass
class ChannelCosts:
    """One Linear's channels as the allocators see them."""

    importance: torch.Tensor  # (columns,) combined importance, mean 1 within the Linear
    rank: torch.Tensor  # (columns,) the order quantile's tiers follow
    cost: torch.Tensor  # (columns, len(options)) estimated error at each width (sorted options)
    size: torch.Tensor  # (columns,) predicted stored weights
    shrink: dict[int, float] = field(default_factory=dict)  # width -> range factor (clipped widths only)


def importance(weight: torch.Tensor, solver: SparseGPT, settings: SolveSettings, base_bits: int,
               weights: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(five raw metrics, combined importance normalised to mean 1 within the layer) of each input channel."""
    factor = solver.inverse_factor(settings.percdamp)
    W = weight.float().clone()
    W[:, factor.dead] = 0
    metrics = channel_metrics(W, solver.hessian_diag, solver.peak, factor.inverse_diag,
                              round_to_nearest(W, base_bits, settings.sym, settings.groupsize))
    return metrics, combine_metrics(metrics, weights)


def clip_ranges(model: RoundingModel, widths: list[int], factors: tuple[float, ...], objective: str = "solver"
                ) -> dict[int, float]:
    """For each width, the range factor with the least estimated loss over the whole matrix (only factors
    below 1 are returned: one number per width and Linear, nothing per row to store)."""
    shrink = {}
    for b in widths:
        losses = [model.priced(model.rounding_error(b, f), objective == "solver").sum() for f in factors]
        k = int(torch.argmin(torch.stack(losses)))
        if factors[k] != 1.0:
            shrink[b] = factors[k]
    return shrink


def solved_shrink(weight: torch.Tensor, solver: SparseGPT, settings: SolveSettings, widths: list[int],
                  factors: tuple[float, ...], row_weight: torch.Tensor | None = None,
                  sample_rows: int = CLIP_SAMPLE_ROWS) -> dict[int, float]:
    """For each width, the range factor after which an actual solve at that width leaves the least output
    error sum_i r_i (w_i - q_i)^T H (w_i - q_i) on a sample of rows.

    Why solve rather than estimate: both estimates price rounding the weights as they are before the
    solve, but the solve rounds them after the error updates of earlier columns (and, with sparsity, of the
    pruned weights) have moved them, often past a shrunken range, where they are clamped. Measured on
    opt-mini (experiments/probes/clip_true_error.py), a factor of 0.8 that both estimates favour multiplied a
    Linear's true output error by up to 6 (attention k/q, 3 bits, with or without sparsity). Rows are solved
    independently (apart from an unstructured mask's threshold, which a sample of rows estimates), so a
    sample prices a factor at a fraction of a full solve. The sample is stacked once per factor, each copy on
    its own scaled ranges and with its own mask (`row_groups`), in one solve per width on a GPU (its fused kernel
    takes one width per column) and one for all widths on the CPU, where a solve costs its Python loop over
    columns more than its arithmetic (each copy at its own width: `QuantGrid.row_bits`). The columns go in the
    run's order at a single width (`SparseGPT.column_order` without widths)."""
    rows = weight.shape[0]
    pick = torch.arange(rows) if rows <= sample_rows else torch.linspace(0, rows - 1, sample_rows).round().long()
    pick = pick.to(weight.device)
    W = weight[pick].float()
    r = None if row_weight is None else row_weight.to(W.device)[pick].float()
    copies = len(factors)
    order = solver.column_order(settings)
    search_settings = replace(settings, inner_blocksize=SEARCH_INNER_BLOCKSIZE)
    shrink: dict[int, float] = {}
    for group in ([widths] if W.device.type == "cpu" else [[b] for b in widths]):
        n = len(group) * copies
        # in the layout the device's sweep reads (a solve keeps it): columns first on the CPU, rows on a GPU
        stacked = W.repeat(n, 1) if W.is_cuda else W.t().repeat(1, n).t()
        scale = torch.tensor(factors, device=W.device).repeat_interleave(W.shape[0]).repeat(len(group))[:, None]
        row_bits = torch.tensor(group, device=W.device).repeat_interleave(copies * W.shape[0])[:, None]
        grid = QuantGrid.for_weight(W, settings.sym, settings.groupsize)  # each copy's ranges are the sample's
        grid = replace(grid, xmin=grid.xmin.repeat(n, 1), xmax=grid.xmax.repeat(n, 1), row_scale=scale,
                       row_bits=row_bits if len(group) > 1 else None)
        bits = torch.full((W.shape[1],), group[0], dtype=torch.int64)
        result = solver.fasterprune(stacked, search_settings, grid, bits, order, row_groups=n)
        per_row = undamped_row_error(result, stacked, solver, settings).view(len(group), copies, -1)
        losses = per_row.sum(2) if r is None else (per_row * r).sum(2)
        for b, loss in zip(group, losses):
            best = factors[int(torch.argmin(loss))]
            if best != 1.0:
                shrink[b] = best
    return shrink


def undamped_row_error(result: SolveResult, weight: torch.Tensor, solver: SparseGPT, settings: SolveSettings
                       ) -> torch.Tensor:
    """Each row's output error on X^T X, d X^T X d^T with d = w0 - q, from the solve's own errors: its row error is
    d H_d d^T with H_d = s X^T X + lam I on the live columns (lam: `InverseFactor.added`), so d X^T X d^T =
    (row_error - lam |d|^2) / s, without the rows x columns^2 product (a fifth of the clip search's time on a CPU)."""
    lam = solver.inverse_factor(settings.percdamp, solver.column_order(settings)).added
    D = (weight.float() - result.weight) * (solver.hessian_diag != 0)
    return (result.row_error - lam * D.square().sum(1)) / solver.scale


def range_factors(weight: torch.Tensor, solver: SparseGPT, settings: SolveSettings, widths: list[int],
                  search: ClipSearch, row_weight: torch.Tensor | None = None,
                  model: RoundingModel | None = None) -> dict[int, float]:
    """Each width's range factor (only those below 1), by `search.objective`: actual solves of a row sample
    ("solve", `solved_shrink`) or an estimate on the rounding model ("uncompensated", "solver": `clip_ranges`;
    `model` is made here unless given). Widths wider than `search.widest` keep the min-max range. The one place
    mixed and uniform runs choose their factors."""
    widths = [b for b in widths if b <= search.widest]
    if not widths:
        return {}
    if search.objective == "solve":
        return solved_shrink(weight, solver, settings, widths, search.factors, row_weight, search.sample_rows)
    if model is None:
        model = rounding_model(solver, weight, settings, solver.column_order(settings), row_weight)
    return clip_ranges(model, widths, search.factors, search.objective)


def channel_costs(weight: torch.Tensor, solver: SparseGPT, settings: SolveSettings, base_bits: int,
                  mp: MixedPrecision, row_weight: torch.Tensor | None = None,
                  shrink: dict[int, float] | None = None) -> ChannelCosts:
    """Each channel's importance, its estimated error at each width and its stored-weight count.

    The cost the allocators minimise is importance_j * error_j(b): the five metrics weigh an error
    whose size and shape across widths come from the Hessian and the grid. With `row_weight` (each
    output's cost to the model's loss) errors are in units of loss and comparable across Linears;
    quantile's ranking is then scaled by the Linear's mean error at the base width. Errors are priced in
    the run's solve order at a single width (`SparseGPT.column_order` without widths: these costs decide them).
    `shrink`: range factors already chosen (the plan's, `ClipSearch.planned`), searched here when None."""
    _, imp = importance(weight, solver, settings, base_bits, mp.importance_weights)
    if row_weight is not None and mp.sensitivity_shrinkage:
        h = mp.sensitivity_shrinkage
        row_weight = (1 - h) * row_weight + h * row_weight.mean()
    model = rounding_model(solver, weight, settings, solver.column_order(settings), row_weight)
    options = sorted(mp.options)
    if shrink is None:
        shrink = range_factors(weight, solver, settings, options, mp.clip_search, row_weight, model) if mp.clip else {}
    losses = {b: model.loss(b, shrink.get(b, 1.0)) for b in options}
    error = torch.stack([losses[b] for b in options], 1)
    kept = model.kept_per_column().to(error.dtype)
    if mp.shrinkage_mean == "per_weight":
        mean = kept[:, None] * error.sum(0, keepdim=True) / kept.sum().clamp_min(1)
    else:
        mean = error.mean(0, keepdim=True)
    error = (1 - mp.error_shrinkage) * error + mp.error_shrinkage * mean
    rank = imp if row_weight is None else imp * error[:, options.index(base_bits)].mean()
    cost = imp[:, None] * error if mp.channel_cost == "weighted" else error
    return ChannelCosts(imp, rank, cost, kept, shrink)

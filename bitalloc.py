"""Activation-aware mixed precision: which input channel of a Linear gets which bit-width.

Model-agnostic, like the solver: it sees a weight matrix, its solver (the Hessian of its inputs)
and the solve settings, never the network. The model walk (opt_enhanced.py) asks it for each
Linear's channel costs, and for one allocation per Linear or one across the model.

The pieces:
- five importance metrics per channel, combined into one importance (`channel_metrics`,
  `combine_metrics`);
- an error model: the solver's own estimate of its loss when a channel is rounded at each width
  (`SparseGPT.rounding_model`), weighted by the importance, with each width's range shrunk by the
  factor that minimises an estimate (`clip_ranges`) or, with the "solve" objective, after which actual
  solves of a sample of rows leave the least output error (`solved_shrink`);
- the bit target counted on *stored* weights: with sparsity only the weights the mask keeps carry
  codes, so each channel is priced by its predicted count of kept weights;
- two allocators under that target: `budget` (the unconstrained optimum of the error model, a greedy
  knapsack) and `quantile` (channels ranked by importance, each width a contiguous range of the
  ranking, its boundaries placed by dynamic programming to minimise the same error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from quant import QuantGrid, round_to_nearest
from sparsegpt_enhanced import PruneSpec, RoundingModel, SparseGPT

# Range factors tried for each width (1 = the min-max range).
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


CLIP_MIN = 0.8  # the clip search's floor: chosen on validation text (BENCHMARKS.md)

# Each allocator's error shrinkage (MixedPrecision.error_shrinkage), chosen on validation text (BENCHMARKS.md §3):
# budget, which prices every channel by its own error curve, did best trusting the curves more (0.25 and 0.5 tied).
ERROR_SHRINKAGE = {"quantile": 0.75, "budget": 0.5}

BIT_OPTIONS = (2, 3, 4, 6, 8)  # the widths a mixed run chooses from, unless default_options narrows them


def default_options(method: str, granularity: str, scope: str, target: float, sparse: bool, base: int
                    ) -> tuple[int, ...]:
    """The widths a mixed run chooses from when --bit_options is not given: all of BIT_OPTIONS, except for budget
    per channel over the whole model (scope "model") with sparsity at 4 stored bits or more, which keeps the widths
    next to the target (those bracketing it and one more either side: 3,4,6 at 4.0) and the base width (--wbits).

    Chosen on validation text (BENCHMARKS.md §3 "Which widths"): with 50% sparsity at 4.0, budget with all five
    widths lost to uniform 4-bit when calibrated on PTB, and 3,4,6 did better on validation in each calibration
    over seeds 0-6; at 3.0, without sparsity, in layer scope and for quantile the narrower sets lost (one width
    per Linear was not measured with them). At 3.5 the widths next to the target (2,3,4,6) were 0.16% better on
    validation over seeds 0-2 only, left at all five until more seeds say so."""
    if method != "budget" or granularity != "channel" or scope != "model" or not sparse or target < 4.0:
        return BIT_OPTIONS
    below = max(i for i, b in enumerate(BIT_OPTIONS) if b <= target)
    above = min((i for i, b in enumerate(BIT_OPTIONS) if b >= target), default=len(BIT_OPTIONS) - 1)
    near = set(BIT_OPTIONS[max(below - 1, 0):above + 2])
    return tuple(sorted(near | {base} & set(BIT_OPTIONS)))


def clip_factors(smallest: float) -> tuple[float, ...]:
    """The range factors the clip search tries, down to `smallest` (1.0 always)."""
    return tuple(f for f in CLIP_FACTORS if f >= smallest - 1e-9)


@dataclass(frozen=True)
class MixedPrecision:
    """Every parameter of a mixed-precision allocation; experiments pass variants of it."""

    target: float  # average code bits per stored weight
    options: tuple[int, ...] = BIT_OPTIONS
    method: str = "quantile"  # quantile | budget
    granularity: str = "channel"  # channel | linear (one width per Linear, q/k/v tied; allocated across the model)
    importance_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    # Share of each channel's estimated error replaced by its layer's mean. The estimate sees only the
    # calibration text: channels it rarely excites look free and get 2 bits, and other text pays for that.
    error_shrinkage: float | None = None  # None: the method's (ERROR_SHRINKAGE)
    # What a channel's error is shrunk toward: its Linear's mean error per channel ("per_channel"), or its Linear's
    # mean error per stored weight times the channel's stored weights ("per_weight"). With sparsity the counts
    # differ from channel to channel; they are fixed by the mask, not by the text.
    shrinkage_mean: str = "per_channel"
    # A channel's cost at a width: importance x estimated error ("weighted"), or the estimated error alone
    # ("error"; the importance then only ranks quantile's channels).
    channel_cost: str = "weighted"
    # Model scope: share of each output's loss sensitivity (row weight) replaced by its Linear's mean. The
    # sensitivities too come from the calibration text alone.
    sensitivity_shrinkage: float = 0.0
    clip: bool = True  # shrink each width's range by the factor that minimises the estimated error
    clip_factors: tuple[float, ...] = clip_factors(CLIP_MIN)
    # Which loss picks each width's range factor: the solver's estimate (errors partly absorbed by later
    # columns), "uncompensated" (each column's error at its full cost H_jj), or "solve": the output error
    # an actual solve at that width leaves on a sample of rows (`solved_shrink`).
    clip_objective: str = "solve"
    drift_correction: bool = True  # carry each Linear's stored-bit surplus or deficit to the next

    def __post_init__(self) -> None:
        if self.error_shrinkage is None:
            object.__setattr__(self, "error_shrinkage", ERROR_SHRINKAGE[self.method])


# ---------------------------------------------------------------- channel importance

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


def importance(weight: torch.Tensor, solver: SparseGPT, base_bits: int, sym: bool, groupsize: int, percdamp: float,
               weights: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(five raw metrics, combined importance normalised to mean 1 within the layer) of each input channel."""
    factor = solver.inverse_factor(percdamp)
    W = weight.float().clone()
    W[:, factor.dead] = 0
    metrics = channel_metrics(W, solver.hessian_diag, solver.peak, factor.inverse_diag,
                              round_to_nearest(W, base_bits, sym, groupsize))
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


CLIP_SAMPLE_ROWS = 256  # rows the "solve" clip objective solves (evenly spaced; all rows of a smaller matrix)


def solved_shrink(weight: torch.Tensor, solver: SparseGPT, prune: PruneSpec, widths: list[int],
                  factors: tuple[float, ...], sym: bool, groupsize: int, blocksize: int, percdamp: float,
                  order: torch.Tensor | None, row_weight: torch.Tensor | None = None, fused: bool = True,
                  sample_rows: int = CLIP_SAMPLE_ROWS) -> dict[int, float]:
    """For each width, the range factor after which an actual solve at that width leaves the least output
    error sum_i r_i (w_i - q_i)^T H (w_i - q_i) on a sample of rows.

    Why solve rather than estimate: both estimates price rounding the weights as they are before the
    solve, but the solve rounds them after the error updates of earlier columns (and, with sparsity, of the
    pruned weights) have moved them, often past a shrunken range, where they are clamped. Measured on
    opt-mini (experiments/clip_true_error.py), a factor of 0.8 that both estimates favour multiplied a
    Linear's true output error by up to 6 (attention k/q, 3 bits, with or without sparsity). Rows are solved
    independently (apart from an unstructured mask's threshold, which a sample of rows estimates), so a
    sample prices a factor at a fraction of a full solve. Each width is one solve: the sample stacked once
    per factor, each copy on its own scaled ranges and with its own mask (`row_groups`)."""
    rows = weight.shape[0]
    pick = torch.arange(rows) if rows <= sample_rows else torch.linspace(0, rows - 1, sample_rows).round().long()
    pick = pick.to(weight.device)
    W = weight[pick].float()
    r = None if row_weight is None else row_weight.to(W.device)[pick].float()
    copies = len(factors)
    stacked = W.repeat(copies, 1)
    scale = torch.tensor(factors, device=W.device).repeat_interleave(W.shape[0])[:, None]
    shrink: dict[int, float] = {}
    for b in widths:
        grid = replace(QuantGrid.for_weight(stacked, sym, groupsize), row_scale=scale)
        bits = torch.full((W.shape[1],), b, dtype=torch.int64)
        D = stacked - solver.fasterprune(stacked, prune, grid, bits, blocksize, percdamp, order, fused,
                                         row_groups=copies).weight
        per_row = ((D @ solver.xtx) * D).sum(1).view(copies, -1)  # X^T X, not H: one factor for every f
        losses = per_row.sum(1) if r is None else (per_row * r).sum(1)
        best = factors[int(torch.argmin(losses))]
        if best != 1.0:
            shrink[b] = best
    return shrink


def range_factors(weight: torch.Tensor, solver: SparseGPT, prune: PruneSpec, widths: list[int],
                  factors: tuple[float, ...], objective: str, sym: bool, groupsize: int, blocksize: int,
                  percdamp: float, order: torch.Tensor | None, row_weight: torch.Tensor | None = None,
                  fused: bool = True, model: RoundingModel | None = None) -> dict[int, float]:
    """Each width's range factor (only those below 1), by `objective`: actual solves of a row sample ("solve",
    `solved_shrink`) or an estimate on the rounding model ("uncompensated", "solver": `clip_ranges`; `model`
    is made here unless given). The one place mixed and uniform runs choose their factors."""
    if objective == "solve":
        return solved_shrink(weight, solver, prune, widths, factors, sym, groupsize, blocksize, percdamp, order,
                             row_weight, fused)
    if model is None:
        model = solver.rounding_model(weight, prune, sym, groupsize, blocksize, percdamp, order, row_weight)
    return clip_ranges(model, widths, factors, objective)


def channel_costs(weight: torch.Tensor, solver: SparseGPT, prune: PruneSpec, base_bits: int, sym: bool,
                  groupsize: int, blocksize: int, percdamp: float, order: torch.Tensor | None, mp: MixedPrecision,
                  row_weight: torch.Tensor | None = None, fused: bool = True) -> ChannelCosts:
    """Each channel's importance, its estimated error at each width and its stored-weight count.

    The cost the allocators minimise is importance_j * error_j(b): the five metrics weigh an error
    whose size and shape across widths come from the Hessian and the grid. With `row_weight` (each
    output's cost to the model's loss) errors are in units of loss and comparable across Linears;
    quantile's ranking is then scaled by the Linear's mean error at the base width."""
    _, imp = importance(weight, solver, base_bits, sym, groupsize, percdamp, mp.importance_weights)
    if row_weight is not None and mp.sensitivity_shrinkage:
        h = mp.sensitivity_shrinkage
        row_weight = (1 - h) * row_weight + h * row_weight.mean()
    model = solver.rounding_model(weight, prune, sym, groupsize, blocksize, percdamp, order, row_weight)
    options = sorted(mp.options)
    shrink = range_factors(weight, solver, prune, options, mp.clip_factors, mp.clip_objective, sym, groupsize,
                           blocksize, percdamp, order, row_weight, fused, model) if mp.clip else {}
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


# ---------------------------------------------------------------- allocators


def allocate(costs: ChannelCosts, mp: MixedPrecision, target: float | None = None) -> torch.Tensor:
    """Bits per channel at `target` stored bits (default the configured one) with the configured method."""
    target = mp.target if target is None else target
    target = min(max(target, min(mp.options)), max(mp.options))
    if mp.method == "budget":
        return allocate_budget(costs.cost.cpu(), costs.size.cpu(), list(mp.options), target)
    return allocate_quantile(costs.rank.cpu(), costs.cost.cpu(), costs.size.cpu(), list(mp.options), target)


def monotone_tiers(cost: torch.Tensor) -> torch.Tensor:
    """The tier of each channel (rows of `cost`, in rank order) minimising the summed cost among the
    allocations whose tier never decreases along the ranking: a dynamic programme over the K-1 tier
    boundaries, F_t(p) = P_t(p) + min_{q<=p} (F_{t-1}(q) - P_t(q)) with P_t the prefix sums of
    tier t's costs, one cumulative minimum per tier."""
    n, K = cost.shape
    prefix = torch.cat([torch.zeros(1, K, dtype=cost.dtype), cost.cumsum(0)])
    best = prefix[:, 0]
    starts = []
    for t in range(1, K):
        low, where = torch.cummin(best - prefix[:, t], 0)
        best = prefix[:, t] + low
        starts.append(where)
    tier = torch.zeros(n, dtype=torch.int64)
    p = n
    for t in range(K - 1, 0, -1):
        q = int(starts[t - 1][p])
        tier[q:p] = t
        p = q
    return tier


def allocate_quantile(rank: torch.Tensor, cost: torch.Tensor, size: torch.Tensor, options: list[int],
                      target: float) -> torch.Tensor:
    """Channels ranked by `rank` (ascending), each width a contiguous range of the ranking (a tier may
    be empty), the boundaries chosen to minimise the summed cost at `target` stored bits.

    A Lagrange multiplier prices a bit; for each price `monotone_tiers` gives the best monotone
    allocation, and bisection finds the cheapest price that fits the budget. The budget the price
    leaves unspent goes to the best single-channel boundary moves that still fit."""
    options = sorted(options)
    order = torch.argsort(rank, stable=True)
    C, s = cost.double()[order], size.double()[order]
    b = torch.tensor(options, dtype=torch.float64)
    budget = target * s.sum().item() + 1e-6

    def at_price(price: float) -> tuple[torch.Tensor, float]:
        tier = monotone_tiers(C + price * s[:, None] * b[None, :])
        return tier, (s * b[tier]).sum().item()

    tier, spent = at_price(0.0)
    if spent > budget:
        lo, hi = 0.0, 1.0
        while at_price(hi)[1] > budget:
            lo, hi = hi, hi * 4
            if hi > 1e300:
                break
        for _ in range(60):
            mid = (lo + hi) / 2
            if at_price(mid)[1] > budget:
                lo = mid
            else:
                hi = mid
        tier, spent = at_price(hi)
        tier = _fill_boundaries(tier, C, s, b, budget - spent)
    bits = torch.empty(len(rank), dtype=torch.int64)
    bits[order] = b.long()[tier]
    return bits


def _fill_boundaries(tier: torch.Tensor, C: torch.Tensor, s: torch.Tensor, b: torch.Tensor, left: float
                     ) -> torch.Tensor:
    """Spend `left` bits on moves that keep the allocation monotone: the last channel of a tier one tier
    up, best error reduction per bit first, while one fits."""
    K = len(b)
    counts = torch.bincount(tier, minlength=K).tolist()
    tier = tier.clone()
    while True:
        best, move = 0.0, None
        end = 0
        for t in range(K - 1):
            end += counts[t]
            if counts[t] == 0:
                continue
            j = end - 1  # tiers are contiguous in rank order: the last channel of tier t
            price = (b[t + 1] - b[t]).item() * s[j].item()
            gain = (C[j, t] - C[j, t + 1]).item()
            if price <= left and gain > 0 and gain > best * price:
                best, move = gain / max(price, 1e-300), (j, t, price)
        if move is None:
            return tier
        j, t, price = move
        tier[j] = t + 1
        counts[t] -= 1
        counts[t + 1] += 1
        left -= price


def allocate_budget(error: torch.Tensor, size: torch.Tensor, options: list[int], target: float) -> torch.Tensor:
    """Greedy knapsack: start every channel at the lowest width and buy the upgrades with the
    largest error reduction per extra bit until the budget is spent.

    error (channels, len(options)): each channel's estimated error at each width (sorted options).
    Each channel's upgrades are the steps of the lower convex hull of its error curve, so their
    gains per bit decrease and one global sort by gain is the greedy order.
    """
    options = sorted(options)
    b = torch.tensor(options, dtype=torch.float64)
    err = error.double().cpu()
    size = size.double().cpu()
    channels, widths = err.shape
    rows = torch.arange(channels)
    tier = torch.zeros(channels, dtype=torch.int64)
    steps = []  # (gain per bit, cost in bits, channel, tier before, tier after), a hull step per channel per round
    for _ in range(widths - 1):
        slope = (err[rows, tier][:, None] - err) / (b[None, :] - b[tier][:, None])
        slope[torch.arange(widths)[None, :] <= tier[:, None]] = -math.inf
        gain, to = slope.max(1)
        live = gain > 0
        steps.append((gain[live], (b[to] - b[tier])[live] * size[live], rows[live], tier[live], to[live]))
        tier = torch.where(live, to, tier)
    gain, cost, channel, start, to = (torch.cat(x) for x in zip(*steps))
    order = torch.argsort(gain, descending=True, stable=True)
    budget = (target - options[0]) * size.sum().item() + 1e-6
    spent = torch.cumsum(cost[order], 0)
    n = int((spent <= budget).sum())
    take = order[:n]
    tier = torch.zeros(channels, dtype=torch.int64).scatter_reduce(0, channel[take], to[take], "amax")
    # A hull step can be several bits wide: spend what is left on the best later steps that still fit.
    left = budget - (spent[n - 1].item() if n else 0.0)
    smallest = cost.min().item() if len(cost) else math.inf
    for k in order[n:].tolist():
        if left < smallest:
            break
        j = channel[k].item()
        if cost[k] <= left and tier[j] == start[k]:
            tier[j] = to[k]
            left -= cost[k].item()
    return torch.tensor(options)[tier]


@dataclass
class StoredBits:
    """The stored-bit budget as the loop spends it, Linear by Linear.

    The allocator prices each channel by the weights the mask rule keeps on the dense weights; the
    solver's mask, chosen on the error-updated weights, keeps the same number per block but not per
    column, so a Linear stores a little more or less than planned. That surplus or deficit is
    carried into the next Linear's budget, which keeps the whole model's stored average on target."""

    carry_drift: bool
    carried: float = 0.0  # planned minus stored code bits so far

    def linear_target(self, planned_bits: float, predicted_kept: float) -> float:
        """Stored bits per kept weight for the next Linear."""
        extra = self.carried if self.carry_drift else 0.0
        return (planned_bits + extra) / max(predicted_kept, 1.0)

    def spent(self, planned_bits: float, stored_bits: int) -> None:
        self.carried += planned_bits - stored_bits

    def side_by_side(self, first: bool) -> "StoredBits":
        """A Linear's own budget when the Linears of a layer are solved on several processes at once, where
        none knows what the others store until the layer is done: what was carried into the layer goes to
        its first Linear, and each Linear's drift is added to this budget after the layer. So the
        carry reaches the next layer instead of the next Linear: the model's stored average stays on
        target, and the result does not depend on how many processes there are or who solved what."""
        return StoredBits(self.carry_drift, self.carried if first else 0.0)


# ---------------------------------------------------------------- across the model


def concat(costs: list[ChannelCosts]) -> ChannelCosts:
    """The channels of several Linears as one set (for an allocation across the model)."""
    return ChannelCosts(torch.cat([c.importance.cpu() for c in costs]), torch.cat([c.rank.cpu() for c in costs]),
                        torch.cat([c.cost.cpu() for c in costs]), torch.cat([c.size.cpu() for c in costs]))


def plan_budgets(costs: dict[str, ChannelCosts], mp: MixedPrecision) -> dict[str, float]:
    """--bit_scope model: one allocation over every channel of the model; each Linear's share of the
    budget (planned code bits) is what its own allocation is later given."""
    names = list(costs)
    bits = allocate(concat([costs[n] for n in names]), mp)
    out, at = {}, 0
    for n in names:
        size = costs[n].size.cpu()
        out[n] = float((bits[at:at + len(size)].double() * size.double()).sum())
        at += len(size)
    return out


def plan_linear_widths(costs: dict[str, ChannelCosts], tied: list[list[str]], mp: MixedPrecision) -> dict[str, int]:
    """--bit_granularity linear: one width per unit (a Linear, or Linears that must share a width, such
    as q/k/v), each unit priced by its channels' summed cost and size, allocated across the model."""
    units = ChannelCosts(
        importance=torch.tensor([float(sum(costs[n].importance.sum() for n in u)) for u in tied]),
        rank=torch.tensor([float(sum((costs[n].rank.cpu() * costs[n].size.cpu()).sum() for n in u)
                                 / max(sum(costs[n].size.sum() for n in u), 1)) for u in tied]),
        cost=torch.stack([sum(costs[n].cost.cpu().sum(0) for n in u) for u in tied]),
        size=torch.tensor([float(sum(costs[n].size.sum() for n in u)) for u in tied]),
    )
    widths = allocate(units, mp)
    return {n: int(w) for u, w in zip(tied, widths) for n in u}

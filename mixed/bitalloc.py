"""Which width each input channel of a Linear gets: the allocators under a stored-bit target.

Two allocators minimise the same summed cost (`costs.ChannelCosts`): `budget`, the unconstrained optimum (a
greedy knapsack over each channel's convex hull), and `quantile`, where channels ranked by importance take
contiguous ranges of widths (boundaries by dynamic programming). `StoredBits` carries each Linear's drift from
its planned stored bits to the next; `plan_budgets` and `plan_linear_widths` allocate across the whole model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixed.costs import ChannelCosts
from mixed.precision import MixedPrecision



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
    tiers, costs, channels_of, starts, tos = tier.tolist(), cost.tolist(), channel.tolist(), start.tolist(), to.tolist()
    for k in order[n:].tolist():  # in Python numbers: thousands of steps, each a few comparisons
        if left < smallest:
            break
        j = channels_of[k]
        if costs[k] <= left and tiers[j] == starts[k]:
            tiers[j] = tos[k]
            left -= costs[k]
    return torch.tensor(options)[torch.tensor(tiers)]


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

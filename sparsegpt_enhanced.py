"""The per-layer solver: SparseGPT pruning with joint GPTQ quantization, per-column bit-widths.

Model-agnostic: it knows a weight matrix W (rows x columns) and the Hessian H = 2/n X^T X of
the layer's inputs X (n x columns), nothing about the network around them.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch

import kernels
from quant import QuantGrid, quantize

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@functools.cache
def _has_mixed_mm() -> bool:
    """Whether this torch can multiply 16-bit CUDA matrices into an fp32 result (addmm out_dtype)."""
    try:
        a = torch.ones(2, 2, device="cuda", dtype=torch.float16)
        return torch.addmm(torch.zeros(2, 2, device="cuda"), a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


@dataclass
class PruneSpec:
    """What to remove: an unstructured fraction, or N of every M consecutive weights in a row."""

    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0

    @property
    def active(self) -> bool:
        return self.sparsity > 0 or self.prunen > 0


@dataclass
class InverseFactor:
    """Upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U), shared by all weights fed by one input."""

    upper: torch.Tensor
    inverse_diag: torch.Tensor  # [H^-1]_jj, for OBS saliency (in solve order)
    dead: torch.Tensor  # input channels that were always zero (in solve order)
    percdamp: float  # damping actually used (raised if H was not positive definite)
    order: torch.Tensor | None  # solve order of the columns (act-order), None = as stored


@dataclass
class SolveResult:
    weight: torch.Tensor  # float32, pruned weights exactly zero
    mask: torch.Tensor  # True where a weight was pruned
    error: float  # OBS estimate of the increase in ||XW^T||^2 (sum of (w - q)^2 / [U]_jj^2 / 2)


class SparseGPT:
    """Accumulates H for one input and solves every weight matrix that reads that input."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.columns = columns
        self.xtx = torch.zeros(columns, columns, device=device)
        self.peak = torch.zeros(columns, device=device)
        self.ntokens = 0
        self._factors: dict[bytes | None, InverseFactor] = {}

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs of shape (..., columns), accumulating X^T X in fp32.

        fp16/bf16 activations on CUDA go through the tensor cores with fp32 output: products of
        16-bit numbers are exact in fp32 and the sums are fp32, so this is the fp32 Hessian,
        about 10x faster than converting X first (it dominates at OPT-175B widths)."""
        x = x.reshape(-1, self.columns)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _has_mixed_mm():
            self.xtx = torch.addmm(self.xtx, x.t(), x, out_dtype=torch.float32)
        else:
            x = x.float()
            self.xtx.addmm_(x.t(), x)
        self.peak = torch.maximum(self.peak, x.abs().amax(0).float())
        self.ntokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * self._scale()

    @property
    def hessian_diag(self) -> torch.Tensor:
        """diag(H) without forming H (an n x n copy is 9.7 GB at OPT-175B's fc2)."""
        return self.xtx.diagonal() * self._scale()

    def _scale(self) -> float:
        if self.ntokens == 0:
            raise RuntimeError("SparseGPT: no calibration inputs were added")
        return 2.0 / self.ntokens

    def inverse_factor(self, percdamp: float, order: torch.Tensor | None = None, log=warn) -> InverseFactor:
        """Damped inverse Hessian factor for solving the columns in `order` (None: as stored);
        retries with 10x damping if H is not positive definite. Cached per order, so weights
        that share an input (q, k, v) share one factorization."""
        key = None if order is None else order.cpu().numpy().tobytes()
        cached = self._factors.get(key)
        if cached is not None and cached.percdamp >= percdamp:
            return cached
        damp_used = percdamp
        for _ in range(6):
            # Memory matters at OPT-175B widths (49152^2 fp32 = 9.7 GB): drop each n x n intermediate
            # as soon as the next one exists.
            H = self.hessian if order is None else self.hessian[order][:, order]
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            H.diagonal().add_(damp_used * torch.mean(torch.diag(H)))
            L, info = torch.linalg.cholesky_ex(H)
            del H
            if info.item() == 0:
                Hinv = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info.item() == 0 and torch.isfinite(U).all():
                    self._factors[key] = InverseFactor(U, torch.diag(Hinv).clone(), dead, damp_used, order)
                    return self._factors[key]
            retry = max(damp_used * 10, 0.01)
            log(f"warning: Hessian not positive definite at percdamp={damp_used:g}; retrying with {retry:g}")
            damp_used = retry
        raise RuntimeError("Hessian stays singular even with heavy damping (NaN/Inf inputs?)")

    def fasterprune(
        self,
        weight: torch.Tensor,
        prune: PruneSpec,
        grid: QuantGrid | None = None,
        bits_per_column: torch.Tensor | None = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        order: torch.Tensor | None = None,
        fused: bool = True,
    ) -> SolveResult:
        """Prune and/or quantize `weight` column by column (in `order`, default as stored), pushing
        each column's error onto the columns not yet processed through H^-1 (OBS update), in lazy
        blocks of `blocksize`."""
        factor = self.inverse_factor(percdamp, order)
        W = weight.float().clone()
        if order is not None:
            if grid is not None and grid.grouped:
                raise ValueError("a solve order other than the stored one is not supported with quantization groups")
            W = W[:, order]
            bits_per_column = None if bits_per_column is None else bits_per_column[order.to(bits_per_column.device)]
        W[:, factor.dead] = 0
        U = factor.upper
        columns = W.shape[1]
        mask = torch.zeros_like(W, dtype=torch.bool)
        error = torch.zeros((), dtype=torch.float64, device=W.device)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            params = None
            if grid is not None:
                grid.fill_groups(W, i1, i2)
                params = grid.column_params(i1, i2, bits_per_column[i1:i2])
            Q1, Err1, mask[:, i1:i2], block_error = solve_block(W[:, i1:i2].clone(), U[i1:i2, i1:i2], prune, params,
                                                                fused)
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
            error += block_error
        if order is not None:
            restore = torch.argsort(order)
            W, mask = W[:, restore], mask[:, restore]
        return SolveResult(W, mask, error.item())

    def rounding_error(self, weight: torch.Tensor, prune: PruneSpec, options: list[int], sym: bool, groupsize: int,
                       blocksize: int = 128, percdamp: float = 0.01, order: torch.Tensor | None = None,
                       row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The solver's loss for rounding each column at each width, estimated before solving:
        (columns, len(options)), sum_i r_i kept_ij (w_ij - Q_b(w_ij))^2 / U_jj^2, with r_i = row_weight
        (default 1), what an error in output i costs downstream.

        The solver pushes each column's rounding error onto the columns after it; what it cannot
        push costs 1/U_jj^2 per unit (U in solve order). That lies between 1/[H^-1]_jj (the first
        column: all of it can be compensated) and H_jj (the last: none can), so it ranks channels
        far better than H_jj alone. Pruned weights cost the same at every width, so only the
        weights the mask rule keeps on the dense weights are counted (N:M masks are chosen during
        the solve: there, every weight counts)."""
        factor = self.inverse_factor(percdamp, order)
        W = weight.float().clone() if order is None else weight.float()[:, order]
        grid = QuantGrid.rounding(W, sym, groupsize)  # from the weights as given, like the solver's grid
        W[:, factor.dead] = 0
        d = torch.diag(factor.upper)
        kept = torch.ones_like(W, dtype=torch.bool)
        if prune.prunen == 0 and prune.sparsity > 0:
            for i1 in range(0, W.shape[1], blocksize):
                i2 = min(i1 + blocksize, W.shape[1])
                kept[:, i1:i2] = ~unstructured_mask(W[:, i1:i2], d[i1:i2], prune.sparsity)
        width = torch.empty(W.shape[1], dtype=torch.int64)
        r = torch.ones_like(W[:, :1]) if row_weight is None else row_weight.float()[:, None]
        loss = torch.stack([(r * (W - grid.round(W, width.fill_(b))) ** 2 * kept).sum(0) for b in options], 1)
        loss = loss / d[:, None] ** 2
        loss[factor.dead] = 0
        return loss if order is None else loss[torch.argsort(order)]


def solve_order(hessian_diag: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """The column order for the solver: GPTQ's act-order solves the loudest input channels
    (largest H_jj) first; None keeps the stored order."""
    return torch.argsort(hessian_diag, descending=True, stable=True) if act_order else None


def unstructured_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Exactly floor(numel * sparsity) weights of the block with the smallest OBS score w^2 / d^2."""
    score = (W1 ** 2 / d[None, :] ** 2).flatten()
    mask = torch.zeros_like(score, dtype=torch.bool)
    k = int(score.numel() * sparsity)
    if k > 0:
        mask[torch.sort(score).indices[:k]] = True  # a radix sort: far faster than topk for k ~ numel/2
    return mask.view(W1.shape)


def solve_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    prune: PruneSpec,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block: its unstructured mask, then the sequential column loop, as one Triton kernel
    launch on CUDA (`kernels.py`) or in plain PyTorch. Returns (Q1, Err1, mask1, error) with the
    error as a 0-d tensor, so that the caller syncs once, not once per block."""
    d = torch.diag(U1)
    if prune.prunen == 0 and prune.sparsity > 0:
        mask1 = unstructured_mask(W1, d, prune.sparsity)
    else:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
    if fused and W1.is_cuda and kernels.is_available() and kernels.supports(W1.shape[1], prune.prunen, prune.prunem):
        scale, zero, maxq = params if params is not None else (None, None, None)
        return kernels.solve_block_fused(W1, U1, mask1, prune.prunen, prune.prunem, scale, zero, maxq)
    return column_loop(W1, d, U1, mask1, prune, params)


def column_loop(
    W1: torch.Tensor, d: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor, prune: PruneSpec,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference loop: per column, (N:M mask), zero the pruned, round, and push the error
    err = (w - q) / d onto the columns to its right. W1 is updated in place."""
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    losses = torch.zeros(W1.shape[0], device=W1.device)
    for i in range(W1.shape[1]):
        w = W1[:, i]
        if prune.prunen > 0 and i % prune.prunem == 0:
            score = W1[:, i:i + prune.prunem] ** 2 / d[None, i:i + prune.prunem] ** 2
            mask1.scatter_(1, i + torch.topk(score, prune.prunen, dim=1, largest=False).indices, True)
        q = torch.where(mask1[:, i], 0.0, w)
        if params is not None:
            scale, zero, maxq = params
            q = quantize(q, scale[:, i], zero[:, i], maxq[i])
        Q1[:, i] = q
        losses += (w - q) ** 2 / d[i] ** 2
        err = (w - q) / d[i]
        W1[:, i:] -= err.unsqueeze(1).matmul(U1[i, i:].unsqueeze(0))
        Err1[:, i] = err
    return Q1, Err1, mask1, losses.sum() / 2


def magnitude_prune(weight: torch.Tensor, prune: PruneSpec) -> torch.Tensor:
    """Magnitude baseline (GMP): zero the smallest |w| of the whole matrix, or per N:M group."""
    W = weight.clone()
    if prune.prunen > 0:
        rows, columns = W.shape
        groups = W[:, : columns - columns % prune.prunem].reshape(rows, -1, prune.prunem)
        drop = torch.topk(groups.abs(), prune.prunen, dim=2, largest=False).indices
        groups.scatter_(2, drop, 0)
        W[:, : groups.shape[1] * prune.prunem] = groups.reshape(rows, -1)
        return W
    k = int(W.numel() * prune.sparsity)
    if k > 0:
        W.view(-1)[torch.topk(W.abs().flatten(), k, largest=False).indices] = 0
    return W


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


# ---------------------------------------------------------------- bit allocation


def tier_shares(options: list[int], target: float) -> list[float]:
    """Maximum-entropy shares p_k ∝ exp(λ b_k) over the options whose mean equals `target`.

    At the options' own mean (λ = 0) every tier gets the same share; the exponential family is
    the most even split the target allows.
    """
    b = torch.tensor(options, dtype=torch.float64)
    lo, hi = -50.0, 50.0
    for _ in range(200):
        lam = (lo + hi) / 2
        p = torch.softmax(lam * b, 0)
        if (p * b).sum() < target:
            lo = lam
        else:
            hi = lam
    return torch.softmax((lo + hi) / 2 * b, 0).tolist()


def _fix_mean(bits: torch.Tensor, order: torch.Tensor, size: torch.Tensor, options: list[int], target: float) -> torch.Tensor:
    """Move channels one tier up or down (least important first down, most important first up)
    until the size-weighted mean is as close to `target` as one move allows."""
    total = size.sum().item()
    opts = torch.tensor(options, device=bits.device)
    tier = torch.searchsorted(opts, bits)
    for _ in range(4 * len(bits)):
        mean = (bits.double() * size).sum().item() / total
        gap = target - mean
        if gap > 0:  # promote the most important channel that can move up without overshooting
            for j in order.flip(0).tolist():
                t = tier[j].item()
                if t + 1 < len(options):
                    step = (options[t + 1] - options[t]) * size[j].item() / total
                    if step <= gap + 1e-12 or abs(gap - step) < abs(gap):
                        tier[j] = t + 1
                        bits[j] = options[t + 1]
                        break
            else:
                break
        elif gap < 0:
            for j in order.tolist():
                t = tier[j].item()
                if t > 0:
                    step = (options[t] - options[t - 1]) * size[j].item() / total
                    if step <= -gap + 1e-12 or abs(gap + step) < abs(gap):
                        tier[j] = t - 1
                        bits[j] = options[t - 1]
                        break
            else:
                break
        else:
            break
        new_gap = target - (bits.double() * size).sum().item() / total
        if abs(new_gap) >= abs(gap):
            break
    return bits


def allocate_quantile(importance: torch.Tensor, size: torch.Tensor, options: list[int], target: float) -> torch.Tensor:
    """Rank channels by importance and fill the tiers from the bottom by their shares of weights."""
    options = sorted(options)
    shares = tier_shares(options, target)
    order = torch.argsort(importance, stable=True)
    cum = torch.cumsum(size[order].double(), 0) / size.sum()
    edges = torch.tensor(shares, dtype=torch.float64).cumsum(0)
    tier = torch.searchsorted(edges, cum - size[order].double() / size.sum() / 2).clamp_max(len(options) - 1)
    bits = torch.empty_like(importance, dtype=torch.int64)
    bits[order] = torch.tensor(options)[tier]
    return _fix_mean(bits, order, size.double(), options, target)


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


# ---------------------------------------------------------------- statistics

RANGE_BITS = 64  # one fp32 (xmin, xmax) pair per row and group, the source of every width's scale/zero


@dataclass
class LinearStats:
    """What one compressed Linear cost and where its bits went."""

    name: str
    rows: int
    columns: int
    groups: int
    nonzero: int  # weights left after pruning (pruned ones are exactly zero)
    pruned: bool
    bits_per_column: list[int] | None  # None: not quantized
    importance_range: tuple[float, float] | None
    error: float
    damping: float
    seconds: float
    storage_bits: int

    @property
    def avg_bits(self) -> float | None:
        return None if self.bits_per_column is None else sum(self.bits_per_column) / self.columns


def storage_bits(weight: torch.Tensor, bits_per_column: torch.Tensor | None, groups: int, pruned: bool,
                 n_options: int) -> int:
    """Bits of the packed form of one compressed matrix: the kept codes at their column's width,
    a bitmask if pruned, a per-column bit map if widths differ, and the per-row(group) ranges."""
    rows, columns = weight.shape
    if bits_per_column is None:
        return 16 * rows * columns
    kept = (weight != 0).sum(0) if pruned else torch.full((columns,), rows, device=weight.device)
    codes = int((kept.cpu() * bits_per_column.cpu()).sum())
    mask = rows * columns if pruned else 0
    mixed = len(set(bits_per_column.tolist())) > 1
    bitmap = columns * max(1, math.ceil(math.log2(n_options))) if mixed else 0
    return codes + mask + bitmap + RANGE_BITS * rows * groups


@dataclass
class Summary:
    channels: int
    bit_counts: dict[int, int]
    avg_bits: float  # mean over channels
    avg_bits_weighted: float  # mean over weights (channels weighted by rows)
    effective_bits: float  # storage bits per weight, everything counted
    sparsity: float


def summarize(stats: list[LinearStats]) -> Summary:
    quantized = [s for s in stats if s.bits_per_column is not None]
    counts: dict[int, int] = {}
    for s in quantized:
        for b in s.bits_per_column:
            counts[b] = counts.get(b, 0) + 1
    channels = sum(s.columns for s in quantized)
    weights = sum(s.rows * s.columns for s in stats)
    qweights = sum(s.rows * s.columns for s in quantized)
    return Summary(
        channels=channels,
        bit_counts=dict(sorted(counts.items())),
        avg_bits=sum(b * c for b, c in counts.items()) / channels if channels else 0.0,
        avg_bits_weighted=sum(s.rows * sum(s.bits_per_column) for s in quantized) / qweights if qweights else 0.0,
        effective_bits=sum(s.storage_bits for s in stats) / weights if weights else 0.0,
        sparsity=1 - sum(s.nonzero for s in stats) / weights if weights else 0.0,
    )


def format_summary(summary: Summary, stats: list[LinearStats]) -> str:
    bar = "=" * 72
    lines = [bar, "量化统计摘要 (Quantization Statistics Summary)", bar,
             f"总通道数 (Total channels): {summary.channels}", "位宽分布 (Bit distribution):"]
    for b, c in summary.bit_counts.items():
        lines.append(f"  {b}-bit: {c:8d} channels ({100 * c / summary.channels:5.1f}%)")
    lines += [
        f"平均位宽 (Average bits): {summary.avg_bits:.3f} per channel, {summary.avg_bits_weighted:.3f} per weight",
        f"有效存储 (Effective storage): {summary.effective_bits:.3f} bits/weight "
        "(codes + scales/zeros + sparsity mask + bit map)",
        f"稀疏度 (Sparsity): {100 * summary.sparsity:.2f}%",
        "每层统计 (Per-layer): name, average bits, importance range",
    ]
    for s in stats:
        if s.bits_per_column is None:
            continue
        rng = "" if s.importance_range is None else f"  [{s.importance_range[0]:.3g}, {s.importance_range[1]:.3g}]"
        lines.append(f"  {s.name:48s} {s.avg_bits:5.2f}{rng}")
    lines.append(bar)
    return "\n".join(lines)

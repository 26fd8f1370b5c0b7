"""The per-layer solver: SparseGPT pruning with joint GPTQ quantization, per-column bit-widths.

Model-agnostic: it knows a weight matrix W (rows x columns) and the Hessian H = 2/n X^T X of
the layer's inputs X (n x columns), nothing about the network around them.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from systems import kernels
from systems.cholesky import inverse_factor_from_reversed_cholesky
from systems.solve_graphs import SolveGraphs
from quant import QuantGrid, quantize


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


@dataclass(frozen=True)
class PruneSpec:
    """What to remove: an unstructured fraction, or N of every M consecutive weights in a row."""

    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0

    @property
    def active(self) -> bool:
        return self.sparsity > 0 or self.prunen > 0


SOLVE_ORDERS = ("stored", "act", "narrow_first")


@dataclass(frozen=True)
class SolveSettings:
    """How every Linear of a run is solved: the settings that the solve itself, the cost model, the clip search
    and the row-range search must agree on, made once from the run's settings and passed down whole, so that no
    part of the method can price or search with settings other than those the solve uses."""

    prune: PruneSpec = PruneSpec()
    sym: bool = False
    groupsize: int = -1  # columns per quantization group; <= 0: one grid per row
    blocksize: int = 128  # columns per lazy-update block (and unstructured mask block)
    percdamp: float = 0.01
    order: str = "stored"  # the column order's rule (SOLVE_ORDERS; `solve_order`)
    fused: bool = True  # the fused Triton block kernel (and CUDA-graph replay) on CUDA
    # Columns per inner block of the unfused column loop (`column_loop`); 0: rank-1 updates of the whole block per
    # column, the reference's order of operations (and the fused kernel's, bit for bit).
    inner_blocksize: int = 0

    @property
    def order_unit(self) -> int:
        """The columns `narrow_first` reorders within: an N:M group, else a block (the unstructured mask's)."""
        return self.prune.prunem if self.prune.prunen else self.blocksize


@dataclass
class InverseFactor:
    """Upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U), shared by all weights fed by one input."""

    upper: torch.Tensor
    inverse_diag: torch.Tensor  # [H^-1]_jj, for OBS saliency (in solve order)
    dead: torch.Tensor  # input channels that were always zero (in solve order)
    percdamp: float  # damping actually used (raised if H was not positive definite)
    order: torch.Tensor | None  # solve order of the columns (act-order), None = as stored
    added: torch.Tensor  # what the damping added to each diagonal entry of H: percdamp x mean diag(H), dead ones as 1


@dataclass
class SolveResult:
    weight: torch.Tensor  # float32, pruned weights exactly zero
    mask: torch.Tensor  # True where a weight was pruned
    error: float  # OBS estimate of the increase in ||XW^T||^2 (sum of (w - q)^2 / [U]_jj^2 / 2)
    # Each row's sum of err^2 over its columns: (w0 - q) H_d (w0 - q)^T, the output error the solve left on the damped
    # Hessian H_d = U^-1 U^-T (w0 - q = err U, row by row), with the dead columns zeroed in w0.
    row_error: torch.Tensor


HESSIAN_STRIP = 4096  # rows of X^T X that add_batch fills per product (wider inputs skip the lower triangle)
# Blocks whose grid parameters an ungrouped grid computes at once: a block's own would be a dozen small launches,
# as many as the rest of its solve; the span holds (rows x span columns) scales and zeros (0.4 GB at OPT-175B's fc1).
GRID_SPAN_BLOCKS = 8


class SparseGPT:
    """Accumulates H for one input and solves every weight matrix that reads that input."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", name: str = "",
                 strip: int = HESSIAN_STRIP, graphs: SolveGraphs | None = None) -> None:
        self.columns = columns
        self.name = name  # the Linear whose input this is, for messages
        self.strip = strip
        self.graphs = graphs  # where small solves are replayed as CUDA graphs (None: launched one by one)
        self._xtx = torch.zeros(columns, columns, device=device)
        self._lower_missing = False  # add_batch has filled only the upper triangle's strips since the last read
        self.peak = torch.zeros(columns, device=device)
        self.ntokens = 0
        self._factors: dict[bytes | None, InverseFactor] = {}

    @property
    def xtx(self) -> torch.Tensor:
        """X^T X (fp32, unscaled), whole: the lower triangle is mirrored from the upper one on first read."""
        if self._lower_missing:
            X, b = self._xtx, self.strip
            for i in range(0, self.columns, b):
                for j in range(i + b, self.columns, b):
                    X[j:j + b, i:i + b].copy_(X[i:i + b, j:j + b].t())
            self._lower_missing = False
        return self._xtx

    @xtx.setter
    def xtx(self, value: torch.Tensor) -> None:
        self._xtx, self._lower_missing = value, False

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs of shape (..., columns), accumulating X^T X in fp32.

        fp16/bf16 activations on CUDA go through the tensor cores with fp32 output: products of
        16-bit numbers are exact in fp32 and the sums are fp32, so this is the fp32 Hessian,
        about 10x faster than converting X first (it dominates at OPT-175B widths)."""
        x = x.reshape(-1, self.columns)
        mixed = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _has_mixed_mm()
        if not mixed:
            x = x.float()
        # X^T X is symmetric: wide inputs fill only the strips of `strip` rows from the diagonal rightwards
        # (about half the products at OPT-175B's fc2), and the first read mirrors the rest.
        b = min(self.strip, self.columns)
        self._lower_missing |= b < self.columns
        for i in range(0, self.columns, b):
            rows = self._xtx[i:i + b, i:]
            if mixed:
                rows.copy_(torch.addmm(rows, x[:, i:i + b].t(), x[:, i:], out_dtype=torch.float32))
            else:
                rows.addmm_(x[:, i:i + b].t(), x[:, i:])
        self.peak = torch.maximum(self.peak, x.abs().amax(0).float())
        self.ntokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * self.scale

    @property
    def hessian_diag(self) -> torch.Tensor:
        """diag(H) without forming H (an n x n copy is 9.7 GB at OPT-175B's fc2)."""
        return self.xtx.diagonal() * self.scale

    @property
    def scale(self) -> float:
        """s in H = s X^T X."""
        if self.ntokens == 0:
            raise RuntimeError("SparseGPT: no calibration inputs were added")
        return 2.0 / self.ntokens

    def inverse_factor(self, percdamp: float, order: torch.Tensor | None = None, log=warn) -> InverseFactor:
        """Damped inverse Hessian factor for solving the columns in `order` (None: as stored);
        retries with 10x damping if H is not positive definite. Cached per order, so weights
        that share an input (q, k, v) share one factorization.

        One Cholesky factorization of H in reversed order and one triangular inverse
        (`inverse_factor_from_reversed_cholesky`) instead of the published Cholesky, inverse and
        Cholesky of the inverse: 2n^3/3 flops instead of 4n^3/3 (8n^3/3 on CUDA, where torch's
        cholesky_inverse solves against the identity), and H^-1 is never formed. Memory matters at
        OPT-175B widths (49152^2 fp32 = 9.7 GB): besides X^T X, at most two n x n matrices are alive
        at any time (three inside torch's CUDA cholesky_inverse before)."""
        key = None if order is None else order.cpu().numpy().tobytes()
        cached = self._factors.get(key)
        if cached is not None and cached.percdamp >= percdamp:
            return cached
        index = torch.arange(self.columns, device=self.xtx.device) if order is None else order.to(self.xtx.device)
        diag = self.hessian_diag[index]
        dead = diag == 0
        diag[dead] = 1
        reverse = index.flip(0)
        damp_used = percdamp
        for _ in range(6):
            added = damp_used * torch.mean(diag)
            damped = diag + added
            H = self.xtx.index_select(0, reverse).index_select(1, reverse).mul_(self.scale)
            H.diagonal().copy_(damped.flip(0))
            L, info = torch.linalg.cholesky_ex(H)
            del H
            factor = inverse_factor_from_reversed_cholesky(L) if info.item() == 0 else None
            del L
            if factor is not None:
                U, inverse_diag = factor
                self._factors[key] = InverseFactor(U, inverse_diag, dead, damp_used, order, added)
                return self._factors[key]
            retry = max(damp_used * 10, 0.01)
            log(f"warning: Hessian{self._of()} not positive definite at percdamp={damp_used:g}; retrying with "
                f"{retry:g}")
            damp_used = retry
        raise RuntimeError(f"Hessian{self._of()} stays singular even with heavy damping (NaN/Inf inputs?)")

    def _of(self) -> str:
        return f" of the input to {self.name}" if self.name else ""

    def column_order(self, settings: SolveSettings, bits: torch.Tensor | None = None) -> torch.Tensor | None:
        """The order `settings` solve this input's Linears in (None: as stored); `bits`: the widths, where known."""
        return solve_order(self.xtx.diagonal(), settings.order, bits, settings.order_unit)

    def fasterprune(
        self,
        weight: torch.Tensor,
        settings: SolveSettings,
        grid: QuantGrid | None = None,
        bits_per_column: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        row_groups: int = 1,
    ) -> SolveResult:
        """Prune and/or quantize `weight` column by column (in `order`, default as stored), pushing
        each column's error onto the columns not yet processed through H^-1 (OBS update), in lazy
        blocks of `settings.blocksize`. `order` is passed rather than taken from `settings`: the widths it
        may depend on (`column_order`) are known only to the caller.

        `row_groups` > 1 solves that many equal slices of the rows as separate matrices in one pass (the
        unstructured mask is chosen within each slice; everything else is per row already): stacked copies
        of one matrix, e.g. on different grids, cost one solve instead of one each."""
        factor = self.inverse_factor(settings.percdamp, order)
        W = weight.float().clone()
        if order is not None:
            if grid is not None and grid.grouped:
                raise ValueError("a solve order other than the stored one is not supported with quantization groups")
            W = W[:, order]
            bits_per_column = None if bits_per_column is None else bits_per_column[order.to(bits_per_column.device)]
        W[:, factor.dead] = 0
        if self.graphs is not None and self.graphs.covers(W) and not (grid is not None and grid.grouped):
            params = () if grid is None else grid.column_params(0, W.shape[1], bits_per_column)
            W, mask, row_error = self.graphs.run(
                (settings.prune, settings.blocksize, settings.fused, settings.inner_blocksize, row_groups),
                lambda W, U, *p: block_loop(W, U, settings, row_groups, sliced_params(p)),
                W, factor.upper, *params)
        else:
            W, mask, row_error = block_loop(W, factor.upper, settings, row_groups,
                                            grid_params(grid, bits_per_column, settings.blocksize))
        if order is not None:
            restore = torch.argsort(order)
            W, mask = W[:, restore], mask[:, restore]
        return SolveResult(laid_out_like(W, weight), laid_out_like(mask, weight), row_error.double().sum().item() / 2,
                           row_error)


def laid_out_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x with `like`'s strides (a copy only if they differ): a solve gives its weights back in the layout they came in,
    row-major from a Linear, columns first from the clip search's stacked sample (the layout the CPU's sweep uses)."""
    return x if x.stride() == like.stride() else torch.empty_like(like, dtype=x.dtype).copy_(x)


def solve_order(hessian_diag: torch.Tensor, mode: str, bits: torch.Tensor | None = None,
                unit: int = 128) -> torch.Tensor | None:
    """The column order for the solver (None: as stored).

    "act": GPTQ's act order solves the columns whose rounding would cost most if nothing compensated it
    first, so that the most columns are left to absorb it. That cost is H_jj times the grid's squared
    step, 4^-b_j: the loudest channels (largest H_jj) first at one width, and with mixed widths a coarse
    channel before a fine one of the same energy.
    "narrow_first": within each run of `unit` consecutive columns (a block of the unstructured mask, an
    N:M group), the narrower widths first, in stored order otherwise. Each unit keeps its columns, so the
    mask chooses among the same weights as in stored order (act order moves them, which loses with
    sparsity), while a coarse column's error lands on the finer columns of its own unit before the later
    units. As stored when every column has one width."""
    if mode not in SOLVE_ORDERS:
        raise ValueError(f"unknown solve order {mode!r}; one of {SOLVE_ORDERS}")
    if mode == "stored":
        return None
    if mode == "act":
        key = hessian_diag.float()
        if bits is not None:
            key = key * torch.pow(4.0, -bits.to(key.device, torch.float32))
        return torch.argsort(key, descending=True, stable=True)
    if bits is None or bool((bits == bits[0]).all()):
        return None
    bits = bits.to(hessian_diag.device, torch.int64)
    unit_index = torch.arange(bits.numel(), device=bits.device) // unit
    return torch.argsort(unit_index * (int(bits.max()) + 1) + bits, stable=True)


BlockParams = Callable[[torch.Tensor, int, int], "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None"]


def block_loop(W: torch.Tensor, U: torch.Tensor, settings: SolveSettings, row_groups: int,
               block_params: BlockParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lazy-block sweep over W's columns with the upper factor U of H^-1, both in solve order: each block of
    `settings.blocksize` solved, its error pushed onto the columns after it. `block_params(W, i1, i2)` gives the grid
    of columns [i1, i2) (None: no quantization). Returns (W, mask, each row's error as in `SolveResult.row_error`);
    W may be modified in place; nothing here waits for the device.

    With the fused kernel (CUDA) each block is solved row-major (`solve_block`). Otherwise the whole sweep runs on the
    transposed matrix, where each column is a contiguous row for the column loop and no block is transposed back and
    forth (the block product then reads U's transpose: the same sums)."""
    columns, blocksize = W.shape[1], settings.blocksize
    row_error = torch.zeros(W.shape[0], device=W.device)
    if settings.fused and W.is_cuda and kernels.is_available():
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            Q1, Err1, mask[:, i1:i2], _ = solve_block(W[:, i1:i2].clone(), U[i1:i2, i1:i2], settings.prune,
                                                      block_params(W, i1, i2), True, row_groups,
                                                      settings.inner_blocksize)
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
            row_error += Err1.square().sum(1)
        return W, mask, row_error
    WT = W.t().contiguous()
    MT = torch.zeros_like(WT, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        params = block_params(WT.t(), i1, i2)
        MT[i1:i2] = block_mask(WT[i1:i2], d, settings.prune, row_groups)
        ET1 = column_loop(WT[i1:i2], d, U1, MT[i1:i2], settings.prune, params, settings.inner_blocksize)
        WT[i2:] -= U[i1:i2, i2:].t().matmul(ET1)
        row_error += ET1.square().sum(0)
    return WT.t(), MT.t(), row_error


def grid_params(grid: QuantGrid | None, bits: torch.Tensor | None, blocksize: int) -> BlockParams:
    """`block_loop`'s grid for a solve: a grouped grid's ranges come from the weights as the solve has left them
    when the block starts; an ungrouped grid's parameters are made for GRID_SPAN_BLOCKS blocks at once."""
    if grid is None:
        return lambda W, i1, i2: None
    if grid.grouped:
        def grouped(W: torch.Tensor, i1: int, i2: int):
            grid.fill_groups(W, i1, i2)
            return grid.column_params(i1, i2, bits[i1:i2])
        return grouped
    span: list = []  # [start, stop, params] of the span the current block lies in

    def ungrouped(W: torch.Tensor, i1: int, i2: int):
        if not span or i2 > span[1]:
            stop = min(i1 + GRID_SPAN_BLOCKS * blocksize, W.shape[1])
            span[:] = [i1, stop, grid.column_params(i1, stop, bits[i1:stop])]
        return tuple(p[..., i1 - span[0]:i2 - span[0]] for p in span[2])
    return ungrouped


def sliced_params(params: tuple[torch.Tensor, ...]) -> BlockParams:
    """`block_loop`'s grid from (scale, zero, maxq) made for every column at once; () for no quantization."""
    if not params:
        return lambda W, i1, i2: None
    return lambda W, i1, i2: tuple(p[..., i1:i2] for p in params)


def unstructured_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float, row_groups: int = 1) -> torch.Tensor:
    """Exactly floor(numel * sparsity) weights of the block with the smallest OBS score w^2 / d^2 (of each of
    `row_groups` equal slices of its rows, with more than one).

    Scores tie often (fp16 weights of one column share a d; dead channels' weights are all 0). On the GPU a radix sort
    picks the set, and its order among ties; on the CPU a selection (`selected_mask`)."""
    if not W1.is_cuda:
        return selected_mask(W1.t(), d, sparsity, row_groups).t()
    score = (W1 ** 2 / d[None, :] ** 2).reshape(row_groups, -1)
    k = int(score.shape[1] * sparsity)
    if k == 0:
        return torch.zeros_like(W1, dtype=torch.bool)
    # far faster than topk for k ~ numel/2
    order = torch.sort(score[0]).indices[None] if row_groups == 1 else torch.sort(score, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, :k], True).view(W1.shape)


def selected_mask(WT1: torch.Tensor, d: torch.Tensor, sparsity: float, row_groups: int) -> torch.Tensor:
    """`unstructured_mask` on the CPU, for a transposed block (columns, rows), the mask as (columns, rows): each slice's
    threshold by a selection (numpy's introselect: the same value as torch.kthvalue, 5x faster on the clip search's
    stacked blocks, which is 25x faster than a sort), and ties at the threshold going to the first in row-major order."""
    columns, rows = WT1.shape
    score = (WT1 ** 2 / d[:, None] ** 2).view(columns, row_groups, -1)
    k = int(score[:, 0].numel() * sparsity)
    if k == 0:
        return torch.zeros_like(WT1, dtype=torch.bool)
    values = score.transpose(0, 1).reshape(row_groups, -1)  # each slice's scores, in any order
    threshold = torch.from_numpy(np.partition(values.numpy(), k - 1, axis=1)[:, k - 1]).view(1, row_groups, 1)
    mask = score <= threshold
    if bool((mask.sum((0, 2)) == k).all()):  # every score at the threshold is taken (no tie past the k-th)
        return mask.reshape(columns, rows)
    mask = score < threshold  # some ties at the threshold stay: the first in row-major order are taken
    tied = score == threshold
    in_row_order = tied.permute(1, 2, 0).reshape(row_groups, -1)
    taken = in_row_order & (in_row_order.cumsum(1) <= (k - mask.sum((0, 2)))[:, None])
    return (mask | taken.view(row_groups, -1, columns).permute(2, 0, 1)).reshape(columns, rows)


def block_mask(WT1: torch.Tensor, d: torch.Tensor, prune: PruneSpec, row_groups: int) -> torch.Tensor:
    """A transposed block's unstructured mask (columns, rows), chosen before its column loop (all False otherwise: N:M
    is chosen in the loop)."""
    if prune.prunen == 0 and prune.sparsity > 0:
        return unstructured_mask(WT1.t(), d, prune.sparsity, row_groups).t()
    return torch.zeros(WT1.shape, dtype=torch.bool, device=WT1.device)


def solve_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    prune: PruneSpec,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    fused: bool = True,
    row_groups: int = 1,
    inner_blocksize: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row-major block: its unstructured mask, then the sequential column loop, as one Triton kernel
    launch on CUDA (`kernels.py`) or in plain PyTorch. Returns (Q1, Err1, mask1, error) with the
    error as a 0-d tensor, so that the caller syncs once, not once per block."""
    d = torch.diag(U1)
    mask1 = block_mask(W1.t(), d, prune, row_groups).t()
    if fused and W1.is_cuda and kernels.is_available() and kernels.supports(W1.shape[1], prune.prunen, prune.prunem):
        return kernels.solve_block_fused(W1, U1, mask1, prune.prunen, prune.prunem, params)
    WT, MT = W1.t().contiguous(), mask1.t().contiguous()
    ET = column_loop(WT, d, U1, MT, prune, params, inner_blocksize)
    mask1.copy_(MT.t())
    return WT.t(), ET.t(), mask1, ET.square().sum() / 2


def column_loop(
    WT: torch.Tensor, d: torch.Tensor, U1: torch.Tensor, MT: torch.Tensor, prune: PruneSpec,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, inner_blocksize: int = 0,
) -> torch.Tensor:
    """The reference loop on a transposed block (columns, rows), where each column is a contiguous row (a row-major
    column is a strided gather: 1.2-1.4x slower on the CPU): per column, (N:M mask), zero the pruned, round, and push
    the error err = (w - q) / d onto the columns to its right. Every value is the same as row-major, the rank-1
    update being one product per element. WT becomes Q and MT the mask (N:M), in place; returns the errors ET.
    `params`: the block's (scale, zero, maxq) as the grid gives them, rows first (`columns_first` turns them).

    `inner_blocksize` > 0 pushes each column's error only onto the later columns of its inner block (that many
    columns, rounded up to whole N:M groups), by one fused rank-1 update; when an inner block starts, every earlier
    column's error reaches it by one matrix product, as the lazy blocks do across blocks: the same solve up to the
    order of summation, most of the rank-1 updates' reads and writes (the clip search's tall stacks) in products."""
    ET = torch.empty_like(WT)
    # A product with the kept weights zeroes the pruned ones (1.5x faster than where() on the bool mask at the clip
    # search's 3,840 rows); a pruned negative weight becomes -0.0, which rounding turns into +0.0 on every grid.
    keep = (~MT).float() if params is not None else None
    if params is not None:
        scale, zero, maxq = (columns_first(p) for p in params)
    columns = WT.shape[0]
    inner = columns if inner_blocksize <= 0 else -(-inner_blocksize // max(prune.prunem, 1)) * max(prune.prunem, 1)
    for i in range(columns):
        if i % inner == 0 and i > 0:  # every earlier column's error, onto this inner block's columns
            WT[i:i + inner] -= U1[:i, i:i + inner].t().matmul(ET[:i])
        end = min(i - i % inner + inner, columns)
        w = WT[i]
        if prune.prunen > 0 and i % prune.prunem == 0:
            score = WT[i:i + prune.prunem] ** 2 / d[i:i + prune.prunem, None] ** 2
            MT.scatter_(0, i + torch.topk(score, prune.prunen, dim=0, largest=False).indices, True)
            if keep is not None:
                keep[i:i + prune.prunem] = ~MT[i:i + prune.prunem]
        if params is not None:
            q = quantize(w * keep[i], scale[i], zero[i], maxq[i])
        else:
            q = torch.where(MT[i], 0.0, w)
        torch.sub(w, q, out=ET[i]).div_(d[i])
        if inner < columns:  # inner blocks: one fused rank-1 update, each value rounded once
            WT[i + 1:end].addr_(U1[i, i + 1:end], ET[i], alpha=-1)
        else:  # the reference's product, then the difference
            WT[i + 1:end] -= U1[i, i + 1:end, None] * ET[i][None, :]
        w.copy_(q)
    return ET


def columns_first(p: torch.Tensor) -> torch.Tensor:
    """A block's parameters (rows, columns) as one contiguous row per column; parameters that every column shares
    (a view with column stride 0: per-row grids) stay a view, not copied once per column."""
    if p.dim() < 2:
        return p
    if p.stride(1) == 0:
        return p[:, :1].t().expand(p.shape[1], -1)
    return p.t().contiguous()


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

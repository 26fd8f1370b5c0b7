"""One-launch Triton kernel for the sequential column loop of one SparseGPT/GPTQ block.

`solve_block_fused` computes what `sparsegpt_enhanced.solve_block` computes -- for each column i
of the block: (N:M) choose the pruned entries of every group of `prunem` columns, zero the pruned
entries, optionally quantize with that column's per-row scale/zero and maxq, then
err = (w - q) / d_i and W[:, i:] -= err (x) U[i, i:] -- but in a single kernel launch per block
instead of ~18 launches per column.

Layout of the work: rows are independent, so each program owns a tile of BLOCK_R rows and keeps
that tile of the whole block in registers (up to 4 chunks of BLOCK_R x CW columns) while it walks
the columns in order, in steps of UN columns (4, or prunem for N:M):
  * at the start of a step, everything the step reads besides W is loaded at once (U's rows,
    d, scale/zero/maxq, mask entries) and the step's UN columns are read out of the tile;
  * inside the step, each column is pruned/quantized and its error carried into the step's later
    columns as vectors (one multiply-subtract each), so the sequential chain per column is short;
  * at the end of the step the tile gets the step's rank-1 updates, column by column, only in the
    chunks at or right of the step (column i never changes columns left of it).
Column i of the final tile therefore still holds w_i, the weights as they were when column i was
solved, and Q1, Err1 and the loss are recomputed from it at the end (bit for bit what the loop
used) and stored as coalesced tiles; the pruning mask travels as one bit per column per row.

Numerics: every operation is done in the order and with the rounding of the PyTorch path:
correctly rounded division (div.rn), round-half-to-even (rint), and no FMA contraction
(`enable_fp_fusion=False`), so that (w - err * u) is rounded twice exactly as PyTorch's separate
outer product and subtraction are; Q1, Err1 and the mask come out bit-identical to solve_block's.
The only differences left are the order of the summation of the error (solve_block sums each row
over the columns, then the rows; here each program sums its tile, then the programs' partial
sums are added in float64) and, for N:M, which of several exactly equal scores is pruned (the
lowest column here; torch.topk does not specify it), which only matters for ties such as
all-zero (dead) columns.

Compilations: Triton compiles the kernel once per distinct set of constexprs (column chunking,
steps, N:M or not, mask, quantization, the row tile) and specialisation of `count` and U's strides,
and keeps each on disk. A run compiles one variant, and one more for a ragged last block (columns not
a multiple of the blocksize); `variant` spells the key out and test_kernels counts it for the OPT
shapes. The row count and N (of N:M) are runtime arguments, not specialised. The column loop's code
is repeated per chunk, and over 90% of the compilation's TTGIR stage is Triton's coalescing pass, which
walks the whole unrolled kernel once for each of its loads and stores: with four chunks (~2300 TTIR ops,
~170 loads and stores) one compilation for sm_90 took 5.3 s of CPU on the 2-core development machine
(Triton 3.7.1; its compiler runs without a GPU) and 7.5 s on the H200's host; with two chunks, the
default, 2.3 s and 1.8 s.

The module imports on machines without CUDA or Triton: `is_available()` then says False and
`solve_block_fused` raises. Triton is imported only when a CUDA device is present (or when
TRITON_INTERPRET=1 asks for Triton's CPU interpreter, which the developers use for debugging).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

triton = None
tl = None
libdevice = None
_IMPORT_ERROR: Exception | None = None
try:
    if not (_INTERPRET or torch.cuda.is_available()):
        raise ImportError("no CUDA device")
    import triton  # noqa: F811
    import triton.language as tl  # noqa: F811

    try:
        from triton.language.extra import libdevice  # noqa: F811
    except ImportError:  # older Triton layouts
        from triton.language.extra.cuda import libdevice  # noqa: F811
except Exception as exc:  # noqa: BLE001 - any failure means "no fused path"
    triton = None
    _IMPORT_ERROR = exc


def is_available() -> bool:
    """True when Triton imports and a CUDA device is present (the fused path can run)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


CHUNKS = 2  # column chunks (register tiles) per block where it can be: four compiled 4x slower (_chunking)
MAX_CHUNKS = 4  # and never more (a chunk is one register tile, and one copy of the column loop's code)
MAX_CHUNK = 64  # columns per chunk at most (the pruning mask of a chunk is kept as one int64 per row)
UNROLL = 4  # columns per step of the column loop when not N:M (their loads are issued together)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _chunking(count: int, prunem: int, chunks: int = CHUNKS) -> tuple[int, int] | None:
    """(CW, NCH): chunk width (a power of two, 16 to MAX_CHUNK) and number of chunks covering `count`
    columns, about `chunks` of them (more where a chunk would be wider than MAX_CHUNK), or None when the
    kernel does not handle this block shape.

    Fewer chunks compile faster (the code of the column loop is repeated per chunk, and Triton's coalescing
    pass grows with the square of the code) but skip less work: columns left of the step are never updated,
    and a chunk is skipped only when all of it lies left. N:M groups must not straddle chunks; when prunem does
    not divide the chunk width, one chunk.
    """
    cw = min(MAX_CHUNK, max(16, _next_pow2(-(-count // chunks))))
    if prunem > 0 and cw % prunem != 0:
        cw = max(16, _next_pow2(count))
    nch = -(-count // cw)
    if cw > MAX_CHUNK or nch > MAX_CHUNKS or (prunem > 0 and prunem > 16):
        return None
    return cw, nch


def supports(count: int, prunen: int = 0, prunem: int = 0) -> bool:
    """Whether `solve_block_fused` handles a block of `count` columns with this N:M pattern:
    count <= 256 (blocksize 128, the default, always is), and for N:M prunem <= 16 and either a
    power of two or count <= 64. Callers fall back to `solve_block` otherwise."""
    return count >= 1 and _chunking(count, prunem if prunen > 0 else 0) is not None


def _default_config(cw: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps): one-warp programs with two rows per thread.

    Triton lays a (BLOCK_R, CW) fp32 tile out as 4 columns per thread and CW / 4 threads per row,
    so a warp covers 128 / CW rows. With 128-column blocks in two chunks of 64 (`CHUNKS`), per block on
    an H200 (`TRITON_CACHE_DIR=$(mktemp -d) python test_kernels.py --chunks`), ms at 384 / 2048 / 8192 /
    49152 rows: two rows per thread 0.12 / 0.13 / 0.20 / 1.12, one row 0.09 / 0.10 / 0.33 / 1.69; four
    chunks (the former default) 0.14 / 0.12 / 0.18 / 1.00, but a compilation of 7.5 s against 1.8. The
    block's time matters where there are many rows and many blocks (big models); a second tile chosen by
    row count would compile a second variant for every model whose Linears straddle the switch.
    """
    return max(1, 256 // cw), 1


# The kernel's integer arguments, in order. Triton specialises on each (one compilation for the value 1, one
# for a multiple of 16, one for the rest) unless told not to: `rows` only bounds the row mask and `prunen` is
# one comparison, so a specialisation gains nothing there; `count` (the row stride of every tile: its
# divisibility lets the tile loads vectorise) and U's strides (fixed for a run: cholesky_ex's column-major
# layout) keep theirs.
INT_ARGS = ("rows", "count", "su0", "su1", "prunen")
DO_NOT_SPECIALIZE = ("rows", "prunen")


@dataclass(frozen=True)
class Tuning:
    """The launch's tunable choices; None: the defaults for the block's chunk width (`_default_config`).
    Only the benchmarks in test_kernels.py set them."""

    block_rows: int | None = None
    num_warps: int | None = None
    unroll: int = UNROLL
    chunks: int = CHUNKS


DEFAULT_TUNING = Tuning()


def launch_config(count: int, prunen: int, prunem: int, has_mask: bool, quant: bool,
                  tuning: Tuning = DEFAULT_TUNING) -> dict[str, int | bool]:
    """The kernel's compile-time parameters for one block (its constexprs and num_warps); Triton
    compiles one kernel per distinct set (see `variant`). The row count is not among them: every row count
    runs on the same tile. ValueError for a block the kernel does not handle (see `supports`)."""
    nm = prunen > 0
    chunking = _chunking(count, prunem if nm else 0, tuning.chunks)
    if chunking is None:
        raise ValueError(f"solve_block_fused: unsupported block (count={count}, prunem={prunem}, "
                         f"chunks={tuning.chunks}); see supports()")
    cw, nch = chunking
    br, nw = _default_config(cw)
    return {"BLOCK_R": tuning.block_rows or br, "CW": cw, "NCH": nch, "UN": prunem if nm else tuning.unroll,
            "NM": nm, "HAS_MASK": not nm and has_mask, "QUANT": quant, "num_warps": tuning.num_warps or nw}


def variant(rows: int, count: int, prunen: int, prunem: int, has_mask: bool, quant: bool,
            u_strides: tuple[int, int]) -> tuple:
    """What a launch compiles as far as the shapes decide it: the constexprs, and how Triton
    specialises the integer arguments it specialises on (equal to 1, a multiple of 16). Pointer
    alignment is left out: solve_block passes fresh tensors and 128-column-aligned views of U.
    Blocks with equal variants share one compilation per process (and one cached on disk)."""
    values = dict(zip(INT_ARGS, (rows, count, *u_strides, prunen)))
    return (tuple(sorted(launch_config(count, prunen, prunem, has_mask, quant).items())),
            tuple((name, v == 1, v % 16 == 0) for name, v in values.items() if name not in DO_NOT_SPECIALIZE))


if triton is not None:
    _INF = tl.constexpr(float("inf"))

    @triton.jit
    def _rint(x, INTERPRET: tl.constexpr):
        # Round half to even. The interpreter has no libdevice; there the classic 1.5 * 2^23 trick
        # (exact for |x| < 2^22, plenty for quantization codes) stands in for it.
        if INTERPRET:
            r = (x + 12582912.0) - 12582912.0
        else:
            r = libdevice.rint(x)
        return r

    @triton.jit
    def _quantize(x, s, z, mq, INTERPRET: tl.constexpr):
        """quant.quantize: clamp(round(x / s) + z, 0, mq), then s * (q - z)."""
        q = _rint(tl.math.div_rn(x, s), INTERPRET) + z
        q = tl.minimum(tl.maximum(q, 0.0), mq)
        return s * (q - z)

    @triton.jit
    def _column(T, cc, j):
        """Column j of a register tile, as a vector over its rows (exact: the other terms are 0)."""
        return tl.sum(tl.where(cc[None, :] == j, T, 0.0), axis=1)

    @triton.jit
    def _load_tile(ptr, r_off, rmask, col, count, other):
        return tl.load(ptr + r_off[:, None] + col[None, :], mask=rmask[:, None] & (col < count)[None, :], other=other)

    @triton.jit
    def _load_u(U_ptr, su0, su1, i, count, base, cc, rzero, DIAG: tl.constexpr):
        """U[i, base + cc] for every row of the tile (the same addresses, so L1 broadcasts), zero
        at and left of the diagonal. Loading it at the tile's own shape gives it the tile's
        register layout, so no layout conversion sits in the column loop."""
        col = base + cc
        u = tl.load(U_ptr + i * su0 + rzero[:, None] + col[None, :] * su1,
                    mask=(col < count)[None, :] & (i < count), other=0.0)
        if DIAG:  # only the chunk that holds column i has entries at or left of the diagonal
            u = tl.where(col[None, :] > i, u, 0.0)
        return u

    @triton.jit
    def _finish_chunk(T, bits, base, cc, r_off, rmask, count, U_ptr, sud, M_ptr, S_ptr, Z_ptr, MQ_ptr,
                      Q_ptr, E_ptr, BLOCK_R: tl.constexpr, CW: tl.constexpr, PRUNE: tl.constexpr,
                      STORE_MASK: tl.constexpr, QUANT: tl.constexpr, INTERPRET: tl.constexpr):
        """Q, Err and the loss of one chunk from its final tile.

        Column i of the final tile holds w_i, the weights as they were when column i was solved
        (only columns right of i are updated by column i), so this recomputes, bit for bit, the q
        and err the column loop used, and stores them coalesced.
        """
        col = base + cc
        cmask = col < count
        ok = rmask[:, None] & cmask[None, :]
        x = T
        if PRUNE:
            pruned = ((bits[:, None] >> cc.to(tl.int64)[None, :]) & 1) != 0
            x = tl.where(pruned, 0.0, T)
            if STORE_MASK:
                tl.store(M_ptr + r_off[:, None] + col[None, :], pruned.to(tl.uint8), mask=ok)
        if QUANT:
            s = _load_tile(S_ptr, r_off, rmask, col, count, 1.0)
            z = _load_tile(Z_ptr, r_off, rmask, col, count, 0.0)
            mq = tl.load(MQ_ptr + col, mask=cmask, other=0.0)
            q = _quantize(x, s, z, tl.broadcast_to(mq[None, :], [BLOCK_R, CW]), INTERPRET)
        else:
            q = x
        d = tl.broadcast_to(tl.load(U_ptr + col * sud, mask=cmask, other=1.0)[None, :], [BLOCK_R, CW])
        diff = T - q
        err = tl.math.div_rn(diff, d)
        tl.store(Q_ptr + r_off[:, None] + col[None, :], q, mask=ok)
        tl.store(E_ptr + r_off[:, None] + col[None, :], err, mask=ok)
        return tl.sum(tl.sum(tl.math.div_rn(diff * diff, d * d), axis=1), axis=0)

    @triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
    def _solve_block_kernel(
        W_ptr, U_ptr, M_ptr, S_ptr, Z_ptr, MQ_ptr, Q_ptr, E_ptr, L_ptr,
        rows, count, su0, su1, prunen,
        BLOCK_R: tl.constexpr, CW: tl.constexpr, NCH: tl.constexpr, UN: tl.constexpr,
        NM: tl.constexpr, HAS_MASK: tl.constexpr, QUANT: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < rows
        r_off = r.to(tl.int64) * count  # W, Q, Err, mask, scale, zero are contiguous (rows, count)
        rzero = tl.zeros([BLOCK_R], dtype=tl.int32)
        cc = tl.arange(0, CW)
        sud = su0 + su1  # stride of U's diagonal
        PRUNE: tl.constexpr = NM or HAS_MASK

        # the row tile of the block, in up to four register chunks of CW columns
        W0 = _load_tile(W_ptr, r_off, rmask, 0 * CW + cc, count, 0.0)
        W1 = W0
        W2 = W0
        W3 = W0
        if NCH > 1:
            W1 = _load_tile(W_ptr, r_off, rmask, 1 * CW + cc, count, 0.0)
        if NCH > 2:
            W2 = _load_tile(W_ptr, r_off, rmask, 2 * CW + cc, count, 0.0)
        if NCH > 3:
            W3 = _load_tile(W_ptr, r_off, rmask, 3 * CW + cc, count, 0.0)
        # the pruning mask of each chunk, one bit per column
        B0 = tl.zeros([BLOCK_R], dtype=tl.int64)
        B1 = B0
        B2 = B0
        B3 = B0

        for c in tl.static_range(NCH):
            if c == NCH - 1:
                end = count
            else:
                end = (c + 1) * CW  # chunks before the last are full
            for g in range(c * CW, end, UN):
                # everything the UN columns of this step read besides W, loaded up front
                ds = ()
                ss = ()
                zs = ()
                mqs = ()
                ms = ()
                u0s = ()
                u1s = ()
                u2s = ()
                u3s = ()
                for j in tl.static_range(UN):
                    i = g + j
                    valid = i < count
                    ok = rmask & valid
                    ds = ds + (tl.load(U_ptr + i * sud + rzero, mask=valid, other=1.0),)
                    if QUANT:
                        ss = ss + (tl.load(S_ptr + r_off + i, mask=ok, other=1.0),)
                        zs = zs + (tl.load(Z_ptr + r_off + i, mask=ok, other=0.0),)
                        mqs = mqs + (tl.load(MQ_ptr + i + rzero, mask=valid, other=0.0),)
                    if HAS_MASK:
                        ms = ms + (tl.load(M_ptr + r_off + i, mask=ok, other=0) != 0,)
                    if c <= 0:
                        u0s = u0s + (_load_u(U_ptr, su0, su1, i, count, 0 * CW, cc, rzero, c == 0),)
                    if NCH > 1 and c <= 1:
                        u1s = u1s + (_load_u(U_ptr, su0, su1, i, count, 1 * CW, cc, rzero, c == 1),)
                    if NCH > 2 and c <= 2:
                        u2s = u2s + (_load_u(U_ptr, su0, su1, i, count, 2 * CW, cc, rzero, c == 2),)
                    if NCH > 3:
                        u3s = u3s + (_load_u(U_ptr, su0, su1, i, count, 3 * CW, cc, rzero, c == 3),)
                # the step's UN columns as they are now, read out of the tile together; within the
                # step they are kept up to date as vectors, so the sequential chain per column is
                # only quantize -> err -> one multiply-subtract, and the tile is updated once a step
                vs = ()
                for j in tl.static_range(UN):
                    if c == 0:
                        vj = _column(W0, cc, g + j - c * CW)
                    elif c == 1:
                        vj = _column(W1, cc, g + j - c * CW)
                    elif c == 2:
                        vj = _column(W2, cc, g + j - c * CW)
                    else:
                        vj = _column(W3, cc, g + j - c * CW)
                    vs = vs + (vj,)
                if NM:
                    # N:M (UN == prunem): scores w^2 / d^2 of the group's columns as they are at
                    # the group's first column; columns past the block score +inf
                    scores = ()
                    for j in tl.static_range(UN):
                        sj = tl.math.div_rn(vs[j] * vs[j], ds[j] * ds[j])
                        scores = scores + (tl.where(g + j < count, sj, _INF),)
                es = ()
                for j in tl.static_range(UN):
                    i = g + j
                    w = vs[j]
                    x = w
                    if PRUNE:
                        if NM:
                            # pruned if fewer than prunen scores of the group rank below it
                            # (ties go to the lower column)
                            below = tl.zeros([BLOCK_R], dtype=tl.int32)
                            for k in tl.static_range(UN):
                                if k < j:
                                    below += (scores[k] <= scores[j]).to(tl.int32)
                                elif k > j:
                                    below += (scores[k] < scores[j]).to(tl.int32)
                            pruned = below < prunen
                        else:
                            pruned = ms[j]
                        x = tl.where(pruned, 0.0, w)
                        bit = (pruned & (i < count)).to(tl.int64) << ((i - c * CW) & (CW - 1)).to(tl.int64)
                        if c == 0:
                            B0 = B0 | bit
                        elif c == 1:
                            B1 = B1 | bit
                        elif c == 2:
                            B2 = B2 | bit
                        else:
                            B3 = B3 | bit
                    if QUANT:
                        q = _quantize(x, ss[j], zs[j], mqs[j], INTERPRET)
                    else:
                        q = x
                    e = tl.math.div_rn(w - q, ds[j])
                    es = es + (e,)
                    # the later columns of the step get this column's update now (the same
                    # multiply and subtract the tile update below does to them)
                    nv = ()
                    for k in tl.static_range(UN):
                        if k > j:
                            ujk = tl.load(U_ptr + i * su0 + (g + k) * su1 + rzero, mask=g + k < count, other=0.0)
                            nv = nv + (vs[k] - e * ujk,)
                        else:
                            nv = nv + (vs[k],)
                    vs = nv
                # the step's rank-1 updates of the tile, in column order (so every element sees
                # exactly the sequence of roundings of the column-by-column loop)
                for j in tl.static_range(UN):
                    e2 = es[j][:, None]
                    if c <= 0:
                        W0 = W0 - e2 * u0s[j]
                    if NCH > 1 and c <= 1:
                        W1 = W1 - e2 * u1s[j]
                    if NCH > 2 and c <= 2:
                        W2 = W2 - e2 * u2s[j]
                    if NCH > 3:
                        W3 = W3 - e2 * u3s[j]

        loss = _finish_chunk(W0, B0, 0 * CW, cc, r_off, rmask, count, U_ptr, sud, M_ptr, S_ptr, Z_ptr, MQ_ptr,
                             Q_ptr, E_ptr, BLOCK_R, CW, PRUNE, NM, QUANT, INTERPRET)
        if NCH > 1:
            loss += _finish_chunk(W1, B1, 1 * CW, cc, r_off, rmask, count, U_ptr, sud, M_ptr, S_ptr, Z_ptr, MQ_ptr,
                                  Q_ptr, E_ptr, BLOCK_R, CW, PRUNE, NM, QUANT, INTERPRET)
        if NCH > 2:
            loss += _finish_chunk(W2, B2, 2 * CW, cc, r_off, rmask, count, U_ptr, sud, M_ptr, S_ptr, Z_ptr, MQ_ptr,
                                  Q_ptr, E_ptr, BLOCK_R, CW, PRUNE, NM, QUANT, INTERPRET)
        if NCH > 3:
            loss += _finish_chunk(W3, B3, 3 * CW, cc, r_off, rmask, count, U_ptr, sud, M_ptr, S_ptr, Z_ptr, MQ_ptr,
                                  Q_ptr, E_ptr, BLOCK_R, CW, PRUNE, NM, QUANT, INTERPRET)
        tl.store(L_ptr + pid, loss * 0.5)


def solve_block_fused(
    W1: torch.Tensor,
    U1: torch.Tensor,
    mask1: torch.Tensor | None,
    prunen: int,
    prunem: int,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    tuning: Tuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column loop of one block in one kernel launch; same results as `solve_block`.

    W1 (rows, count) fp32 CUDA: the block's current weights (not modified, unlike solve_block).
    U1 (count, count) fp32: upper Cholesky factor block (only U1[i, i:] is read; any strides).
    mask1 (rows, count) bool: with prunen == 0, the precomputed mask (all False when not pruning;
        None means all False); with prunen > 0 it is overwritten with the N:M mask the kernel chooses.
    params: (scale, zero) (rows, count) fp32 and maxq (count,) fp32, the per-column grids; None: no quantization.

    Returns (Q1, Err1, mask1, error): Q1 and Err1 (rows, count) fp32 contiguous, the final mask
    (the same tensor as mask1 when it was contiguous), and error = sum((w - q)^2 / d^2) / 2 as a
    0-d float64 CUDA tensor: no host sync here, `float(error)` syncs (once per layer, say).
    """
    if not is_available():
        raise RuntimeError(f"solve_block_fused needs Triton and a CUDA device ({_IMPORT_ERROR})")
    rows, count = W1.shape
    assert U1.shape == (count, count), "U1 must be (count, count)"
    quant = params is not None
    scale, zero, maxq = params if quant else (None, None, None)
    dev = W1.device
    W1 = W1.float().contiguous()
    U1 = U1.float()
    has_mask = mask1 is not None
    if mask1 is None:
        mask1 = torch.zeros(rows, count, dtype=torch.bool, device=dev)
    elif not mask1.is_contiguous():
        mask1 = mask1.contiguous()
    nm = prunen > 0
    if nm and prunen > prunem:
        raise ValueError("prunen must not exceed prunem")
    if quant:
        scale = scale.float().contiguous()
        zero = zero.float().contiguous()
        maxq = maxq.float().contiguous()
        assert scale.shape == (rows, count) and zero.shape == (rows, count) and maxq.shape == (count,)
    else:
        scale = zero = maxq = W1  # never read (QUANT is off)
    Q1, Err1 = torch.empty((2, rows, count), dtype=torch.float32, device=dev).unbind(0)
    if rows == 0 or count == 0:
        return Q1, Err1, mask1, torch.zeros((), dtype=torch.float64, device=dev)

    meta = launch_config(count, prunen, prunem, has_mask, quant, tuning)
    programs = triton.cdiv(rows, meta["BLOCK_R"])
    partial = torch.empty(programs, dtype=torch.float32, device=dev)
    _solve_block_kernel[(programs,)](
        W1, U1, mask1.view(torch.uint8), scale, zero, maxq, Q1, Err1, partial,
        rows, count, U1.stride(0), U1.stride(1), prunen if nm else 0,
        **meta, INTERPRET=_INTERPRET, num_stages=1, enable_fp_fusion=False,
    )
    return Q1, Err1, mask1, partial.sum(dtype=torch.float64)

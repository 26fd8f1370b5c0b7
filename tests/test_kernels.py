"""Tests of the fused Triton block solver against the PyTorch path (sparsegpt_enhanced.solve_block).

The GPU comparisons are skipped without CUDA (CI has Triton but no GPU: test_triton_interpret.py checks
the same kernel there, bit for bit, through Triton's CPU interpreter); on a GPU machine run
    python -m pytest -q -s test_kernels.py      # comparisons, one summary line per case
    python test_kernels.py                      # per-block timings, solve_block vs solve_block_fused
    python test_kernels.py --row-tiles          # per-block timings of one and two rows per thread
    TRITON_CACHE_DIR=$(mktemp -d) python test_kernels.py --chunks   # compile and per-block times by chunking
"""
from __future__ import annotations

import math
import sys
import time

import pytest
import torch

from quant import QuantGrid
from sparsegpt_enhanced import PruneSpec, SparseGPT, solve_block, unstructured_mask
from systems import kernels

OPTIONS = [2, 3, 4, 6, 8]
gpu = pytest.mark.skipif(not kernels.is_available(), reason="needs a CUDA device and Triton")
# with TRITON_INTERPRET=1 (Triton installed, no GPU) the same tests run slowly on the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- CPU (always runs)


def test_import_and_supports_without_gpu():
    """`import kernels` works everywhere; shape support is decided without Triton."""
    assert kernels.supports(128)
    assert kernels.supports(77)
    assert kernels.supports(256, 2, 4)
    assert kernels.supports(48, 1, 3)  # non-power-of-two M: one chunk, so count <= 64
    assert not kernels.supports(128, 1, 3)
    assert not kernels.supports(512)
    if not kernels.is_available():
        with pytest.raises(RuntimeError):
            kernels.solve_block_fused(torch.zeros(2, 4), torch.eye(4), None, 0, 0, None)


# ---------------------------------------------------------------- GPU comparisons


# hidden, ffn of OPT shapes, and how many kernel variants a 50% + 4-bit run compiles for them
OPT_VARIANTS = {"opt-125m": (768, 3072, 1), "opt-1.3b": (2048, 8192, 1), "opt-6.7b": (4096, 16384, 1),
                "opt-13b": (5120, 20480, 1), "opt-175b": (12288, 49152, 1)}


@pytest.mark.parametrize("shape", list(OPT_VARIANTS))
def test_kernel_variants_a_run_compiles(shape):
    """Every 128-column block of a decoder layer (q, k, v, out: hidden x hidden; fc1: ffn x hidden;
    fc2: hidden x ffn; and the load-time warm-up, hidden x hidden) with U as inverse_factor lays it
    out: one kernel variant for every row count, odd ones and another N included."""
    hidden, ffn, expected = OPT_VARIANTS[shape]
    solver = SparseGPT(40)
    solver.add_batch(torch.randn(200, 40))
    assert solver.inverse_factor(0.01).upper.stride() == (1, 40)  # column-major, as cholesky_ex gives it
    linears = [(hidden, hidden)] * 5 + [(ffn, hidden), (hidden, ffn)]
    variants = {kernels.variant(rows, 128, 0, 0, True, True, (1, columns)) for rows, columns in linears}
    assert len(variants) == expected
    assert kernels.variant(13, 128, 0, 0, True, True, (1, 48)) == kernels.variant(16, 128, 0, 0, True, True, (1, 48))
    assert len({kernels.variant(hidden, 128, n, 4, False, True, (1, hidden)) for n in (1, 2, 3)}) == 1  # N of 4


def make_block(rows: int, count: int, seed: int, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight block and the upper Cholesky factor of a damped inverse of a correlated Hessian."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(count, count, generator=g, dtype=torch.float64) / math.sqrt(count)
    x = torch.randn(4 * count, count, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 8.0  # a few loud channels
    H = x.t() @ x * (2.0 / x.shape[0])
    H += 0.01 * H.diagonal().mean() * torch.eye(count, dtype=torch.float64)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True).float()
    W = torch.randn(rows, count, generator=g) * 0.05
    return W.to(device), U.to(device)


def column_params(W: torch.Tensor, bits: torch.Tensor | None):
    if bits is None:
        return None
    return QuantGrid.for_weight(W, sym=False).column_params(0, W.shape[1], bits)


def run_both(rows: int, count: int, prune: PruneSpec, bits: torch.Tensor | None, seed: int = 0):
    W, U = make_block(rows, count, seed)
    params = column_params(W, bits)
    ref = solve_block(W.clone(), U, prune, params, fused=False)
    d = torch.diag(U)
    if prune.prunen == 0 and prune.sparsity > 0:
        mask = unstructured_mask(W, d, prune.sparsity)
    else:
        mask = torch.zeros_like(W, dtype=torch.bool)
    out = kernels.solve_block_fused(W.clone(), U, mask, prune.prunen, prune.prunem, params)
    return ref, out, params


CASES = {
    # name: (rows, count, prune, bits)
    "50% + 4-bit": (384, 128, PruneSpec(sparsity=0.5), "4"),
    "2:4 + 4-bit": (1536, 128, PruneSpec(prunen=2, prunem=4), "4"),
    "50% + mixed bits": (1000, 128, PruneSpec(sparsity=0.5), "mixed"),
    "2:4 + mixed bits, ragged": (1000, 76, PruneSpec(prunen=2, prunem=4), "mixed"),
    "4:8 + 3-bit": (384, 128, PruneSpec(prunen=4, prunem=8), "3"),
    "quant only, mixed, ragged": (1536, 77, PruneSpec(), "mixed"),
    "quant only, 8-bit": (384, 128, PruneSpec(), "8"),
    "prune only 50%, ragged": (1000, 77, PruneSpec(sparsity=0.5), None),
    "prune only 2:4": (1536, 128, PruneSpec(prunen=2, prunem=4), None),
    "1:3 + 4-bit (one chunk)": (384, 48, PruneSpec(prunen=1, prunem=3), "4"),
    "60% + 2-bit, blocksize 256": (384, 256, PruneSpec(sparsity=0.6), "2"),
}


def bits_for(kind: str | None, count: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "mixed":
        return torch.tensor(OPTIONS * (count // len(OPTIONS) + 1))[:count]
    return torch.full((count,), int(kind))


@gpu
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_solve_block(name):
    rows, count, prune, kind = CASES[name]
    (Q, E, M, err), (Qf, Ef, Mf, errf), params = run_both(rows, count, prune, bits_for(kind, count))
    assert Qf.shape == Q.shape and Ef.shape == E.shape and Mf.shape == M.shape
    assert torch.is_tensor(errf) and errf.dim() == 0
    errf = float(errf)
    mask_same = (M == Mf).float().mean().item()
    q_same = (Q == Qf).float().mean().item()
    e_same = (E == Ef).float().mean().item()
    rel = abs(errf - err) / max(abs(err), 1e-30)
    print(f"\n[{name}] rows={rows} count={count}: Q1 identical {q_same:.6f}, Err1 identical {e_same:.6f}, "
          f"mask identical {mask_same:.6f}, error {err:.6g} vs {errf:.6g} (rel {rel:.2e})")
    if prune.prunen > 0:
        assert mask_same >= 0.999
        # N:M structure holds exactly: prunen of every prunem columns in each row
        full = count - count % prune.prunem
        groups = Mf[:, :full].reshape(rows, -1, prune.prunem).sum(2)
        assert (groups == prune.prunen).all()
    else:
        assert mask_same == 1.0
    assert not Qf[Mf].any(), "pruned weights must be exactly zero"
    assert q_same >= 0.999
    if params is not None:
        step = params[0]  # one grid step of each element's column grid
        assert ((Qf - Q).abs() <= step * 1.0001 + 1e-12).all()
    else:
        assert (Qf - Q).abs().max().item() <= 1e-4 * Q.abs().max().item()
    assert torch.allclose(Ef, E, rtol=1e-3, atol=1e-3 * E.abs().max().item())
    assert rel < 1e-3


@gpu
def test_fused_no_pruning_with_mask_none_and_strided_u():
    """mask1=None means no pruning; U1 may be a strided view of the whole factor (as fasterprune passes)."""
    W, U = make_block(300, 256, 3)
    bits = bits_for("mixed", 128)
    W1 = W[:, 128:].contiguous()
    U1 = U[128:, 128:]  # not contiguous
    scale, zero, maxq = column_params(W1, bits)
    Q, E, M, err = solve_block(W1.clone(), U1, PruneSpec(), (scale, zero, maxq), fused=False)
    Qf, Ef, Mf, errf = kernels.solve_block_fused(W1, U1, None, 0, 0, (scale, zero, maxq))
    assert not Mf.any()
    assert (Q == Qf).float().mean().item() >= 0.999
    assert abs(float(errf) - err) <= 1e-3 * err
    assert torch.equal(W1, W[:, 128:]), "the fused solver leaves its input alone"


@gpu
@pytest.mark.parametrize("prune", [PruneSpec(sparsity=0.5), PruneSpec(prunen=2, prunem=4)], ids=["50%", "2:4"])
def test_fused_chunkings_agree_bit_for_bit(prune):
    """Splitting the block into 2 or 4 column chunks changes which updates are skipped (all of them zero
    updates of columns left of the step), never a result."""
    W, U = make_block(1000, 128, 5)
    scale, zero, maxq = column_params(W, bits_for("mixed", 128))
    mask = torch.zeros_like(W, dtype=torch.bool) if prune.prunen else unstructured_mask(W, torch.diag(U), 0.5)
    out = [kernels.solve_block_fused(W, U, mask.clone(), prune.prunen, prune.prunem, (scale, zero, maxq),
                                      kernels.Tuning(chunks=c))
           for c in (2, 4)]
    for a, b in zip(out[0][:3], out[1][:3]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- timing (python test_kernels.py)


def _time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def bench(rows_list=(384, 1536, 12288), count: int = 128, compile_only: bool = False) -> None:
    """Per-block times (CUDA events, after a warm-up call) of solve_block and solve_block_fused,
    on 4-bit blocks; "fused+mask" adds what the caller does besides the kernel (the unstructured
    mask (a sort), or a zero mask for N:M), "fused" is the call alone."""
    if not compile_only:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; per-block times, count={count}")
        print(f"{'case':<14} {'rows':>6} {'solve_block ms':>15} {'fused ms':>9} {'fused+mask ms':>14} {'speedup':>8}")
    for label, prune in (("50% + 4-bit", PruneSpec(sparsity=0.5)), ("2:4 + 4-bit", PruneSpec(prunen=2, prunem=4))):
        for rows in rows_list:
            W, U = make_block(rows, count, 0)
            scale, zero, maxq = column_params(W, torch.full((count,), 4))
            d = torch.diag(U)
            nm = prune.prunen > 0
            mask0 = torch.zeros_like(W, dtype=torch.bool) if nm else unstructured_mask(W, d, prune.sparsity)

            def ref():
                solve_block(W.clone(), U, prune, (scale, zero, maxq), fused=False)

            def fused():
                kernels.solve_block_fused(W, U, mask0, prune.prunen, prune.prunem, (scale, zero, maxq))

            def fused_with_mask():
                m = torch.zeros_like(W, dtype=torch.bool) if nm else unstructured_mask(W, d, prune.sparsity)
                kernels.solve_block_fused(W, U, m, prune.prunen, prune.prunem, (scale, zero, maxq))

            if compile_only:
                fused()
                continue
            t_ref = _time_ms(ref, 3)
            t_fused = _time_ms(fused, 50)
            t_fm = _time_ms(fused_with_mask, 50)
            print(f"{label:<14} {rows:>6} {t_ref:>15.3f} {t_fused:>9.4f} {t_fm:>14.4f} {t_ref / t_fm:>7.0f}x")


def bench_row_tiles(rows_list=(2048, 4096, 8192, 12288, 16384, 49152), count: int = 128) -> None:
    """Per-block times of the fused kernel (50% + 4-bit) with one and with two rows per thread at
    the row counts of OPT's Linears (`kernels._default_config` takes one for all: choosing by row count
    would compile a second variant for every model whose Linears' row counts straddle the switch)."""
    print(f"device: {torch.cuda.get_device_name()}; fused ms per block, count={count}, 50% + 4-bit")
    print(f"{'rows':>6} {'1 row/thread':>13} {'2 rows/thread':>14} {'default':>8}")
    for rows in rows_list:
        W, U = make_block(rows, count, 0)
        scale, zero, maxq = column_params(W, torch.full((count,), 4))
        mask = unstructured_mask(W, torch.diag(U), 0.5)
        one = 128 // kernels.launch_config(count, 0, 0, True, True)["CW"]  # rows per warp at one row per thread
        times = [_time_ms(lambda br=br: kernels.solve_block_fused(W, U, mask, 0, 0, (scale, zero, maxq),
                                                                kernels.Tuning(block_rows=br)),
                          50) for br in (one, 2 * one)]
        default = kernels.launch_config(count, 0, 0, True, True)["BLOCK_R"]
        print(f"{rows:>6} {times[0]:>13.4f} {times[1]:>14.4f} {'2' if default == 2 * one else '1':>8}")


def bench_chunks(rows_list=(384, 1536, 2048, 8192, 12288, 49152), count: int = 128,
                 configs=((4, 4, 1), (2, 2, 1), (2, 4, 1), (2, 4, 2))) -> None:
    """Compile seconds (the first call of each variant; run with an empty TRITON_CACHE_DIR) and per-block
    times of the fused kernel with the block in 4 and in 2 column chunks (`kernels.CHUNKS`), each as
    (chunks, rows per program, warps): fewer chunks compile faster and skip fewer updates.
    The outputs of every configuration must agree bit for bit."""
    print(f"device: {torch.cuda.get_device_name()}; count={count}; compile s, then fused ms per block by rows")
    print(f"{'case':<14} {'chunks':>6} {'rows/prog':>9} {'warps':>5} {'compile s':>10} "
          + " ".join(f"{r:>8}" for r in rows_list))
    for label, prune in (("50% + 4-bit", PruneSpec(sparsity=0.5)), ("2:4 + 4-bit", PruneSpec(prunen=2, prunem=4))):
        blocks = []
        for rows in rows_list:
            W, U = make_block(rows, count, 0)
            scale, zero, maxq = column_params(W, torch.full((count,), 4))
            nm = prune.prunen > 0
            mask = torch.zeros_like(W, dtype=torch.bool) if nm else unstructured_mask(W, torch.diag(U), 0.5)
            blocks.append((W, U, mask, scale, zero, maxq))
        outputs = []
        for chunks, block_rows, num_warps in configs:
            def call(b, tuning=kernels.Tuning(chunks=chunks, block_rows=block_rows, num_warps=num_warps)):
                W, U, mask, scale, zero, maxq = b
                return kernels.solve_block_fused(W, U, mask.clone(), prune.prunen, prune.prunem, (scale, zero, maxq),
                                                 tuning)
            torch.cuda.synchronize()
            tick = time.time()
            call(blocks[0])
            torch.cuda.synchronize()
            compile_s = time.time() - tick
            times = [_time_ms(lambda b=b: call(b), 50) for b in blocks]
            outputs.append([call(b)[:3] for b in blocks])
            br = kernels.launch_config(count, prune.prunen, prune.prunem, True, True,
                                       kernels.Tuning(block_rows, num_warps, chunks=chunks))
            print(f"{label:<14} {chunks:>6} {br['BLOCK_R']:>9} {br['num_warps']:>5} {compile_s:>10.2f} "
                  + " ".join(f"{t:>8.4f}" for t in times), flush=True)
        same = all(torch.equal(x, y) for other in outputs[1:] for a, b in zip(outputs[0], other) for x, y in zip(a, b))
        print(f"{label}: outputs of every configuration {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    if not kernels.is_available():
        sys.exit("needs a CUDA device and Triton")
    if "--row-tiles" in sys.argv:
        bench_row_tiles()
    elif "--chunks" in sys.argv:
        bench_chunks()
    else:
        bench(compile_only="--compile-only" in sys.argv)

"""The Triton kernels on the CPU, through Triton's interpreter: the fused solve kernel (kernels.py) against the
PyTorch column loop bit for bit, here, and the serving kernels against the dequantized weights
(test_serving_kernel.py), so that their logic is checked on machines without a GPU (CI). Where there is
one, test_kernels.py and test_serving_kernel.py check the compiled kernels themselves and this is skipped
(the lent H200 image's Triton 3.6 interpreter fails on the fused kernel).

The interpreter has to be chosen before Triton is first imported (Triton's own @jit helpers, such as
the ones behind tl.sum, are compiled or interpreted from then on), so a normal run has one test here
that runs both files again in one child process with TRITON_INTERPRET=1, where their comparisons are
defined (one child for both: a child's start, with torch and Triton imported, costs seconds). To see them:
    cd tests && TRITON_INTERPRET=1 PYTHONPATH=.. python -m pytest -q --noconftest \
        test_triton_interpret.py test_serving_kernel.py
Skips without Triton. Needs a Triton whose interpreter broadcasts a scalar load mask: 3.7.1 (what
torch 2.13 pins on CUDA, and requirements.txt) and 3.8.0 do; 3.9.0 fails with "mask has unsupported
dtype". A few seconds (the interpreter runs the kernels in NumPy).
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETING:

    INTERPRETED = ("test_triton_interpret.py", "test_serving_kernel.py")

    @pytest.mark.slow
    def test_kernels_under_the_triton_interpreter():
        """The comparisons of INTERPRETED, in one process that imports Triton with TRITON_INTERPRET=1."""
        if importlib.util.find_spec("triton") is None:
            pytest.skip("Triton is not installed")
        if torch.cuda.is_available():
            pytest.skip("a GPU is here: test_kernels.py and test_solve_graphs.py check the compiled kernel itself")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the modules under test, without conftest
        env = dict(os.environ, TRITON_INTERPRET="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=root)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                               *INTERPRETED], cwd=os.path.dirname(os.path.abspath(__file__)),
                              env=env, capture_output=True, text=True, timeout=600)
        report = done.stdout[-6000:] + done.stderr[-2000:]
        assert done.returncode == 0, report
        assert "skipped" not in done.stdout.splitlines()[-1], report

else:
    from quant import QuantGrid
    from sparsegpt_enhanced import PruneSpec, solve_block, unstructured_mask
    from systems import kernels

    OPTIONS = [2, 3, 4, 6, 8]

    def make_block(rows: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A weight block and the upper Cholesky factor of the damped inverse of a correlated Hessian."""
        g = torch.Generator().manual_seed(seed)
        mix = torch.randn(count, count, generator=g, dtype=torch.float64) / math.sqrt(count)
        x = torch.randn(4 * count, count, generator=g, dtype=torch.float64) @ mix
        x[:, :3] *= 8.0
        H = x.t() @ x * (2.0 / x.shape[0])
        H += 0.01 * H.diagonal().mean() * torch.eye(count, dtype=torch.float64)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
        return torch.randn(rows, count, generator=g) * 0.05, U

    def widths(kind: str | None, count: int) -> torch.Tensor | None:
        if kind is None:
            return None
        if kind == "mixed":
            return torch.tensor(OPTIONS * (count // len(OPTIONS) + 1))[:count]
        return torch.full((count,), int(kind))

    CASES = {
        # name: (rows, count, prune, widths, sym); rows not a multiple of the kernel's row tile, counts that
        # give one to four column chunks (asked for two or four), ragged last chunks
        "50% + 4-bit": (13, 32, PruneSpec(sparsity=0.5), "4", False),
        "50% + mixed, 4 chunks, ragged": (9, 50, PruneSpec(sparsity=0.5), "mixed", False),
        "quant only, mixed, ragged": (11, 27, PruneSpec(), "mixed", False),
        "3-bit sym, ragged": (7, 21, PruneSpec(), "3", True),
        "prune only 60%, ragged": (10, 23, PruneSpec(sparsity=0.6), None, False),
        "2:4 + 4-bit": (12, 32, PruneSpec(prunen=2, prunem=4), "4", False),
        "2:4 + mixed, ragged": (9, 30, PruneSpec(prunen=2, prunem=4), "mixed", False),
        "4:8 + 3-bit, ragged": (8, 40, PruneSpec(prunen=4, prunem=8), "3", False),
        "1:3 + 2-bit (one chunk)": (6, 24, PruneSpec(prunen=1, prunem=3), "2", False),
        "prune only 2:4": (5, 16, PruneSpec(prunen=2, prunem=4), None, False),
    }

    def test_the_interpreter_is_on():
        assert kernels.is_available(), kernels._IMPORT_ERROR

    @pytest.mark.parametrize("chunks", [2, 4])
    @pytest.mark.parametrize("name", list(CASES))
    def test_interpreted_kernel_is_bit_identical_to_the_column_loop(name, chunks):
        rows, count, prune, kind, sym = CASES[name]
        assert kernels.supports(count, prune.prunen, prune.prunem)
        W, U = make_block(rows, count, seed=len(name))
        bits = widths(kind, count)
        params = None if bits is None else QuantGrid.for_weight(W, sym).column_params(0, count, bits)
        Q, E, M, loss = solve_block(W.clone(), U, prune, params, fused=False)
        if prune.prunen == 0 and prune.sparsity > 0:
            mask = unstructured_mask(W, torch.diag(U), prune.sparsity)
        else:
            mask = torch.zeros_like(W, dtype=torch.bool)
        W_in = W.clone()
        Qf, Ef, Mf, lossf = kernels.solve_block_fused(W_in, U, mask, prune.prunen, prune.prunem, params,
                                                      kernels.Tuning(chunks=chunks))
        assert torch.equal(W_in, W), "the fused solver leaves its input alone"
        assert torch.equal(Mf, M)
        assert torch.equal(Qf, Q)
        assert torch.equal(Ef, E)
        assert float(lossf) == pytest.approx(float(loss), rel=1e-5)  # only the order of the final sum differs

    def test_interpreted_kernel_rounds_ties_to_even():
        """Every weight exactly halfway between two grid points (as a symmetric grid's -xmax always is);
        with a diagonal U no error moves them, so each tie reaches the rounding as it is (half to even)."""
        g = torch.Generator().manual_seed(11)
        rows, count = 9, 32
        W = (torch.randint(-12, 12, (rows, count), generator=g) + 0.5) * 0.25  # exact in fp32
        U = torch.diag(torch.rand(count, generator=g) + 0.5)
        scale, zero = torch.full((rows, count), 0.25), torch.full((rows, count), 8.0)
        maxq = widths("mixed", count).float().exp2() - 1
        Q, E, M, loss = solve_block(W.clone(), U, PruneSpec(), (scale, zero, maxq), fused=False)
        Qf, Ef, Mf, lossf = kernels.solve_block_fused(W, U, None, 0, 0, (scale, zero, maxq))
        assert torch.equal(Qf, Q) and torch.equal(Ef, E)

    def test_interpreted_kernel_without_mask_and_with_strided_u():
        """mask1=None means no pruning; U1 may be a strided view of a larger factor, as fasterprune passes it."""
        W, U = make_block(10, 48, seed=7)
        W1, U1 = W[:, 16:].contiguous(), U[16:, 16:]
        params = QuantGrid.for_weight(W1, False).column_params(0, 32, widths("mixed", 32))
        Q, E, M, loss = solve_block(W1.clone(), U1, PruneSpec(), params, fused=False)
        Qf, Ef, Mf, lossf = kernels.solve_block_fused(W1, U1, None, 0, 0, params)
        assert not Mf.any() and torch.equal(Qf, Q) and torch.equal(Ef, E)
        assert float(lossf) == pytest.approx(float(loss), rel=1e-5)

"""The serving kernels (serving/gemv_kernel.py, serving/gemm_kernel.py) against an independent oracle: the
weights quant.py dequantizes from the same codes, multiplied in float64.

Where there is a GPU the compiled kernels run here, on layer-sized shapes. Without one, the same checks on
tiny shapes run through Triton's CPU interpreter, in the child process that test_triton_interpret.py starts
for every interpreted kernel test (the interpreter has to be chosen before Triton is first imported); they are
kept small so that they take a few seconds on a 2-core machine.

Every case covers each width of its mix with a ragged last unit and holes, the split-K reduction, and,
for the tensor-core kernel, both ways of reading the activations (gathered in-kernel, permuted first).
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETING

if INTERPRETING or ON_GPU:  # elsewhere test_triton_interpret.py runs this file under the interpreter
    from quant import QuantGrid, dequantize
    from serving.layout import WIDTHS, build_layout
    from serving.mixed_matmul import KernelConfig, launch

    DEVICE = "cuda" if ON_GPU else "cpu"
    ALL = list(WIDTHS)

    def case(rows: int, columns: int, widths: list[int], sym: bool, groupsize: int, prune: float, seed: int):
        """(layout on DEVICE, float64 reference weight, fp16 bias) of random weights rounded on a QuantGrid."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(rows, columns, generator=g) * 0.05
        if prune:
            w[torch.rand(rows, columns, generator=g) < prune] = 0.0
        bits = torch.tensor(widths)[torch.randint(0, len(widths), (columns,), generator=g)]
        grid = QuantGrid.rounding(w, sym, groupsize, shrink={2: 0.85, 3: 0.9, 4: 0.95})
        codes, scale, zero = grid.codes_of(w, bits)
        keep = (w != 0) if prune else None
        ref = dequantize(codes, scale, zero)
        if keep is not None:
            ref = torch.where(keep, ref, 0.0)
        layout = build_layout(codes, bits, keep, grid, DEVICE)
        bias = (torch.randn(rows, generator=g) * 0.1).half().to(DEVICE)
        return layout, ref.double(), bias

    def check(layout, ref, bias, m: int, config: KernelConfig, seed: int, tol: float = 3e-3) -> None:
        x = torch.randn(m, layout.columns, generator=torch.Generator().manual_seed(seed)).half()
        out = torch.full((m, layout.rows), float("nan"), dtype=torch.float16, device=DEVICE)  # all must be written
        launch(x.to(DEVICE), layout, bias, config, out)
        oracle = x.double() @ ref.t() + bias.double().cpu()
        got = out.double().cpu()
        assert not bool(got.isnan().any()), "an output was not written"
        err = float((got - oracle).norm() / oracle.norm())
        assert err < tol, f"relative error {err:.2e} with {config}"

    if INTERPRETING:
        # (rows, columns, widths, sym, groupsize, prune): each width present, group size none and 128, sym and
        # asym, pruned and not; one grid per slot (uniform, grouped) and one per position (mixed, grouped)
        # The interpreter runs each program in Python: one decode and one tensor-core launch per case (split
        # along K, the tensor-core one gathering x in-kernel in half of the cases and reading it permuted in
        # the other half), ~0.2-1.2 s a case on the 2-core machine.
        CASES = {
            "all widths asym per-row pruned": (16, 160, ALL, False, 0, 0.3),
            "3+8-bit sym g128 (a group per position)": (16, 260, [3, 8], True, 128, 0.0),
            "4-bit asym g128 (a group per slot run)": (16, 256, [4], False, 128, 0.0),
            "3-bit asym per-row, three panels (prefetched)": (16, 1056, [3], False, 0, 0.0),
        }
        GEMV = [KernelConfig("gemv", 16, 1, 2, 4, 1, True),
                KernelConfig("gemv", 16, 1, 32, 4, 1, True),  # more programs along K than plane-panels
                KernelConfig("gemv", 16, 1, 1, 4, 1, True, prefetch=True),  # every panel after a prefetch
                KernelConfig("gemv", 16, 1, 3, 4, 1, False, prefetch=True)]
        GEMM = [(5, KernelConfig("gemm", 16, 16, 2, 4, 1, True)), (5, KernelConfig("gemm", 16, 16, 1, 4, 1, False))]
    else:
        CASES = {
            "mixed asym per-row pruned": (512, 2048, ALL, False, 0, 0.5),
            "mixed sym per-row": (512, 1536, ALL, True, 0, 0.0),
            "mixed asym g128": (512, 2048, ALL, False, 128, 0.0),
            "mixed sym g128 pruned": (512, 1024, ALL, True, 128, 0.3),
            "4-bit asym g128": (512, 2048, [4], False, 128, 0.0),
            "3-bit sym g128": (512, 1024, [3], True, 128, 0.0),
            "2-bit asym per-row": (512, 1024, [2], False, 0, 0.0),
            "6+8-bit asym per-row, odd rows": (300, 1000, [6, 8], False, 0, 0.0),
        }
        # tiles of mixed_matmul's tuning candidates (kernels shared with serving.benchmark's Triton cache)
        GEMV = [KernelConfig("gemv", 128, 1, 1, 4, 2, True), KernelConfig("gemv", 128, 1, 8, 4, 2, False),
                KernelConfig("gemv", 256, 1, 16, 4, 2, True), KernelConfig("gemv", 32, 1, 64, 4, 2, True),
                KernelConfig("gemv", 64, 1, 4, 4, 2, True, prefetch=True)]
        GEMM = [(8, KernelConfig("gemm", 64, 16, 4, 4, 2, True)), (32, KernelConfig("gemm", 128, 32, 8, 4, 3, True)),
                (256, KernelConfig("gemm", 128, 128, 1, 8, 3, False)), (96, KernelConfig("gemm", 64, 256, 2, 4, 3, False))]

    @pytest.fixture(scope="module", params=list(CASES))
    def layer(request):
        """(case index, layout, reference weight, bias); the module shares one split-K workspace, so every
        split launch after the first also checks that the one before left it clean."""
        return (list(CASES).index(request.param), *case(*CASES[request.param], seed=len(request.param)))

    def few(index: int) -> bool:
        """On the GPU, cases the benchmark does not compile (symmetric grids, other width sets, rows not a
        multiple of 16) run one decode and two tensor-core configurations: each new one is a compilation of
        5-15 s. In the interpreter every case runs one of each."""
        return INTERPRETING or list(CASES.values())[index][3] or index >= 6

    def test_gemv_kernel_matches_dequantized_matmul(layer):
        index, layout, ref, bias = layer
        configs = GEMV[:1] if few(index) else GEMV
        if INTERPRETING and index == 0:
            configs = GEMV
        if INTERPRETING and index == 3:  # a bucket of several panels: what the prefetch loads next is used
            configs = [c for c in GEMV if c.prefetch]
        for i, config in enumerate(configs):
            check(layout, ref, bias, 1, config, seed=i)

    def test_gemm_kernel_matches_dequantized_matmul(layer):
        index, layout, ref, bias = layer
        if INTERPRETING:
            configs = [GEMM[index % 2]]  # alternately gathering x in-kernel and reading it permuted
        else:
            configs = [GEMM[0], GEMM[2]] if few(index) else GEMM
        for i, (m, config) in enumerate(configs):
            check(layout, ref, bias, m, config, seed=10 + i)

    if ON_GPU:

        def test_split_k_workspace_is_left_clean():
            """The split-K reduction leaves its workspace zero and its counters reset: the next launch is right."""
            layout, ref, bias = case(256, 2048, ALL, False, 0, 0.0, seed=5)
            config = KernelConfig("gemv", 64, 1, 8, 4, 2, True)
            for seed in (1, 2, 3):
                check(layout, ref, bias, 1, config, seed)

"""The solver's two per-block steps on the CPU, this checkout against another version of sparsegpt_enhanced.py
(benchmarks/mixed_cost.md): the unstructured mask and the column loop on 384 x 128 and 1536 x 128 blocks (opt-mini's
q/k/v/out and fc1 rows; 50% + 4-bit), one thread, the two versions interleaved, median of 10 calls each.

    git show COMMIT:sparsegpt_enhanced.py > /tmp/sparsegpt_before.py
    python experiments/timings/cpu_solver_blocks.py /tmp/sparsegpt_before.py
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sparsegpt_enhanced  # noqa: E402


def load_version(path: str):
    spec = importlib.util.spec_from_file_location("sparsegpt_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def median_ms(calls: dict[str, callable], repeats: int = 10) -> dict[str, float]:
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            tick = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - tick)
    return {name: round(1e3 * statistics.median(s), 2) for name, s in seconds.items()}


def main() -> None:
    before = load_version(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for rows in (384, 1536):
        W = torch.randn(rows, 128)
        X = torch.randn(128, 256)
        H = X @ X.T / 256 + 0.01 * torch.eye(128)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        d = torch.diag(U)
        prune = sparsegpt_enhanced.PruneSpec(sparsity=0.5)
        params = (torch.rand(rows, 128) + 0.1, torch.full((rows, 128), 7.0), torch.full((128,), 15.0))
        mask = sparsegpt_enhanced.unstructured_mask(W, d, 0.5)
        same_mask = torch.equal(mask, before.unstructured_mask(W, d, 0.5))
        loops = [m.column_loop(W.clone(), d, U, mask.clone(), prune, params) for m in (sparsegpt_enhanced, before)]
        same_loop = all(torch.equal(a, b) for a, b in zip(*loops))
        print(f"{rows} x 128: mask ms", median_ms({"this": lambda: sparsegpt_enhanced.unstructured_mask(W, d, 0.5),
                                                   "before": lambda: before.unstructured_mask(W, d, 0.5)}),
              "same mask:", same_mask)
        print(f"{rows} x 128: column loop ms", median_ms({
            "this": lambda: sparsegpt_enhanced.column_loop(W.clone(), d, U, mask.clone(), prune, params),
            "before": lambda: before.column_loop(W.clone(), d, U, mask.clone(), prune, params)}),
            "same values:", same_loop)


if __name__ == "__main__":
    main()

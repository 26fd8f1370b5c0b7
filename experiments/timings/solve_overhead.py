"""Where a Linear's solve spends its time at OPT-1.3B's shapes (50% + 4-bit, 128-column blocks): the wall
time of `SparseGPT.fasterprune` against the GPU's busy time, launched one by one (with the host-side cost of
each operation, torch.profiler) and replayed as a CUDA graph (`SolveGraphs`). benchmarks/speed.md "Big models". Needs a CUDA GPU:

    python3 experiments/solve_overhead.py
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from quant import QuantGrid  # noqa: E402
from sparsegpt_enhanced import PruneSpec, SolveSettings, SparseGPT  # noqa: E402
from systems.solve_graphs import SolveGraphs  # noqa: E402

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False
for rows, columns in ((2048, 2048), (8192, 2048), (2048, 8192)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * columns, columns, generator=g).to(dev, torch.float16)
    weight = (torch.randn(rows, columns, generator=g) * 0.02).to(dev)
    bits = torch.full((columns,), 4, dtype=torch.int64)
    for graphs in (None, SolveGraphs()):
        solver = SparseGPT(columns, dev, graphs=graphs)
        solver.add_batch(x)

        def solve():
            grid = QuantGrid.for_weight(weight, False, -1)
            return solver.fasterprune(weight, SolveSettings(PruneSpec(0.5)), grid, bits)

        first = solve()  # launched (and the factor made); with graphs the second call captures
        torch.cuda.synchronize()
        tick = time.perf_counter()
        solve()
        torch.cuda.synchronize()
        second = time.perf_counter() - tick
        walls = []
        for _ in range(5):
            tick = time.perf_counter()
            result = solve()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - tick)
        assert torch.equal(result.weight, first.weight)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            solve()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        how = "launched one by one" if graphs is None else "replayed as a CUDA graph"
        print(f"== {rows} x {columns}: {columns // 128} blocks, {how}; wall {min(walls) * 1e3:.1f} ms (best of 5), "
              f"GPU busy {gpu_us / 1e3:.1f} ms (profiled run); second call {second * 1e3:.1f} ms", flush=True)
        if graphs is None:
            print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50), flush=True)

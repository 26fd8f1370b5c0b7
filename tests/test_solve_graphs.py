"""Solves replayed as CUDA graphs (systems/solve_graphs.py) give what the launch-by-launch loop gives.

The oracle is the same solver without graphs, whose loop test_solver.py and test_kernels.py check against the
textbook column loop. Every case solves several matrices of one shape, each with its own weights, Hessian and
widths: the first runs as launched, the second is captured, the rest are replays with new inputs. Needs CUDA:
    python -m pytest -q test_solve_graphs.py
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from quant import QuantGrid
from sparsegpt_enhanced import PruneSpec, SolveSettings, SparseGPT
from systems import kernels
from systems.solve_graphs import SolveGraphs

pytestmark = pytest.mark.skipif(not kernels.is_available(), reason="needs a CUDA device and Triton")
OPTIONS = torch.tensor([2, 3, 4, 6, 8])


def solver_for(columns: int, seed: int, graphs: SolveGraphs | None) -> SparseGPT:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * columns, columns, generator=g) * torch.rand(columns, generator=g) * 3
    solver = SparseGPT(columns, "cuda", graphs=graphs)
    solver.add_batch(x.cuda().half())
    return solver


def solve_all(rows: int, columns: int, prune: PruneSpec, widths: str, graphs: SolveGraphs | None, *,
              groupsize: int = -1, act_order: bool = False, row_groups: int = 1, matrices: int = 4):
    """Solve `matrices` random (rows, columns) weights, each against its own Hessian; their results."""
    results = []
    for seed in range(matrices):
        g = torch.Generator().manual_seed(100 + seed)
        weight = (torch.randn(rows, columns, generator=g) * 0.05).cuda()
        solver = solver_for(columns, seed, graphs)
        order = torch.argsort(solver.hessian_diag, descending=True) if act_order else None
        grid = bits = None
        if widths != "none":
            grid = QuantGrid.for_weight(weight, False, groupsize, shrink={3: 0.9, 2: 0.85})
            if row_groups > 1:  # the clip search's stacked copies, each on its own scaled ranges
                scale = torch.linspace(1.0, 0.8, row_groups).repeat_interleave(rows // row_groups)[:, None]
                grid = replace(grid, row_scale=scale.cuda())
            bits = (torch.full((columns,), int(widths)) if widths != "mixed"
                    else OPTIONS[torch.randint(0, 5, (columns,), generator=g)])
        result = solver.fasterprune(weight, SolveSettings(prune), grid, bits, order, row_groups)
        results.append(result)
    return results


CASES = {
    "50% + 4-bit": dict(rows=384, columns=512, prune=PruneSpec(0.5), widths="4"),
    "50% + mixed widths": dict(rows=256, columns=640, prune=PruneSpec(0.5), widths="mixed"),
    "2:4 + 3-bit": dict(rows=256, columns=512, prune=PruneSpec(prunen=2, prunem=4), widths="3"),
    "4:8 + mixed widths": dict(rows=200, columns=384, prune=PruneSpec(prunen=4, prunem=8), widths="mixed"),
    "GPTQ 3-bit, act order, ragged last block": dict(rows=256, columns=333, prune=PruneSpec(), widths="3",
                                                     act_order=True),
    "pruning alone": dict(rows=256, columns=512, prune=PruneSpec(0.6), widths="none"),
    "stacked copies (row_groups)": dict(rows=3 * 96, columns=512, prune=PruneSpec(0.5), widths="mixed",
                                        row_groups=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_solves_match_launched_ones(name):
    case = CASES[name]
    graphs = SolveGraphs()
    launched = solve_all(**case, graphs=None)
    replayed = solve_all(**case, graphs=graphs)
    assert graphs.captured == 1
    for i, (a, b) in enumerate(zip(launched, replayed)):
        assert torch.equal(a.weight, b.weight), f"matrix {i}: weights differ"
        assert torch.equal(a.mask, b.mask), f"matrix {i}: masks differ"
        assert a.error == b.error, f"matrix {i}: error {a.error} vs {b.error}"
    # the inputs differ, so a replay that ignored them would have repeated its capture's result
    assert not torch.equal(replayed[1].weight, replayed[2].weight)


def test_grouped_grids_and_wide_matrices_are_launched():
    """A grouped grid takes its ranges from the weights mid-solve and is not captured; neither is a matrix over
    the size limit. Both still give the launched loop's result."""
    graphs = SolveGraphs(max_weights=256 * 384)
    case = dict(rows=256, columns=512, prune=PruneSpec(0.5), widths="4")
    for a, b in zip(solve_all(**case, graphs=None), solve_all(**case, graphs=graphs)):
        assert torch.equal(a.weight, b.weight)
    grouped = dict(rows=256, columns=384, prune=PruneSpec(0.5), widths="4", groupsize=128)
    for a, b in zip(solve_all(**grouped, graphs=None), solve_all(**grouped, graphs=graphs)):
        assert torch.equal(a.weight, b.weight)
    assert graphs.captured == 0


def test_one_capture_per_shape_and_setting():
    graphs = SolveGraphs()
    solve_all(rows=256, columns=256, prune=PruneSpec(0.5), widths="4", graphs=graphs, matrices=3)
    solve_all(rows=128, columns=256, prune=PruneSpec(0.5), widths="4", graphs=graphs, matrices=3)
    solve_all(rows=256, columns=256, prune=PruneSpec(prunen=2, prunem=4), widths="4", graphs=graphs, matrices=3)
    solve_all(rows=256, columns=256, prune=PruneSpec(0.5), widths="4", graphs=graphs, matrices=1)  # seen: replayed
    assert graphs.captured == 3

"""`--row_ranges search` (row_ranges.py) against the textbook column loop: each row keeps the candidate range
whose solve left that row the least output error."""
from __future__ import annotations

import pytest
import torch
from test_solver import correlated_inputs, textbook_range, textbook_solve

import opt_enhanced as oe
from mixed import row_ranges
from pipeline.checks import validate
from pipeline.config import UsageError
from sparsegpt_enhanced import PruneSpec, SolveSettings, SparseGPT


def row_errors(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(w_i - q_i)^T X^T X (w_i - q_i) of each row, in float64."""
    return (((W.double() - Q.double()) @ X.double().t()) ** 2).sum(1)


@pytest.mark.parametrize("sparsity", [0.5, 0.0])
def test_each_row_keeps_the_range_whose_solve_left_it_the_least_error(sparsity):
    X = correlated_inputs(400, 32, seed=5)
    solver = SparseGPT(32)
    solver.add_batch(X)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    W[:, 3] *= 4  # one channel sets most rows' ranges, so clipping it is a real choice
    bits = [3] * 32
    settings = SolveSettings(PruneSpec(sparsity), blocksize=16, fused=False)
    grid = row_ranges.search_row_ranges(W, solver, settings, torch.tensor(bits), None, {})

    sources = [W]
    if sparsity:
        sources.append(textbook_solve(W, X, sparsity=sparsity)[0].float())  # the weights pruning alone leaves
    candidates, errors = [], []
    for source in sources:
        xmin, xmax = textbook_range(source, False)
        for f in row_ranges.RANGE_FACTORS:
            candidates.append((xmin * f, xmax * f))
            Q = textbook_solve(W, X, sparsity=sparsity, bits=bits, ranges=(xmin * f, xmax * f))[0]
            errors.append(row_errors(W, Q, X))
    errors = torch.stack(errors)
    picked = []
    for i in range(W.shape[0]):
        same = [k for k, (lo, hi) in enumerate(candidates)
                if abs(lo[i] - grid.xmin[i, 0]) <= 1e-5 * hi[i] and abs(hi[i] - grid.xmax[i, 0]) <= 1e-5 * hi[i]]
        assert same, f"row {i}: its range is none of the candidates"
        assert errors[same, i].min() <= errors[:, i].min() * 1.001, (i, errors[:, i].tolist())
        picked.append(same[0])
    assert len(set(picked)) > 1  # rows chose differently: the test can tell a per-row choice from a global one


def test_row_range_search_needs_one_grid_per_row():
    for flags in (["--groupsize", "16"], ["--nearest"], []):
        wbits = [] if flags == [] else ["--wbits", "3"]
        cfg = oe.parse_args(["model", "c4", "--row_ranges", "search", *wbits, *flags])
        with pytest.raises(UsageError):
            validate(cfg)

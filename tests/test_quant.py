"""quant.py: grids, codes and round-to-nearest against the formulas written out."""
from __future__ import annotations

import torch

from quant import QuantGrid, round_to_nearest


def test_round_to_nearest_matches_reference_formula():
    W = torch.randn(6, 10)
    xmin = torch.minimum(W.min(1).values, torch.zeros(6))
    xmax = torch.maximum(W.max(1).values, torch.zeros(6))
    scale = ((xmax - xmin) / 15)[:, None]
    zero = torch.round(-xmin[:, None] / scale)
    expect = scale * (torch.clamp(torch.round(W / scale) + zero, 0, 15) - zero)
    assert torch.equal(round_to_nearest(W, 4, sym=False), expect)


def test_one_width_rounding_matches_reference_formula_per_group_with_a_shrunk_range():
    torch.manual_seed(0)
    W = torch.randn(6, 10)
    for groupsize, shrink in ((-1, 1.0), (4, 0.7), (-1, 0.55)):  # 4 on 10 columns: a short last group
        expect = torch.empty_like(W)
        for g0 in range(0, 10, groupsize if groupsize > 0 else 10):
            w = W[:, g0:g0 + (groupsize if groupsize > 0 else 10)]
            xmin = torch.minimum(w.min(1).values, torch.zeros(6))[:, None] * shrink
            xmax = torch.maximum(w.max(1).values, torch.zeros(6))[:, None] * shrink
            scale = (xmax - xmin) / 7
            zero = torch.round(-xmin / scale)
            expect[:, g0:g0 + w.shape[1]] = scale * (torch.clamp(torch.round(w / scale) + zero, 0, 7) - zero)
        grid = QuantGrid.rounding(W, False, groupsize)
        assert torch.equal(grid.round_at(W, 3, shrink), expect)

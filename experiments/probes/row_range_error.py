"""How much of the output error quantization adds to pruning's a per-row range search removes (benchmarks/mixed_precision.md).

For each Linear of opt-mini's first layers (fed the uncompressed model's activations), at 3 and 4 bits: the
output error sum_i (w_i - q_i)^T X^T X (w_i - q_i) of a prune-only solve, of the joint solve on the reference
ranges, and of the joint solve on the ranges `row_ranges.search_row_ranges` picks; printed is the share of
the quantization part (joint minus prune-only) that remains with the search. CPU, a few minutes:

    python experiments/row_range_error.py --layers 3 --model .local/opt-mini --data_dir .local/data
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # experiments/

from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
from layer_probe import first_linears, probe_arguments  # noqa: E402

from mixed import row_ranges  # noqa: E402
from quant import QuantGrid  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe_arguments(p, layers=3)
    args = p.parse_args()
    remains: dict[int, list[float]] = {3: [], 4: []}
    for i, name, W, solver, cfg in first_linears(args.model, args.data_dir, args.sparsity, 4, args.nsamples,
                                                 args.layers):
        settings = replace(cfg.solve_settings, groupsize=0, fused=False)

        def error(grid, bits) -> float:
            D = W - solver.fasterprune(W, settings, grid, bits).weight
            return float(((D @ solver.xtx) * D).sum())

        pruning = error(None, None)
        cells = []
        for b in (3, 4):
            bits = torch.full((W.shape[1],), b)
            reference = error(QuantGrid.for_weight(W, cfg.sym, 0), bits)
            searched = error(row_ranges.search_row_ranges(W, solver, settings, bits, None, {}), bits)
            share = (searched - pruning) / (reference - pruning)
            remains[b].append(share)
            cells.append(f"{b} bits: {share:.3f}")
        print(f"layer {i} {name:18s} " + "  ".join(cells), flush=True)
    for b, shares in remains.items():
        print(f"{b} bits: mean share remaining {sum(shares) / len(shares):.3f} over {len(shares)} Linears")


if __name__ == "__main__":
    main()

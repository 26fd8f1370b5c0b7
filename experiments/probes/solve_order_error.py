"""What the solve order does to each Linear's output error in a mixed run (benchmarks/mixed_precision.md, "Solve order").

For each Linear of opt-mini's first layers: widths allocated as a layer-scope run allocates them, then solved in
the stored order and with `--solve_order narrow_first`; prints each Linear's width counts (2/3/4/6/8 bits) and the
true output error sum_i (w_i - q_i)^T X^T X (w_i - q_i) of narrow_first as a ratio to the stored order's, then
the mean ratio. Layers are fed the uncompressed model's activations. CPU, a few minutes:

    python experiments/solve_order_error.py --target 4.0 --method quantile --model .local/opt-mini --data_dir .local/data
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

import opt_enhanced  # noqa: E402
from mixed import bitalloc  # noqa: E402
from mixed.costs import channel_costs  # noqa: E402
from quant import QuantGrid  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="4.0")
    p.add_argument("--method", default="quantile", choices=("quantile", "budget"))
    probe_arguments(p, layers=4)
    args = p.parse_args()
    wbits = round(float(args.target))
    ratios = []
    for i, name, W, solver, cfg in first_linears(args.model, args.data_dir, args.sparsity, wbits, args.nsamples,
                                                 args.layers):
        cfg = opt_enhanced.parse_args([cfg.model, "c4", "--sparsity", args.sparsity, "--wbits", str(wbits),
                                       "--target_avg_bits", args.target, "--bit_method", args.method, "--bit_scope",
                                       "layer", "--no_fused"])
        settings = cfg.solve_settings
        costs = channel_costs(W, solver, settings, cfg.wbits, cfg.mixed_precision)
        bits = bitalloc.allocate(costs, cfg.mixed_precision)
        grid = QuantGrid.for_weight(W, cfg.sym, 0, costs.shrink)
        errors = []
        for order in (None, solver.column_order(replace(settings, order="narrow_first"), bits)):
            D = W - solver.fasterprune(W, settings, grid, bits, order).weight
            errors.append(float(((D @ solver.xtx) * D).sum()))
        ratios.append(errors[1] / errors[0])
        counts = torch.bincount(bits, minlength=9)[[2, 3, 4, 6, 8]].tolist()
        print(f"layer {i} {name:18s} widths {counts} narrow_first / stored {ratios[-1]:.4f}", flush=True)
    print(f"mean over {len(ratios)} Linears: {sum(ratios) / len(ratios):.4f}")


if __name__ == "__main__":
    main()

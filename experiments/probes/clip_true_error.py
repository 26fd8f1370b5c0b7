"""How well the clip objectives predict what a range factor does to a Linear's output error (benchmarks/mixed_precision.md).

For each Linear of opt-mini's first layers, at one width, every factor's ratio to the min-max range (1.0) of:
the true output error after a solve (sum_i (w_i - q_i)^T X^T X (w_i - q_i), weights compressed by the solver
with that factor) and the two estimates made before solving (`--clip_objective uncompensated` and `solver`).
Layers are fed the uncompressed model's activations. CPU, a few minutes:

    python experiments/clip_true_error.py --width 3 --sparsity 0.5 --model .local/opt-mini --data_dir .local/data
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

from mixed.rounding import rounding_model  # noqa: E402
from quant import QuantGrid  # noqa: E402

FACTORS = (1.0, 0.9, 0.8, 1.1, 1.2, 1.4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=3)
    probe_arguments(p, layers=4)
    args = p.parse_args()
    print(f"width {args.width}, sparsity {args.sparsity}; factors {FACTORS}; each column: value / value at 1.0")
    for i, name, W, solver, cfg in first_linears(args.model, args.data_dir, args.sparsity, args.width, args.nsamples,
                                                 args.layers):
        settings = replace(cfg.solve_settings, groupsize=0, fused=False)
        model_ = rounding_model(solver, W, settings)
        rows = {"true": [], "uncompensated": [], "solver": []}
        for f in FACTORS:
            grid = QuantGrid.for_weight(W, cfg.sym, 0, {args.width: f} if f != 1.0 else {})
            bits = torch.full((W.shape[1],), args.width)
            D = W - solver.fasterprune(W, settings, grid, bits).weight
            rows["true"].append(float(((D @ solver.xtx) * D).sum()))
            error = model_.rounding_error(args.width, f)
            rows["uncompensated"].append(float(model_.priced(error, False).sum()))
            rows["solver"].append(float(model_.priced(error, True).sum()))
        print(f"layer {i} {name:18s} " + " | ".join(
            f"{k} " + " ".join(f"{v / vals[0]:.3f}" for v in vals) for k, vals in rows.items()), flush=True)

if __name__ == "__main__":
    main()

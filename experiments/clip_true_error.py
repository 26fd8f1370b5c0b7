"""How well the clip objectives predict what a range factor does to a Linear's output error (BENCHMARKS.md §3).

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import opt_enhanced as oe  # noqa: E402
from modelutils import capture_layer_inputs, decoder_layers, find_linears, forward_layer  # noqa: E402
from quant import QuantGrid  # noqa: E402
from runtime import Stages  # noqa: E402

FACTORS = (1.0, 0.9, 0.8, 1.1, 1.2, 1.4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=3)
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--nsamples", default="32")
    p.add_argument("--model", default=".local/opt-mini")
    p.add_argument("--data_dir", default=".local/data")
    args = p.parse_args()
    cfg = oe.parse_args([args.model, "c4", "--data_dir", args.data_dir, "--sparsity", args.sparsity,
                         "--wbits", str(args.width), "--nsamples", args.nsamples])
    dev = torch.device("cpu")
    model = oe.load_opt(cfg.model, True)
    _, _, calibration, _ = oe.tokenize(cfg, Stages(dev))
    hidden, kwargs = capture_layer_inputs(model, calibration, dev, cfg.batch_size)
    shared = oe.decoder_of(model).shared_input
    print(f"width {args.width}, sparsity {args.sparsity}; factors {FACTORS}; each column: value / value at 1.0")
    for i, layer in enumerate(decoder_layers(model)[:args.layers]):
        linears = find_linears(layer)
        solvers = oe.collect_hessians(layer, list(linears), hidden, kwargs, cfg, dev, shared)
        for name, linear in linears.items():
            solver = solvers[shared.get(name, name)]
            W = linear.weight.data.float()
            model_ = solver.rounding_model(W, cfg.prune, cfg.sym, 0, cfg.blocksize, cfg.percdamp)
            rows = {"true": [], "uncompensated": [], "solver": []}
            for f in FACTORS:
                grid = QuantGrid.for_weight(W, cfg.sym, 0, {args.width: f} if f != 1.0 else {})
                bits = torch.full((W.shape[1],), args.width)
                D = W - solver.fasterprune(W, cfg.prune, grid, bits, cfg.blocksize, cfg.percdamp, None, False).weight
                rows["true"].append(float(((D @ solver.xtx) * D).sum()))
                error = model_.rounding_error(args.width, f)
                rows["uncompensated"].append(float(model_.priced(error, False).sum()))
                rows["solver"].append(float(model_.priced(error, True).sum()))
            print(f"layer {i} {name:18s} " + " | ".join(
                f"{k} " + " ".join(f"{v / vals[0]:.3f}" for v in vals) for k, vals in rows.items()), flush=True)
        forward_layer(layer, hidden, kwargs, cfg.batch_size, hidden)


if __name__ == "__main__":
    main()

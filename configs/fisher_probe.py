"""Issue 3 probe: weigh each output row's rounding error by how much the loss cares about that output
(diagonal Fisher of the dense model on the calibration windows), within each Linear and across all of them.

    PYTHONPATH=. python3 configs/fisher_probe.py OUT.json [SEEDS] [VARIANTS]   # repo root, ../shared copies in .local/

The experiment behind --bit_scope model's loss weighting (opt_enhanced.output_sensitivity); "fisher-model" is
what --bit_scope model now does. The variants replace opt_enhanced.plan_model_bits so that compress() takes their bits. Budget score of channel j at width b:
    importance_j * sum_i F_i kept_ij (w_ij - Q_b(w_ij))^2 / U_jj^2,   F_i = mean over tokens of (dLoss/dy_i)^2,
shrunk 25% toward the Linear's mean as in the shipped allocator. Since every Hessian is 2/n X^T X on the
same n tokens, these scores are in the same units (loss) in every Linear, so one budget can span the model.
Variants: shipped (layer scope, untouched); plan-layer (F = 1: the shipped score, but scored on the dense
model's inputs like --bit_scope model); fisher-layer; fisher-model; fisher-split (fisher-model decides
only how many bits each Linear gets; the shipped layer-scope allocator then picks the channels on the
compressed model's inputs, as usual). Validation as in importance_sweep.py.
"""
import dataclasses
import sys

import torch

import opt_enhanced as oe
from modelutils import find_linears, forward_layer
from sparsegpt_enhanced import solve_order
from sweeplib import dev, record, setup

VARIANTS = (sys.argv[3] if len(sys.argv) > 3 else "shipped,plan-layer,fisher-layer,fisher-model,fisher-split").split(",")
SEEDS = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
shipped_plan = oe.plan_model_bits
shipped_compress_linear = oe.compress_linear


def make_plan(fisher, model_scope):
    def plan(model, calibration, cfg, dev_, log):
        layers = model.model.decoder.layers
        hidden, kwargs = oe.capture_layer_inputs(model, calibration, dev_, cfg.batch_size)
        names, scores, sizes = [], [], []
        for i, layer in enumerate(layers):
            linears = find_linears(layer)
            solvers = oe.collect_hessians(layer, list(linears), hidden, kwargs, cfg, dev_)
            for n, lin in linears.items():
                name = f"model.decoder.layers.{i}.{n}"
                solver = solvers[oe.SHARED_INPUT.get(n, n)]
                W = lin.weight.data
                _, imp = oe.importance(W, solver, cfg)
                f = fisher[name] if fisher is not None else torch.ones(W.shape[0], device=W.device)
                err = solver.rounding_error(W, cfg.prune, sorted(cfg.bit_options), cfg.sym, cfg.groupsize, cfg.blocksize,
                                            cfg.percdamp, solve_order(solver.xtx.diagonal(), cfg.act_order), f)
                err = 0.75 * err + 0.25 * err.mean(0, keepdim=True)
                names.append(name); scores.append(imp[:, None] * err)
                sizes.append(torch.full((W.shape[1],), W.shape[0]))
            forward_layer(layer, hidden, kwargs, cfg.batch_size, hidden)
        if model_scope:
            bits = oe.allocate(torch.cat(scores), torch.cat(sizes), cfg)
            out, at = {}, 0
            for n, s in zip(names, scores):
                out[n] = bits[at:at + len(s)]; at += len(s)
            return out
        return {n: oe.allocate(s, z, cfg) for n, s, z in zip(names, scores, sizes)}
    return plan


rows = []


def split(targets):
    """compress_linear with each Linear's own average-bit target; no plan."""
    def compress_linear(name, linear, solver, plan, cfg):
        return shipped_compress_linear(name, linear, solver, {}, dataclasses.replace(cfg, target_avg_bits=targets[name]))
    return compress_linear


def one(tag, variant, flags, seed):
    cfg, model, calib = setup(flags, seed)
    oe.plan_model_bits, oe.compress_linear = shipped_plan, shipped_compress_linear
    if variant == "fisher-split" and cfg.mixed:
        plan = make_plan(oe.output_sensitivity(model, calib, dev, 8), True)(model, calib, cfg, dev, None)
        oe.compress_linear = split({n: b.double().mean().item() for n, b in plan.items()})
    elif variant != "shipped" and cfg.mixed:
        fisher = None if variant == "plan-layer" else oe.output_sensitivity(model, calib, dev, 8)
        oe.plan_model_bits = make_plan(fisher, variant == "fisher-model")
        cfg.bit_scope = "model"  # so that compress() asks for the plan
    out = oe.compress(model, calib, cfg, dev, oe.Log(True))
    r = {"tag": tag, "variant": variant, "seed": seed}
    if cfg.mixed:
        per = {}
        for st in out.stats:
            per.setdefault(st.name.split(".", 4)[-1], []).append(sum(st.bits_per_column) / st.columns)
        r["avg_bits_by_module"] = {k: round(sum(v) / len(v), 3) for k, v in per.items()}
        r["avg_bits"] = sum(sum(st.bits_per_column) * st.rows for st in out.stats) / sum(st.rows * st.columns for st in out.stats)
    record(rows, r, model, sys.argv[1])


for seed in SEEDS:
    for bits in (3, 4):
        one(f"uniform{bits}", "shipped", ["--sparsity", "0.5", "--wbits", str(bits)], seed)
        for v in VARIANTS:
            one(f"budget{bits}", v, ["--sparsity", "0.5", "--wbits", str(bits), "--target_avg_bits", str(bits),
                                     "--bit_method", "budget"], seed)

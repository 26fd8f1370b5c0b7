"""Issue 3 probe: weigh each output row's rounding error by how much the loss cares about that output
(diagonal Fisher of the dense model on the calibration windows), within each Linear and across all of them.

    PYTHONPATH=. python3 configs/fisher_probe.py OUT.json [SEEDS] [VARIANTS]   # repo root, ../shared copies in .local/

The experiment behind --bit_scope model's loss weighting (opt_enhanced.output_sensitivity); "fisher-model" is
--bit_scope model as shipped. The layer variants replace opt_enhanced.plan_model_bits so that compress() takes their bits. Budget score of channel j at width b:
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
from sweeplib import dev, record, setup

VARIANTS = (sys.argv[3] if len(sys.argv) > 3 else "shipped,plan-layer,fisher-layer,fisher-model,fisher-split").split(",")
SEEDS = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
shipped_plan = oe.plan_model_bits
shipped_compress_linear = oe.compress_linear


def layer_plan(fisher):
    """Per-Linear budgets, scored on the dense model's inputs like --bit_scope model, rows weighted by
    `fisher` (None: unweighted, the shipped layer-scope score)."""
    def plan(model, calibration, hidden, kwargs, cfg, dev_, log):
        out, hidden = {}, hidden.clone()
        for i, layer in enumerate(model.model.decoder.layers):
            linears = find_linears(layer)
            solvers = oe.collect_hessians(layer, list(linears), hidden, kwargs, cfg, dev_)
            for n, lin in linears.items():
                name = f"model.decoder.layers.{i}.{n}"
                _, score = oe.allocation_score(lin.weight.data, solvers[oe.SHARED_INPUT.get(n, n)], cfg,
                                               None if fisher is None else fisher[name])
                out[name] = oe.allocate(score, torch.full((lin.in_features,), lin.out_features), cfg)
            forward_layer(layer, hidden, kwargs, cfg.batch_size, hidden)
        return out
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
        hidden, kwargs = oe.capture_layer_inputs(model, calib, dev, cfg.batch_size)
        plan = shipped_plan(model, calib, hidden, kwargs, cfg, dev, oe.Log(True))
        oe.compress_linear = split({n: b.double().mean().item() for n, b in plan.items()})
    elif variant in ("plan-layer", "fisher-layer") and cfg.mixed:
        fisher = None
        if variant == "fisher-layer":
            hidden, kwargs = oe.capture_layer_inputs(model, calib, dev, cfg.batch_size)
            fisher = oe.output_sensitivity(model, calib, hidden, kwargs, dev, cfg.batch_size)
        oe.plan_model_bits = layer_plan(fisher)
    if variant in ("plan-layer", "fisher-layer", "fisher-model"):
        cfg.bit_scope = "model"  # compress() then asks plan_model_bits for the bits
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

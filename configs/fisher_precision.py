"""How the numerics of opt_enhanced.output_sensitivity move --bit_scope model on opt-mini: the diagonal Fisher
from one whole-model fp32 autograd pass (the shipped computation until session 5, which ran out of memory at
OPT-6.7B), from the shipped layer-by-layer pass with full-fp32 matmuls, and as shipped (layer by layer, TF32).
For each: how far F is from the whole-model one (largest over the Linears of |F - F_ref| / |F_ref|), how many channels get other bits, and
the perplexities (validation texts and test sets).

    PYTHONPATH=. python3 configs/fisher_precision.py OUT.json [SEEDS]   # repo root, ../shared copies in .local/
"""
import sys

import torch
import torch.nn as nn

import opt_enhanced as oe
from sweeplib import dev, record, setup

SEEDS = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0").split(",")]
shipped_sensitivity = oe.output_sensitivity
set_precision = torch.set_float32_matmul_precision


def whole_model(model, calibration, hidden, kwargs, dev_, batch_size):
    """The earlier computation: the whole model in fp32, gradients of every Linear's output in one pass."""
    names = {lin: f"model.decoder.layers.{i}.{n}"
             for i, layer in enumerate(model.model.decoder.layers) for n, lin in oe.find_linears(layer).items()}
    sums = {}

    def keep(m, x, y):
        y.register_hook(lambda g, n=names[m]: sums.__setitem__(n, sums.get(n, 0) + (g.flatten(0, -2).float() ** 2).sum(0)))

    handles = [lin.register_forward_hook(keep) for lin in names]
    handles.append(model.model.decoder.embed_tokens.register_forward_hook(lambda m, x, y: y.requires_grad_()))
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    model.float()
    tokens = 0
    with torch.enable_grad():
        for start in range(0, len(calibration), batch_size):
            ids = calibration[start:start + batch_size].to(dev_)
            logits = model(ids, use_cache=False).logits[:, :-1]
            nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
            tokens += ids[:, 1:].numel()
    model.to(dtype)
    for h in handles:
        h.remove()
    return {n: s / tokens for n, s in sums.items()}


def full_fp32(*args):
    torch.set_float32_matmul_precision = lambda _: None  # keep "highest" inside the shipped pass
    try:
        return shipped_sensitivity(*args)
    finally:
        torch.set_float32_matmul_precision = set_precision


VARIANTS = {"whole-model fp32": whole_model, "layer by layer, fp32": full_fp32, "layer by layer, TF32 (shipped)": shipped_sensitivity}
rows = []
for seed in SEEDS:
    for bits in (3, 4):
        flags = ["--sparsity", "0.5", "--wbits", str(bits), "--target_avg_bits", str(bits), "--bit_method", "budget",
                 "--bit_scope", "model"]
        reference = plan = None
        for variant, sensitivity in VARIANTS.items():
            cfg, model, calib = setup(flags, seed)
            hidden, kwargs = oe.capture_layer_inputs(model, calib, dev, cfg.batch_size)
            fisher = sensitivity(model, calib, hidden, kwargs, dev, cfg.batch_size)
            reference = reference or fisher
            oe.output_sensitivity = lambda *_: fisher
            out = oe.compress(model, calib, cfg, dev, oe.Log(True))
            oe.output_sensitivity = shipped_sensitivity
            plan = plan or out.bits
            row = {"seed": seed, "bits": bits, "variant": variant,
                   "rel_diff_F": max(((fisher[n] - f).norm() / f.norm()).item() for n, f in reference.items()),
                   "channels_moved": sum(int((out.bits[n] != b).sum()) for n, b in plan.items()),
                   "channels": sum(len(b) for b in plan.values())}
            record(rows, row, model, sys.argv[1])

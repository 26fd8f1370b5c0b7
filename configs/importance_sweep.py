"""Issue 3: how strongly the five-metric importance should weigh the solver's rounding-error estimate,
chosen on validation text (the test perplexities are recorded too, not used for the choice).

    PYTHONPATH=. python3 configs/importance_sweep.py OUT.json alpha   [SEEDS]   # repo root, ../shared copies in .local/
    PYTHONPATH=. python3 configs/importance_sweep.py OUT.json weights [SEEDS]   # --importance_weights choices

Budget score = importance_j^alpha * error_j(b), with the error shrunk by lambda toward its layer mean
(alpha = 1, lambda = 0.25 is the shipped allocator). "geo" combines the five normalised metrics by a
geometric instead of an arithmetic mean. Validation as in configs/shrinkage_sweep.py: WikiText-2 valid,
PTB valid, 32 C4 train windows drawn with seed 12345. Calibration seeds 0-2, 3.0 and 4.0 bits.
"""
import sys

import torch

import opt_enhanced as oe
import sparsegpt_enhanced
from sweeplib import dev, record, setup

EQUAL = "1,1,1,1,1"
SETS = {
    "alpha": [("a1", 0.25, 1.0, False, EQUAL), ("a0.5", 0.25, 0.5, False, EQUAL), ("a0", 0.25, 0.0, False, EQUAL),
              ("a0.5-l0", 0.0, 0.5, False, EQUAL), ("geo", 0.25, 1.0, True, EQUAL)],
    "weights": [(w, 0.25, 1.0, False, w) for w in (
        EQUAL, "1,0,0,0,0", "0,1,0,0,0", "0,0,1,0,0", "0,0,0,1,0", "0,0,0,0,1",
        "0,1,1,1,1", "1,0,1,1,1", "1,1,0,1,1", "1,1,1,0,1", "1,1,1,1,0")],
}
VARIANTS = SETS[sys.argv[2]]
SEEDS = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1,2").split(",")]
arithmetic = sparsegpt_enhanced.combine_metrics
shipped_importance = oe.importance


def geometric(metrics, weights):
    mean = metrics.mean(1, keepdim=True)
    normalised = torch.where(mean > 0, metrics / mean.clamp_min(1e-30), torch.ones_like(metrics)).clamp_min(1e-6)
    w = torch.tensor(weights, dtype=metrics.dtype, device=metrics.device)
    combined = torch.exp((w[:, None] * normalised.log()).sum(0) / w.sum())
    return combined / combined.mean()


def tempered(alpha):
    def importance(weight, solver, cfg):
        metrics, imp = shipped_importance(weight, solver, cfg)
        imp = imp.clamp_min(1e-6) ** alpha
        return metrics, imp / imp.mean()
    return importance


rows = []


def one(tag, variant, flags, seed):
    name, lam, alpha, geo, weights = variant
    oe.ERROR_SHRINKAGE = lam
    oe.combine_metrics = geometric if geo else arithmetic
    oe.importance = tempered(alpha)
    cfg, model, calib = setup([*flags, "--importance_weights", weights], seed)
    oe.compress(model, calib, cfg, dev, oe.Log(True))
    record(rows, {"tag": tag, "variant": name, "seed": seed}, model, sys.argv[1])


for seed in SEEDS:
    for bits in (3, 4):
        one(f"uniform{bits}", VARIANTS[0], ["--sparsity", "0.5", "--wbits", str(bits)], seed)
        for v in VARIANTS:
            one(f"budget{bits}", v, ["--sparsity", "0.5", "--wbits", str(bits), "--target_avg_bits", str(bits),
                                     "--bit_method", "budget"], seed)

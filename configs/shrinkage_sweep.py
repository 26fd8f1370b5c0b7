"""Issue 3: choose opt_enhanced.ERROR_SHRINKAGE on validation text, and record the test perplexities too.

    PYTHONPATH=. python3 configs/shrinkage_sweep.py OUT.json [0,0.25,0.5,0.75,1]   # repo root, ../shared copies in .local/

Validation: WikiText-2 valid (wikitext-2/wiki.valid.tokens), PTB valid (ptb/ptb.valid.txt) and 32 C4 train
windows drawn with seed 12345 (other windows of the same documents the calibration draws from). 50% + uniform 3/4-bit and 50% + budget at 3.0/4.0 bits for
each shrinkage, calibration seeds 0-2.
"""
import sys

import opt_enhanced as oe
from sweeplib import dev, record, setup

SHRINKAGES = [float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "0,0.25,0.5,0.75,1").split(",")]
rows = []


def one(tag, lam, flags, seed):
    oe.ERROR_SHRINKAGE = lam
    cfg, model, calib = setup(flags, seed)
    oe.compress(model, calib, cfg, dev, oe.Log(True))
    record(rows, {"tag": tag, "lam": lam, "seed": seed}, model, sys.argv[1])


for seed in (0, 1, 2):
    for bits in (3, 4):
        one(f"uniform{bits}", None, ["--sparsity", "0.5", "--wbits", str(bits)], seed)
        for lam in SHRINKAGES:
            one(f"budget{bits}", lam, ["--sparsity", "0.5", "--wbits", str(bits), "--target_avg_bits", str(bits), "--bit_method", "budget"], seed)

"""Issue 3: choose opt_enhanced.ERROR_SHRINKAGE on validation text, and record the test perplexities too.

    PYTHONPATH=. python3 configs/shrinkage_sweep.py OUT.json [0,0.25,0.5,0.75,1]   # repo root, ../shared copies in .local/

Validation: WikiText-2 valid (wikitext-2/wiki.valid.tokens), PTB valid (ptb/ptb.valid.txt) and 32 C4 train
windows drawn with seed 12345 (other windows of the same documents the calibration draws from). 50% + uniform 3/4-bit and 50% + budget at 3.0/4.0 bits for
each shrinkage, calibration seeds 0-2.
"""
import json
import sys

import torch


import datautils
import opt_enhanced as oe
M, D, C = ".local/opt-mini", ".local/data", "/tmp/c1"
dev = torch.device("cuda")
SHRINKAGES = [float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "0,0.25,0.5,0.75,1").split(",")]
tok = datautils.get_tokenizer(M)
ptb = datautils._tokenize_long(tok, " ".join(l.strip() for l in open(f"{D}/ptb/ptb.valid.txt")))[None]
wt2 = datautils._tokenize_long(tok, "\n\n".join("" if l == " \n" else l for l in open(f"{D}/wikitext-2/wiki.valid.tokens")))[None]
c4h = datautils.get_calibration("c4", tok, 32, 12345, 2048, D, C).reshape(1, -1)
valid = {"wt2-valid": wt2, "ptb-valid": ptb, "c4-heldout": c4h}
test = {d: datautils.get_eval_ids(d, tok, 2048, D, C) for d in oe.EVAL_DATASETS}
rows = []
def one(tag, lam, flags, seed):
    oe.ERROR_SHRINKAGE = lam
    cfg = oe.parse_args([M, "c4", "--data_dir", D, "--cache_dir", C, "--seed", str(seed), "--quiet", *flags])
    model = oe.load_opt(M, True); oe.place(model, dev)
    calib = datautils.get_calibration("c4", tok, 128, seed, 2048, D, C)
    oe.compress(model, calib, cfg, dev, oe.Log(True))
    r = {"tag": tag, "lam": lam, "seed": seed}
    r.update({k: oe.perplexity(model, v, 2048, dev, 8) for k, v in {**valid, **test}.items()})
    rows.append(r); print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
for seed in (0, 1, 2):
    for bits in (3, 4):
        one(f"uniform{bits}", None, ["--sparsity", "0.5", "--wbits", str(bits)], seed)
        for lam in SHRINKAGES:
            one(f"budget{bits}", lam, ["--sparsity", "0.5", "--wbits", str(bits), "--target_avg_bits", str(bits), "--bit_method", "budget"], seed)
json.dump(rows, open(sys.argv[1], "w"), indent=1)

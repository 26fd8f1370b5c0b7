"""opt-mini and its data for the probes here (copies of ../shared in .local/), the validation texts
choices are made on, the test sets recorded beside them, and one compress-and-measure run.

Validation: WikiText-2 valid, PTB valid and 32 C4 train windows drawn with seed 12345 (other windows of the
documents the calibration draws from)."""
import json

import torch

import datautils
import opt_enhanced as oe
from modelutils import load_opt
from runtime import write_json

M, D, C = ".local/opt-mini", ".local/data", "/tmp/c1"
dev = torch.device("cuda")
tok = datautils.get_tokenizer(M)
_ptb = datautils._tokenize_long(tok, " ".join(l.strip() for l in open(f"{D}/ptb/ptb.valid.txt")))[None]
_wt2 = datautils._tokenize_long(tok, "\n\n".join("" if l == " \n" else l for l in open(f"{D}/wikitext-2/wiki.valid.tokens")))[None]
_c4h = datautils.get_calibration("c4", tok, 32, 12345, 2048, D, C).reshape(1, -1)
TEXTS = {"wt2-valid": _wt2, "ptb-valid": _ptb, "c4-heldout": _c4h,
         **{d: datautils.get_eval_ids(d, tok, 2048, D, C) for d in oe.EVAL_DATASETS}}


def setup(flags: list[str], seed: int):
    """(cfg, model on the GPU, calibration windows) for one run."""
    cfg = oe.parse_args([M, "c4", "--data_dir", D, "--cache_dir", C, "--seed", str(seed), "--quiet", *flags])
    model = load_opt(M, True)
    oe.place(model, dev)
    return cfg, model, datautils.get_calibration("c4", tok, 128, seed, 2048, D, C)


def record(rows: list, row: dict, model, path: str) -> None:
    """Perplexity on every text into `row`; print it and rewrite `path` with all rows so far."""
    row.update({k: oe.perplexity(model, v, 2048, dev, 8) for k, v in TEXTS.items()})
    rows.append(row)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    write_json(rows, path)

"""The texts mixed-precision settings are chosen on, and the test sets reported beside them, as token ids.

Validation: WikiText-2 valid (the tokenized split; opt-mini was trained on it, so only the next two are held
out), PTB valid, and 32 C4 train windows drawn with seed 12345 (other windows of the documents the calibration
draws from). Test: the SparseGPT protocol's WikiText-2, PTB and C4 (pipeline.config.EVAL_DATASETS).
"""
from __future__ import annotations

from pathlib import Path

import torch

import datautils
from pipeline.config import EVAL_DATASETS

VALIDATION = ("wt2-valid", "ptb-valid", "c4-heldout")
HELD_OUT = ("ptb-valid", "c4-heldout")  # the validation texts opt-mini never saw


def validation_texts(tokenizer, data_dir: str, cache_dir: str | None, seqlen: int) -> dict[str, torch.Tensor]:
    """Validation and test token ids by name, each (1, n)."""
    d = Path(data_dir)
    wt2 = "\n\n".join("" if line == " \n" else line for line in open(d / "wikitext-2/wiki.valid.tokens"))
    ptb = " ".join(line.strip() for line in open(d / "ptb/ptb.valid.txt"))
    out = {"wt2-valid": datautils.tokenize_long(tokenizer, wt2)[None],
           "ptb-valid": datautils.tokenize_long(tokenizer, ptb)[None],
           "c4-heldout": datautils.get_calibration("c4", tokenizer, 32, 12345, seqlen, data_dir, cache_dir).reshape(1, -1)}
    out.update({name: datautils.get_eval_ids(name, tokenizer, seqlen, data_dir, cache_dir) for name in EVAL_DATASETS})
    return out

"""Why --act-order moves PTB by several perplexity at 50% sparsity, and whether that changes issue 3's comparison.

SparseGPT picks the mask a block of 128 columns at a time: exactly 50% of each block's weights, those with the
smallest w^2 / d^2. In stored order a block mixes loud and quiet input channels, so the mask can prune the quiet
ones (quiet on the calibration text) hardest; with act-order each block holds channels of similar loudness, so
every loudness tier keeps half its weights. Variants, each with uniform and budget mixed widths:
  act     --act-order (the CLI as shipped)
  global  the mask of each block prunes as many weights as the whole matrix's OBS ranking (dense weights, solve
          order) puts in it, so blocks no longer have equal sparsity (a scratch change, patched in here);
          in stored order and with act-order
  damp    --percdamp 0.1, which makes quiet channels look less free to the mask and the allocator
plus pruning alone and quantization alone, with and without act-order, to see which step the PTB gain is in.

    PYTHONPATH=. python3 configs/mask_probe.py OUT.json 0,1,2,3,4   # repo root, ../shared copies in .local/
"""
import sys

import torch

import opt_enhanced as oe
import sparsegpt_enhanced as sg
from sweeplib import dev, record, setup

rows = []
block_mask = sg.unstructured_mask
shipped_fasterprune = sg.SparseGPT.fasterprune


def globally_ranked_fasterprune(self, weight, prune, grid=None, bits_per_column=None, blocksize=128,
                                percdamp=0.01, order=None, fused=True):
    """fasterprune, but block k prunes count_k weights: how many of the whole matrix's floor(numel * sparsity)
    smallest w^2 / d^2 (dense weights, solve order) fall in block k. Total sparsity is unchanged."""
    factor = self.inverse_factor(percdamp, order)
    W = (weight.float() if order is None else weight.float()[:, order]).clone()
    W[:, factor.dead] = 0
    ranked = block_mask(W, torch.diag(factor.upper), prune.sparsity)
    counts = iter([int(ranked[:, i:i + blocksize].sum()) for i in range(0, W.shape[1], blocksize)])

    def counted_mask(W1, d, sparsity):
        score = (W1 ** 2 / d[None, :] ** 2).flatten()
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[torch.sort(score).indices[:next(counts)]] = True
        return mask.view(W1.shape)

    sg.unstructured_mask = counted_mask
    try:
        return shipped_fasterprune(self, weight, prune, grid, bits_per_column, blocksize, percdamp, order, fused)
    finally:
        sg.unstructured_mask = block_mask


def one(tag: str, flags: list[str], seed: int, globally_ranked: bool = False) -> None:
    sg.SparseGPT.fasterprune = globally_ranked_fasterprune if globally_ranked else shipped_fasterprune
    cfg, model, calib = setup(flags, seed)
    oe.compress(model, calib, cfg, dev, oe.Log(True))
    record(rows, {"tag": tag, "seed": seed}, model, sys.argv[1])


for seed in [int(s) for s in sys.argv[2].split(",")]:
    one("prune", ["--sparsity", "0.5"], seed)
    one("prune-act", ["--sparsity", "0.5", "--act-order"], seed)
    one("prune-global", ["--sparsity", "0.5"], seed, globally_ranked=True)
    one("prune-act-global", ["--sparsity", "0.5", "--act-order"], seed, globally_ranked=True)
    one("gptq3", ["--wbits", "3"], seed)
    one("gptq3-act", ["--wbits", "3", "--act-order"], seed)
    for b in (3, 4):
        uniform = ["--sparsity", "0.5", "--wbits", str(b)]
        for kind, flags in (("uniform", uniform), ("budget", uniform + ["--target_avg_bits", str(b), "--bit_method", "budget"])):
            one(f"{kind}{b}", flags, seed)
            one(f"{kind}{b}-act", flags + ["--act-order"], seed)
            one(f"{kind}{b}-global", flags, seed, globally_ranked=True)
            one(f"{kind}{b}-act-global", flags + ["--act-order"], seed, globally_ranked=True)
            one(f"{kind}{b}-damp", flags + ["--percdamp", "0.1"], seed)

"""How far opt-mini's perplexities move when the shipped allocation changes by the least it can: the bits of two
channels of one Linear swapped (the same average, two channels at another width). Seed 0, 50%, budget, layer
scope; one row unperturbed, then TRIALS rows, each swapping two random channels in one random Linear whose
widths are neighbouring options (MODE adjacent: one channel a step up, one a step down) or any two different
widths (MODE any). A diagnostic of the noise floor under single-seed comparisons, not a way to pick allocations.

    PYTHONPATH=. python3 configs/noise_floor.py OUT.json [TRIALS] [adjacent|any]   # repo root, ../shared copies in .local/
"""
import sys

import torch

import opt_enhanced as oe
from sweeplib import dev, record, setup

TRIALS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
MODE = sys.argv[3] if len(sys.argv) > 3 else "adjacent"  # any: two channels of any two widths
LINEARS = 48  # opt-mini: 8 layers x 6 Linears, allocated one after another
shipped_allocate = oe.allocate
rows = []


def swap_two(trial: int):
    """oe.allocate, but at one Linear (chosen by `trial`) two channels of different widths trade bits."""
    g = torch.Generator().manual_seed(trial)
    target = [int(torch.randint(LINEARS, (1,), generator=g))]
    calls = iter(range(LINEARS))

    def allocate(score, size, cfg):
        bits = shipped_allocate(score, size, cfg)
        if next(calls) == target[0]:
            if bits.unique().numel() < 2:  # one width only: the next Linear then
                target[0] += 1
                return bits
            rank = torch.searchsorted(torch.tensor(sorted(cfg.bit_options)), bits)  # index of each width
            while True:
                i, j = torch.randint(len(bits), (2,), generator=g).tolist()
                if rank[i] != rank[j] and (MODE == "any" or abs(int(rank[i]) - int(rank[j])) == 1):
                    bits[i], bits[j] = int(bits[j]), int(bits[i])
                    return bits
        return bits
    return allocate, target


for width in (3, 4):
    flags = ["--sparsity", "0.5", "--wbits", str(width), "--target_avg_bits", str(width), "--bit_method", "budget"]
    for trial in range(-1, TRIALS):
        cfg, model, calib = setup(flags, 0)
        oe.allocate, linear = (shipped_allocate, [None]) if trial < 0 else swap_two(trial)
        out = oe.compress(model, calib, cfg, dev, oe.Log(True))
        oe.allocate = shipped_allocate
        record(rows, {"bits": width, "mode": MODE, "trial": trial, "linear": None if linear[0] is None else out.stats[linear[0]].name,
                      "avg_bits": sum(sum(s.bits_per_column) * s.rows for s in out.stats)
                      / sum(s.rows * s.columns for s in out.stats)}, model, sys.argv[1])

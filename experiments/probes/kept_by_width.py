"""Which channels a mixed run puts at each width, by how many of their weights the mask kept (benchmarks/mixed_precision.md).

For every Linear: the share of its input channels at each width and their mean kept-weight count relative to
the Linear's mean; then, for each kind of Linear (q_proj, fc2, ...), the mean share at each width and the mean
width over its stored weights. CPU, a few minutes with a small calibration:

    python experiments/kept_by_width.py --model .local/opt-mini --data_dir .local/data [--dataset ptb] -- \\
        --sparsity 0.5 --wbits 3 --target_avg_bits 3.0 --bit_method budget --nsamples 16 --seqlen 256
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # experiments/

import torch  # noqa: E402

import datautils  # noqa: E402
import opt_enhanced  # noqa: E402
from modelutils import load_model  # noqa: E402
from pipeline.checks import validate  # noqa: E402
from pipeline.compress import compress  # noqa: E402
from systems.progress import Log  # noqa: E402
from tokenizer_loading import get_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".local/opt-mini")
    p.add_argument("--data_dir", default=".local/data")
    p.add_argument("--dataset", default="c4", choices=datautils.DATASETS, help="calibration text")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="opt_enhanced.py flags, after --")
    args = p.parse_args()
    flags = [f for f in args.flags if f != "--"]
    cfg = opt_enhanced.parse_args([args.model, args.dataset, "--data_dir", args.data_dir, "--device", "cpu", *flags])
    validate(cfg)
    tokenizer = get_tokenizer(cfg.model)
    seqlen = cfg.seqlen or 2048
    calibration = datautils.get_calibration(args.dataset, tokenizer, cfg.nsamples, cfg.seed, seqlen, cfg.data_dir, None)
    model = load_model(cfg.model, True)
    compressed = compress(model, calibration, cfg, torch.device("cpu"), Log(True))
    modules = dict(model.named_modules())
    print("width: share of the Linear's channels / their mean kept count relative to the Linear's mean")
    widths = sorted(compressed.mixed_precision.options)
    shares, stored = defaultdict(list), defaultdict(list)
    for stats in compressed.stats:
        kept = (modules[stats.name].weight.data != 0).sum(0).float()
        bits = torch.tensor(stats.bits_per_column)
        cells = [f"{b}: {100 * (bits == b).float().mean():4.1f}% / {kept[bits == b].mean() / kept.mean():.2f}"
                 for b in sorted(set(bits.tolist()))]
        print(f"{stats.name:42s} " + "   ".join(cells))
        kind = stats.name.rsplit(".", 1)[-1]
        shares[kind].append([float((bits == b).float().mean()) for b in widths])
        stored[kind].append(float((bits * kept).sum() / kept.sum()))
    print("kind: mean share of the channels at " + "/".join(map(str, widths)) + " bits; mean width per stored weight")
    for kind, rows in shares.items():
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(len(widths))]
        print(f"{kind:10s} " + " ".join(f"{100 * m:5.1f}%" for m in mean)
              + f"   {sum(stored[kind]) / len(stored[kind]):.2f}")


if __name__ == "__main__":
    main()

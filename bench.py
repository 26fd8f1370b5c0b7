"""Benchmark: time and peak GPU memory per stage, for many configurations in one process.

    python bench.py MODEL --configs FILE [--data_dir DIR] [--json OUT]

FILE has one configuration per line, `name|flags` (the flags of opt_enhanced.py, without the model);
`--dataset` defaults to c4. Each configuration loads the model afresh; tokenized data is memoised, so
`tokenize` is only paid by the first configuration (and by none with a warm --cache_dir).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import opt_enhanced as oe

STAGES = ("load", "tokenize", "compress", "evaluate", "total")


def read_configs(path: str) -> list[tuple[str, list[str]]]:
    configs = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, flags = line.partition("|")
            configs.append((name.strip(), shlex.split(flags)))
    return configs


def row(name: str, res: dict) -> str:
    ppl = res["perplexity"]
    s = res["summary"] or {}
    t = res["timings"]
    mem = max(res["peak_gpu_gib"].values(), default=0.0)
    cells = [f"{ppl.get(d, float('nan')):8.2f}" for d in oe.EVAL_DATASETS]
    cells += [f"{s.get('avg_bits_weighted', 16):5.2f}", f"{s.get('effective_bits', 16):5.2f}"]
    cells += [f"{t.get(k, 0):7.2f}" for k in STAGES] + [f"{mem:6.2f}"]
    return f"| {name:18s} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--configs", required=True)
    p.add_argument("--dataset", default="c4")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--json", default="", help="write every run's results here")
    args = p.parse_args(argv)

    common = [args.model, args.dataset, "--quiet"]
    common += ["--data_dir", args.data_dir] if args.data_dir else []
    common += ["--cache_dir", args.cache_dir] if args.cache_dir else []
    header = ["wikitext2", "ptb", "c4", "bits", "eff.b"] + [f"{k} s" for k in STAGES] + ["GiB"]
    print("| config             | " + " | ".join(header) + " |", flush=True)
    print("|---" * (len(header) + 1) + "|", flush=True)
    results = {}
    for name, flags in read_configs(args.configs):
        cfg = oe.parse_args(common + flags)
        oe.validate(cfg)
        results[name] = oe.run(cfg)
        print(row(name, results[name]), flush=True)
    if args.json:
        oe.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

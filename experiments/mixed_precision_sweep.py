"""Mixed precision against uniform quantization on opt-mini: every configuration of a run list, over seeds,
scored on validation text (where settings are chosen) and on the test sets (what is reported).

    python experiments/mixed_precision_sweep.py run configs/mixed_precision.txt OUT.json --seeds 0,1,2 \
        --model .local/opt-mini --data_dir .local/data [--only NAME,NAME]
    python experiments/mixed_precision_sweep.py table OUT.json [OUT2.json ...]
    python experiments/mixed_precision_sweep.py score OUT.json [OUT2.json ...]

Run lists are `name|calibration dataset|flags` lines (configs/, configs/ablations/). Flags are opt_enhanced's;
a `field=value` word sets a RunConfig field that has no flag (the variants that lost, e.g. `channel_cost=error`,
`solve_order=narrow_first`). One process runs them all: the model is reloaded for each run, tokenized data is
cached. Validation texts: validation_texts.py. `table` prints the seed means of each configuration with its
nominal, stored and effective bits; `score` the mean change of each variant against uniform at the same width,
the figure defaults are chosen on.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses  # noqa: E402

import torch  # noqa: E402

import datautils  # noqa: E402
import opt_enhanced  # noqa: E402
from mixed.stats import summarize  # noqa: E402
from modelutils import load_model  # noqa: E402
from pipeline.checks import validate  # noqa: E402
from pipeline.compress import compress  # noqa: E402
from pipeline.config import EVAL_DATASETS, RunConfig  # noqa: E402
from pipeline.evaluate import eval_windows, perplexity  # noqa: E402
from pipeline.placement import place  # noqa: E402
from systems.atomic_io import write_json  # noqa: E402
from systems.progress import Log  # noqa: E402
from tokenizer_loading import get_tokenizer  # noqa: E402
from validation_texts import VALIDATION, validation_texts  # noqa: E402

TEST = EVAL_DATASETS


def read_runs(path: str) -> list[tuple[str, str, list[str]]]:
    runs = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, dataset, flags = (x.strip() for x in line.split("|"))
            runs.append((name, dataset, shlex.split(flags)))
    return runs


def run_config(model_dir: str, dataset: str, words: list[str], seed: int, args: argparse.Namespace) -> RunConfig:
    """A run list line's settings: its flags through the CLI's parser, then its `field=value` words (typed as the
    field's default is) on the RunConfig, checked as the CLI checks a run."""
    flags = [w for w in words if "=" not in w or w.startswith("-")]
    cfg = opt_enhanced.parse_args([model_dir, dataset, "--data_dir", args.data_dir, "--cache_dir", args.cache_dir,
                                   "--seed", str(seed), "--seqlen", str(args.seqlen), "--quiet", *flags])
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for word in (w for w in words if w not in flags):
        name, value = word.split("=", 1)
        kind = type(getattr(cfg, name)) if name in fields else None
        if kind is None:
            raise SystemExit(f"{word}: RunConfig has no field {name!r}")
        cfg = dataclasses.replace(cfg, **{name: kind(value)})
    validate(cfg)
    return cfg


def compressed_model(cfg: RunConfig, dev: torch.device, tokenizer):
    """One run's compression as the CLI does it: (the compressed model on `dev`, what compress returned, the
    seconds compress took)."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, True)
    place(model, dev)
    calibration = datautils.get_calibration(cfg.dataset, tokenizer, cfg.nsamples, cfg.seed, cfg.seqlen, cfg.data_dir,
                                            cfg.cache_dir)
    tick = time.time()
    compressed = compress(model, calibration, cfg, dev, Log(True))
    return model, compressed, time.time() - tick


def run(args: argparse.Namespace) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = args.cache_dir
    tokenizer = get_tokenizer(args.model)
    seqlen = args.seqlen
    scored = validation_texts(tokenizer, args.data_dir, cache, seqlen)
    if args.texts:
        scored = {name: scored[name] for name in args.texts.split(",")}
    rows = json.load(open(args.out)) if os.path.exists(args.out) else []
    done = {(r["name"], r["seed"]) for r in rows}
    only = set(args.only.split(",")) if args.only else None
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, dataset, flags in read_runs(args.runs):
            if (only and name not in only) or (name, seed) in done:
                continue
            cfg = run_config(args.model, dataset, flags, seed, args)
            model, compressed, seconds = compressed_model(cfg, dev, tokenizer)
            summary = summarize(compressed.stats) if cfg.quantize else None
            row = {"name": name, "seed": seed, "dataset": dataset, "flags": flags, "compress_s": seconds,
                   "summary": None if summary is None else summary.__dict__,
                   "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
            row.update({k: perplexity(model, eval_windows(v, seqlen), dev, 8) for k, v in scored.items()})
            rows.append(row)
            write_json(rows, args.out)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in ("summary", "flags")}), flush=True)


def table(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.load(open(p))]
    names = list(dict.fromkeys(r["name"] for r in rows))
    cols = [c for c in VALIDATION + TEST if c in rows[0]]  # the texts the runs were scored on (run --texts)
    print("| run | seeds | " + " | ".join(cols) + " | nominal b | stored b | effective b |")
    print("|---" * (len(cols) + 5) + "|")
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        mean = lambda k: sum(r[k] for r in mine) / len(mine)
        bits = lambda k: sum(r["summary"][k] for r in mine) / len(mine) if mine[0]["summary"] else float("nan")
        cells = [f"{mean(c):.2f}" for c in cols]
        cells += [f"{bits(k):.3f}" for k in ("avg_bits_weighted", "stored_bits", "effective_bits")]
        seeds = ",".join(str(r["seed"]) for r in mine)
        print(f"| {name} | {seeds} | " + " | ".join(cells) + " |")


def score(paths: list[str], validation: tuple[str, ...] = VALIDATION, against: str = "") -> None:
    """Each variant (the part of a run's name after `PREFIX-METHODWIDTH`) against uniform at the same width and
    prefix: the mean relative change of perplexity over its runs and seeds, on validation and on test text.
    Variants are chosen on the validation column (`validation`: which texts it averages). `against`: a variant
    that every other one is paired with, each counted only over the runs (prefix, method, width, seed) that both
    have; a later file's run replaces an earlier one of the same name and seed."""
    rows = [r for p in paths for r in json.load(open(p))]
    by = {(r["name"], r["seed"]): r for r in rows}
    cells: dict[str, dict[tuple, tuple[float, float]]] = {}
    for r in by.values():
        prefix, method, *rest = r["name"].split("-")
        width = method.lstrip("quantilebudget")
        base = by.get((f"{prefix}-uniform{width}", r["seed"]))
        if method.startswith("uniform") or base is None:
            continue
        rel = lambda cols: sum(r[c] / base[c] - 1 for c in cols) / len(cols) if cols else float("nan")
        variant = "-".join(rest) or "(default of the run list)"
        cells.setdefault(variant, {})[(prefix, method, r["seed"])] = (rel(validation), rel([c for c in TEST if c in r]))
    mean = lambda values, i: 100 * sum(v[i] for v in values) / len(values)
    if against:
        print(f"| variant | runs | validation ({', '.join(validation)}) | test | {against} on the same runs: validation | test |")
        print("|---|---|---|---|---|---|")
    else:
        print(f"| variant | runs | validation ({', '.join(validation)}) | test |")
        print("|---|---|---|---|")
    for variant, v in sorted(cells.items(), key=lambda kv: mean(kv[1].values(), 0)):
        if not against:
            print(f"| {variant} | {len(v)} | {mean(v.values(), 0):+.2f}% | {mean(v.values(), 1):+.2f}% |")
        elif variant != against:
            keys = [k for k in v if k in cells.get(against, {})]
            if keys:
                mine, theirs = [v[k] for k in keys], [cells[against][k] for k in keys]
                print(f"| {variant} | {len(keys)} | {mean(mine, 0):+.2f}% | {mean(mine, 1):+.2f}% | "
                      f"{mean(theirs, 0):+.2f}% | {mean(theirs, 1):+.2f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("runs")
    r.add_argument("out")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--model", default=".local/opt-mini")
    r.add_argument("--data_dir", default=".local/data")
    r.add_argument("--cache_dir", default="/tmp/opt-enhanced-cache")
    r.add_argument("--seqlen", type=int, default=2048)
    r.add_argument("--only", default="", help="comma-separated run names")
    r.add_argument("--texts", default="", help="comma-separated texts to score (default: every validation and test "
                                               "text; on a CPU, e.g. ptb-valid,c4-heldout)")
    sub.add_parser("table").add_argument("paths", nargs="+")
    sc = sub.add_parser("score")
    sc.add_argument("paths", nargs="+")
    sc.add_argument("--validation", default=",".join(VALIDATION),
                    help="the validation texts averaged (opt-mini was trained on WikiText-2 valid: ptb-valid,c4-heldout "
                         "leaves it out)")
    sc.add_argument("--against", default="", help="pair every variant with this one, over the runs both have")
    args = p.parse_args()
    {"run": lambda: run(args), "table": lambda: table(args.paths),
     "score": lambda: score(args.paths, tuple(args.validation.split(",")), args.against)}[args.command]()


if __name__ == "__main__":
    main()

"""Benchmark: time and peak GPU memory per stage, for many configurations in one process.

    python bench.py MODEL --configs FILE [--data_dir DIR] [--json OUT]
    python bench.py --synthetic opt-6.7b [--layers N] [--offload] [-- FLAGS]

FILE has one configuration per line, `name|flags` (the flags of opt_enhanced.py, without the model);
`--dataset` defaults to c4. Each configuration loads the model afresh; tokenized data is memoised, so
`tokenize` is only paid by the first configuration (and by none with a warm --cache_dir).

--synthetic builds a random-weight fp16 OPT with the named model's shapes (no download) and times
the full compression path on random calibration tokens (default 128 x 2048, 50% + 4-bit).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

import opt_enhanced as oe
from runtime import Log, Stages, write_json

# hidden, layers, heads, ffn of the published OPT models
SHAPES = {"opt-125m": (768, 12, 12, 3072), "opt-1.3b": (2048, 24, 32, 8192), "opt-6.7b": (4096, 32, 32, 16384),
          "opt-13b": (5120, 40, 40, 20480), "opt-175b": (12288, 96, 96, 49152)}

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
    cells += [f"{s.get(k, 16):5.3f}" for k in ("avg_bits_weighted", "stored_bits", "effective_bits")]
    cells += [f"{t.get(k, 0):7.2f}" for k in STAGES] + [f"{mem:6.2f}"]
    return f"| {name:18s} | " + " | ".join(cells) + " |"


def synthetic(name: str, layers: int | None, offload: bool, flags: list[str]) -> dict:
    """Compression of a random-weight OPT of the given shape: seconds and peak GPU memory."""
    from transformers import OPTConfig, OPTForCausalLM

    hidden, nlayers, heads, ffn = SHAPES[name]
    cfg = oe.parse_args(["synthetic", "c4", "--quiet", *(flags or ["--sparsity", "0.5", "--wbits", "4"])])
    dev = torch.device(cfg.device or "cuda")
    shape = OPTConfig(hidden_size=hidden, num_hidden_layers=layers or nlayers, num_attention_heads=heads, ffn_dim=ffn,
                      word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048, dropout=0.0)
    tick = time.time()
    torch.set_default_dtype(torch.float16)
    with torch.device(dev):
        model = OPTForCausalLM(shape).eval()
    torch.set_default_dtype(torch.float32)
    oe.place(model, dev, offload)
    built = time.time() - tick
    seqlen = cfg.seqlen or 2048
    calibration = torch.randint(0, shape.vocab_size, (cfg.nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    stage = Stages(dev)
    with stage("compress"):
        done = oe.compress(model, calibration, cfg, dev, Log(True))
    seconds = stage.seconds["compress"]
    per_layer = [s.seconds for s in done.stats]
    return {"shape": name, "layers": shape.num_hidden_layers, "of": nlayers, "offload": offload,
            "flags": flags, "build_s": built, "compress_s": seconds, "per_layer_s": seconds / shape.num_hidden_layers,
            "solver_s": sum(per_layer), "peak_gpu_gib": stage.peak_gib.get("compress", 0.0),
            "params": sum(p.numel() for p in model.parameters()),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("--configs")
    p.add_argument("--synthetic", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="--synthetic: build only this many decoder layers")
    p.add_argument("--offload", action="store_true", help="--synthetic: keep the model on the CPU")
    p.add_argument("--dataset", default="c4")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--json", default="", help="write every run's results here")
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []  # --synthetic: opt_enhanced flags after --
    args = p.parse_args(argv[:len(argv) - len(flags) - (1 if "--" in argv else 0)])
    if args.synthetic:
        res = synthetic(args.synthetic, args.layers, args.offload, flags)
        print(json.dumps(res), flush=True)
        if args.json:
            write_json(res, args.json)
        return 0
    if not (args.model and args.configs):
        p.error("give MODEL and --configs, or --synthetic SHAPE")

    common = [args.model, args.dataset, "--quiet"]
    common += ["--data_dir", args.data_dir] if args.data_dir else []
    common += ["--cache_dir", args.cache_dir] if args.cache_dir else []
    header = ["wikitext2", "ptb", "c4", "nominal b", "stored b", "effective b"] + [f"{k} s" for k in STAGES] + ["GiB"]
    print("| config             | " + " | ".join(header) + " |", flush=True)
    print("|---" * (len(header) + 1) + "|", flush=True)
    results = {}
    for name, flags in read_configs(args.configs):
        cfg = oe.parse_args(common + flags)
        oe.validate(cfg)
        results[name] = oe.run(cfg)
        print(row(name, results[name]), flush=True)
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

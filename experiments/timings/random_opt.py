"""Write a random-weight fp16 OPT of a published shape (bench.SHAPES) as a model directory, with a tokenizer
copied from another OPT directory, so that the whole CLI (load, tokenize, compress, evaluate) can be timed
at that shape without the hub:

    python experiments/random_opt.py opt-1.3b /tmp/opt-1.3b-random --tokenizer .local/opt-mini \
        --tokenizer .local/data/opt-tokenizer

Each --tokenizer directory's tokenizer files are copied in turn (a later one's replace an earlier one's):
above, opt-mini's tokenizer settings with the real OPT vocabulary (../shared/data/opt-tokenizer).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # experiments/

import torch  # noqa: E402

import bench  # noqa: E402

TOKENIZER_FILES = ("merges.txt", "vocab.json", "special_tokens_map.json", "tokenizer_config.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(bench.SHAPES))
    p.add_argument("out")
    p.add_argument("--tokenizer", action="append", required=True,
                   help="a directory whose tokenizer files are copied (repeatable; later ones win)")
    args = p.parse_args()
    model, _ = bench.build_synthetic(args.shape, None, torch.device("cpu"), offload=False)
    model.save_pretrained(args.out)
    for source in args.tokenizer:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copy(Path(source) / name, Path(args.out) / name)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} G parameters in {args.out}")


if __name__ == "__main__":
    main()

"""Where a mixed run loses to the uniform one: the uniform model with one group of Linears (a kind, or a range
of layers) taken from the mixed model, scored on the validation texts (benchmarks/mixed_precision.md).

Both models are compressed from the same calibration; each hybrid replaces only the weights of its group, so
the change it shows is that group's share of the difference (approximately: the later layers of each model
were solved on its own compressed inputs). Needs a GPU for speed (CPU works, slowly):

    python experiments/mixed_loss_by_linear.py --seeds 0,1,2,3,4 --uniform "--sparsity 0.5 --wbits 3" \\
        --mixed "--sparsity 0.5 --wbits 3 --target_avg_bits 3.0 --bit_method budget" --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # experiments/

import torch  # noqa: E402
from mixed_precision_sweep import compressed_model, run_config  # noqa: E402
from validation_texts import VALIDATION, validation_texts  # noqa: E402

from modelutils import decoder_layers  # noqa: E402
from pipeline.evaluate import eval_windows, perplexity  # noqa: E402
from systems.atomic_io import write_json  # noqa: E402
from tokenizer_loading import get_tokenizer  # noqa: E402

KINDS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "out_proj": ("out_proj",), "fc1": ("fc1",), "fc2": ("fc2",)}


def groups(names: list[str], layers: int) -> dict[str, list[str]]:
    out = {kind: [n for n in names if n.rsplit(".", 1)[-1] in suffixes] for kind, suffixes in KINDS.items()}
    for start in range(0, layers, 2):
        out[f"layers {start}-{start + 1}"] = [n for n in names if int(n.split(".layers.")[1].split(".")[0]) in
                                              (start, start + 1)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".local/opt-mini")
    p.add_argument("--data_dir", default=".local/data")
    p.add_argument("--cache_dir", default="/tmp/c1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--uniform", required=True, help="opt_enhanced.py flags of the uniform run")
    p.add_argument("--mixed", required=True, help="opt_enhanced.py flags of the mixed run")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = get_tokenizer(args.model)
    args.seqlen = 2048  # what run_config reads besides the paths
    scored = {k: v for k, v in validation_texts(tokenizer, args.data_dir, args.cache_dir, 2048).items()
              if k in VALIDATION}
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        uniform, mixed = (compressed_model(run_config(args.model, "c4", shlex.split(flags), seed, args), dev,
                                           tokenizer)[0] for flags in (args.uniform, args.mixed))
        linears = {n: m for n, m in uniform.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        mixed_linears = dict(mixed.named_modules())
        kept = {n: m.weight.data.clone() for n, m in linears.items()}
        hybrids = {"uniform": [], **groups(list(linears), len(decoder_layers(uniform))), "mixed": list(linears)}
        for hybrid, names in hybrids.items():
            for n in names:
                linears[n].weight.data.copy_(mixed_linears[n].weight.data)
            row = {"seed": seed, "hybrid": hybrid}
            row.update({k: perplexity(uniform, eval_windows(v, 2048), dev, 8) for k, v in scored.items()})
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            for n in names:
                linears[n].weight.data.copy_(kept[n])
        write_json(rows, args.out)
    print("| uniform with mixed ... | " + " | ".join(VALIDATION) + " |")
    print("|---" * (len(VALIDATION) + 1) + "|")
    for hybrid in dict.fromkeys(r["hybrid"] for r in rows):
        mine = [r for r in rows if r["hybrid"] == hybrid]
        print(f"| {hybrid} | " + " | ".join(f"{sum(r[k] for r in mine) / len(mine):.2f}" for k in VALIDATION) + " |")


if __name__ == "__main__":
    main()

"""Generate text from a compressed model: greedy decoding with transformers' generate().

    python generate.py EXPORT_DIR --prompt "The capital of France is" [--max_new_tokens 32] [--device cuda]

EXPORT_DIR is what `opt_enhanced.py ... --export DIR` wrote (the packed format): its Linears run at their stored
bit-widths (serving/: the Triton kernels on a GPU, a dequantizing fallback on the CPU), never as float copies.
Any other model directory or hub id loads as transformers loads it, for comparison. The generated text is printed;
`--json` prints the prompt, the new token ids and the text as one JSON line instead. Exit codes: 0 done, 2 a
usage error (a missing model or tokenizer), 1 a failed run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch


def load_for_generation(model: str, device: torch.device) -> tuple[Any, Any]:
    """(model on `device` in eval mode, its tokenizer)."""
    from modelutils import import_transformers, is_packed_export, load_model
    from pipeline.placement import load_packed
    from tokenizer_loading import get_tokenizer

    import_transformers()
    net = load_packed(model) if is_packed_export(model) else load_model(model, quiet=True)
    return net.to(device).eval(), get_tokenizer(model)


@torch.no_grad()
def greedy(net, tokenizer, prompt: str, max_new_tokens: int, device: torch.device) -> list[int]:
    """The new token ids of greedy decoding (transformers' generate with its KV cache)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                       num_beams=1, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def main(argv: list[str] | None = None) -> int:
    from modelutils import ModelError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an export directory (--export), or any model directory or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line: prompt, token ids, text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens {args.max_new_tokens}: give a positive number")
    try:
        device = torch.device(args.device)
        net, tokenizer = load_for_generation(args.model, device)
        tokens = greedy(net, tokenizer, args.prompt, args.max_new_tokens, device)
    except (ModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: generation failed: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    print(json.dumps({"prompt": args.prompt, "tokens": tokens, "text": text}) if args.json else args.prompt + text)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)

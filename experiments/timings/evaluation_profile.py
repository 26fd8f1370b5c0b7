"""Where the evaluation's time goes at a published OPT shape (default opt-1.3b, random fp16 weights): one
batch of `--batch_size` windows of 2048 tokens through `pipeline.evaluate.perplexity`'s step (the model's forward
and `window_nll`), timed, then profiled by kernel (torch.profiler, CUDA time summed by kernel name). Also
prints the attention implementation the model runs with and the matmul rate the batch reaches. Needs a GPU:

    python3 experiments/evaluation_profile.py [--shape opt-1.3b] [--batch_size 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench  # noqa: E402
from modelutils import import_transformers  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.evaluate import window_nll  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="opt-1.3b", choices=sorted(bench.SHAPES))
    p.add_argument("--batch_size", type=int, default=RunConfig.batch_size)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args()
    dev = torch.device("cuda")
    import_transformers()
    model, _ = bench.build_synthetic(args.shape, None, dev, offload=False)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seqlen), device=dev)
    params = sum(p.numel() for p in model.parameters())

    @torch.no_grad()
    def step() -> torch.Tensor:
        return window_nll(model(ids, use_cache=False).logits, ids)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    tick = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - tick) / repeats
    flop = 2 * params * ids.numel()
    print(f"{args.shape}: attention {model.config._attn_implementation}; batch {args.batch_size} x {args.seqlen}: "
          f"{seconds * 1e3:.1f} ms per batch, {flop / seconds / 1e12:.0f} TFLOP/s on 2 x parameters x tokens "
          f"({params / 1e9:.2f} G parameters)", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()

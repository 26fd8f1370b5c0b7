"""Does the GPU's start (CUDA, cuBLAS/cuSOLVER, the Triton kernel's compilation) overlap with importing
transformers? BENCHMARKS.md §2 "Big models":

    TRITON_CACHE_DIR=/tmp/fresh python3 experiments/startup_overlap.py seq|par

seq: the warm-up solve, then the import; par: the warm-up on a thread while the main thread imports. A fresh
TRITON_CACHE_DIR makes the warm-up compile the kernel, as on a machine's first run.
"""
import os
import sys
import threading
import time

mode = sys.argv[1]
t0 = time.time()
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quant import QuantGrid  # noqa: E402
from sparsegpt_enhanced import PruneSpec, SparseGPT  # noqa: E402

t_torch = time.time() - t0


def warm() -> float:
    t = time.time()
    dev = torch.device("cuda")
    n = 2048
    x = torch.randn(4 * n, n, dtype=torch.float32).to(dev, torch.float16)
    w = torch.randn(n, n, dtype=torch.float32).to(dev)
    solver = SparseGPT(n, dev)
    solver.add_batch(x)
    bits = torch.full((n,), 4, dtype=torch.int64)
    solver.fasterprune(w, PruneSpec(0.5), QuantGrid.for_weight(w, False, -1), bits, 128, 0.01, None, True)
    torch.cuda.synchronize()
    return time.time() - t


def imp() -> float:
    t = time.time()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.opt import modeling_opt  # noqa: F401
    return time.time() - t


t1 = time.time()
if mode == "seq":
    a = warm()
    b = imp()
else:
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("w", warm()))
    thread.start()
    b = imp()
    thread.join()
    a = out["w"]
print(f"{mode}: torch+ours {t_torch:.2f} s, warm-up {a:.2f} s, transformers {b:.2f} s, both {time.time() - t1:.2f} s, "
      f"process {time.time() - t0:.2f} s", flush=True)

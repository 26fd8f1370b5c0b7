"""Does the GPU's start (CUDA, cuBLAS/cuSOLVER, the Triton kernel's compilation) overlap with importing
transformers? BENCHMARKS.md §2 "Big models":

    TRITON_CACHE_DIR=/tmp/fresh python3 experiments/startup_overlap.py seq|par

The CLI's own two steps for a 50% + 4-bit run: `opt_enhanced.warm_up_device` and `modelutils.import_transformers`.
seq: the warm-up, then the import; par: the warm-up on a thread while the main thread imports, as
`opt_enhanced.device_starting` does. A fresh TRITON_CACHE_DIR makes the warm-up compile the kernel, as on a
machine's first run.
"""
import sys
import threading
import time
from pathlib import Path

mode = sys.argv[1]
t0 = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import opt_enhanced as oe  # noqa: E402
from modelutils import import_transformers  # noqa: E402

t_torch = time.time() - t0
cfg = oe.parse_args(["model", "c4", "--sparsity", "0.5", "--wbits", "4"])


def warm() -> float:
    t = time.time()
    oe.warm_up_device(cfg, torch.device("cuda"))
    return time.time() - t


def imp() -> float:
    t = time.time()
    import_transformers()
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

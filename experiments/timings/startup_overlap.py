"""Does the GPU's start (CUDA, cuBLAS/cuSOLVER, the Triton kernel's compilation) overlap with importing
transformers? benchmarks/speed.md, "Big models":

    TRITON_CACHE_DIR=/tmp/fresh python3 experiments/timings/startup_overlap.py seq|par

The CLI's own two steps for a 50% + 4-bit run: `pipeline.placement.warm_up_device` and
`modelutils.import_transformers`. seq: the warm-up, then the import; par: the warm-up on a thread while the main
thread imports, as `pipeline.placement.device_starting` does. A fresh TRITON_CACHE_DIR makes the warm-up compile
the kernel, as on a machine's first run.
"""
import sys
import threading
import time
from pathlib import Path

STARTED = time.time()  # before torch and the project are imported (inside main)


def main(mode: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
    import torch

    import opt_enhanced
    from modelutils import import_transformers
    from pipeline.placement import warm_up_device

    t_torch = time.time() - STARTED
    cfg = opt_enhanced.parse_args(["model", "c4", "--sparsity", "0.5", "--wbits", "4"])

    def warm() -> float:
        t = time.time()
        warm_up_device(cfg, torch.device("cuda"))
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
          f"process {time.time() - STARTED:.2f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

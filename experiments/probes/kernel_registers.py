"""Registers and spills of the serving kernels, compiled here for a GPU this machine lacks (sm_90: H100, H200).

    SERVING_COMPILE_ONLY=1 python experiments/probes/kernel_registers.py [--variants mixed3.0,u4] [--arch 90]

For each variant of serving/benchmark.py at the OPT-6.7B fc1 shape and each decode tile the tuner tries
(mixed_matmul.candidate_configs at batch 1), compiles the launch with Triton's own compiler and ptxas (both ship
with the Triton wheel) and reads the cubin's resource usage with cuobjdump: registers per thread, spilled bytes,
and what they allow, programs (blocks) resident per SM by registers alone. Nothing runs: these are what a
profile would start from, not timings.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from serving import kernel_common  # noqa: E402

REGISTERS_PER_SM = 65536


def compile_offline(kernel, args: list, kwargs: dict, arch: int):
    """Triton's compiled kernel for `arch` from the launch's arguments (tensor arguments may be CPU tensors of the
    right dtype: only their dtype and alignment matter)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread and spilled bytes (stores + loads to local memory) from cuobjdump's report."""
    tool = Path(kernel_common.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", report).group(1))
    local = int(re.search(r"LOCAL:(\d+)", report).group(1))
    return {"regs": regs, "local_bytes": local}


def main() -> None:
    if kernel_common.triton is None:
        raise SystemExit("run with SERVING_COMPILE_ONLY=1 (Triton is imported without a device only then)")
    from serving import mixed_matmul as mm
    from serving.benchmark import linear_shape, random_layer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="mixed3.0,u4")
    ap.add_argument("--linear", default="fc1", choices=("qkvo", "fc1", "fc2"))
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    rows, columns = linear_shape("opt-6.7b", args.linear)
    print(f"opt-6.7b {args.linear} ({rows} x {columns}), sm_{args.arch}, decode (batch 1)")
    print("| variant | BLOCK_N | warps | gather | prefetch | registers | spilled B | programs per SM (registers) | compile s |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for variant in args.variants.split(","):
        layout, bias = random_layer(rows, columns, variant, 1, "cpu")
        shape = mm.LaunchShape.of(layout, True)
        seen = set()
        for config in mm.candidate_configs(layout, 1, torch.device("cpu")):
            tile = (config.block_n, config.num_warps, config.num_stages, config.gather, config.prefetch)
            if tile in seen:  # splits share one compiled kernel
                continue
            seen.add(tile)
            kernel, _, dtypes, kwargs = mm.kernel_call(shape, config, 1)
            values = [torch.empty(64, dtype=a) if isinstance(a, torch.dtype) else a for a in dtypes]
            start = time.time()
            usage = resource_usage(compile_offline(kernel, values, kwargs, args.arch))
            warp_regs = -(-usage["regs"] * 32 // 256) * 256  # allocated per warp in units of 256
            blocks = REGISTERS_PER_SM // (warp_regs * config.num_warps)
            print(f"| {variant} | {config.block_n} | {config.num_warps} | {config.gather} | {config.prefetch} | {usage['regs']} | "
                  f"{usage['local_bytes']} | {blocks} | {time.time() - start:.1f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Serving side of a per-channel mixed-precision compressed Linear (issue #31).

layout.py        the bucketed, packed layout of one Linear and its builder from (codes, bits, keep, grid)
gemv_kernel.py   the Triton decode kernel (one activation row, CUDA-core FMAs, split along K)
gemm_kernel.py   the Triton tensor-core kernel (batched decode and prefill)
mixed_matmul.py  kernel choice, launch, autotuning (cached on disk by autotune_cache.py)
qlinear.py       QuantLinear (codes and scales only; Triton on CUDA, dequantize-per-call on CPU) and the
                 swap of a transformers model's nn.Linear modules
benchmark.py     `python -m serving.benchmark`: per-Linear and whole-decode-step timings against fp16 and gemlite
"""

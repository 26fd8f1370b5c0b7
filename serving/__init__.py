"""The compressed model run at its bit-widths: per-channel mixed-width Linears in a layout a Triton kernel reads.

layout.py        the bucketed, packed layout of one Linear and its builder from (codes, bits, keep, grid)
gemv_kernel.py   the Triton decode kernel (one activation row, CUDA-core FMAs, split along K)
gemm_kernel.py   the Triton tensor-core kernel (batched decode and prefill)
mixed_matmul.py  kernel choice, launch, autotuning (cached on disk by autotune_cache.py)
qlinear.py       QuantLinear (codes and scales only; Triton on CUDA, dequantize-per-call on CPU) and the
                 swap of a transformers model's nn.Linear modules
benchmark.py     `python -m serving.benchmark`: per-Linear and whole-decode-step timings against fp16 and gemlite,
                 over anchors.py (gemlite, torch's int4 matmul) and decode_step.py (a graph-captured decode step)
"""

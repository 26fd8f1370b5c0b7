"""y = x W^T + b for a Linear in the serving layout: picks the kernel and its launch configuration, and
autotunes the configuration per (GPU, shape, width mix, groups, batch bucket) with the result kept on disk
(autotune_cache.py).

Kernels: one row of activations goes to the decode kernel (gemv_kernel.py, CUDA-core FMAs), more to the
tensor-core kernel (gemm_kernel.py). Both read every bucket in one launch; `split` programs share K when
there are too few output tiles to occupy the GPU (decode), their partial sums reduced inside the same
launch through a per-device fp32 workspace (kernel_common.store_output). The workspace is shared by all
layers of a device, so launches on one device must not run concurrently on two streams.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import kernel_common
from .autotune_cache import TuneCache, make_key
from .layout import ServingLayout, permute_activations

if kernel_common.triton is not None:
    from .gemm_kernel import mixed_gemm_kernel
    from .gemv_kernel import mixed_gemv_kernel


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. kind: "gemv" (one activation row) or "gemm"; split: programs along K;
    gather: the kernel reads x through the permutation itself (else x[..., perm] is formed first)."""

    kind: str
    block_n: int
    block_m: int = 1
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2
    gather: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_available() -> bool:
    return kernel_common.is_available()


def batch_bucket(m: int) -> int:
    """Rows of x are tuned in power-of-two buckets (1, 2, 4, ..., 8192)."""
    return 1 << max(0, min(13, (m - 1).bit_length()))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def _splits(layout: ServingLayout, tiles: int, sms: int) -> list[int]:
    """Splits along K worth trying: up to ~8 programs per SM, never more than the panels of work."""
    total = layout.total_cost
    return [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= max(1, total) and tiles * s <= 8 * sms] or [1]


def candidate_configs(layout: ServingLayout, m: int, device: torch.device) -> list[KernelConfig]:
    """The configurations autotuning times for m rows of activations."""
    sms = _sm_count(device)
    n = layout.rows
    out: list[KernelConfig] = []
    if m == 1:
        for block_n, warps, stages in ((64, 4, 2), (128, 4, 2), (128, 4, 3), (256, 8, 2), (256, 4, 2)):
            tiles = -(-n // block_n)
            out += [KernelConfig("gemv", block_n, 1, s, warps, stages, True) for s in _splits(layout, tiles, sms)]
    elif m <= 64:
        block_m = max(16, batch_bucket(m))
        for block_n, warps, stages in ((64, 4, 2), (128, 4, 2), (128, 8, 3)):
            tiles = -(-n // block_n) * -(-m // block_m)
            out += [KernelConfig("gemm", block_n, block_m, s, warps, stages, True) for s in _splits(layout, tiles, sms)]
    else:
        for block_n, block_m, warps, stages in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 256, 4, 3),
                                                (128, 128, 4, 4), (256, 128, 8, 3)):
            out.append(KernelConfig("gemm", block_n, block_m, 1, warps, stages, False))
    return out


def default_config(layout: ServingLayout, m: int, device: torch.device) -> KernelConfig:
    """A reasonable configuration without timing: enough programs for ~4 per SM."""
    sms = _sm_count(device)
    if m == 1:
        block_n = 128
        tiles = -(-layout.rows // block_n)
        split = max(1, min(layout.total_cost, 4 * sms // tiles))
        return KernelConfig("gemv", block_n, 1, 1 << (split.bit_length() - 1), 4, 2, True)
    if m <= 64:
        block_m = max(16, batch_bucket(m))
        tiles = -(-layout.rows // 64) * -(-m // block_m)
        split = max(1, min(layout.total_cost, 4 * sms // tiles))
        return KernelConfig("gemm", 64, block_m, 1 << (split.bit_length() - 1), 4, 2, True)
    return KernelConfig("gemm", 128, 128, 1, 8, 3, False)


# ---------------------------------------------------------------- the split-K workspace


_WORKSPACES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown ones stay alive: captured graphs may use them


def workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 sums, int32 arrival counters) of at least this size for `device`, all zero between launches."""
    key = str(device)
    have = _WORKSPACES.get(key)
    if have is None or have[0].numel() < floats or have[1].numel() < tiles:
        if have is not None:
            _RETIRED.append(have)
        floats = max(floats, have[0].numel() if have else 0, 1 << 16)
        tiles = max(tiles, have[1].numel() if have else 0, 1 << 12)
        have = (torch.zeros(floats, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
        _WORKSPACES[key] = have
    return have


# ---------------------------------------------------------------- launching


def launch(x2d: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None, config: KernelConfig,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, rows) = x2d (M, columns) . W^T (+ bias) with one kernel launch (plus x[..., perm] when the
    configuration does not gather in-kernel)."""
    m = x2d.shape[0]
    n = layout.rows
    device = x2d.device
    if out is None:
        out = torch.empty(m, n, dtype=x2d.dtype, device=device)
    x_in = x2d if config.gather else permute_activations(x2d, layout.perm)
    tiles_n = -(-n // config.block_n)
    tiles_m = -(-m // config.block_m)
    ws, cnt = workspace(device, m * n if config.split > 1 else 1, tiles_n * tiles_m)
    dummy = layout.meta  # stands in for absent tensors (never read: the constexprs switch their loads off)
    args = (x_in, layout.perm, out, bias if bias is not None else dummy, ws, cnt, layout.codes, layout.spans,
            layout.factors, layout.zeros if layout.zeros is not None else dummy,
            layout.group_of_slot if layout.group_of_slot is not None else dummy,
            layout.group_of_position if layout.group_of_position is not None else dummy, layout.meta)
    zcols = layout.zeros.shape[1] if layout.zeros is not None else 1
    common = dict(WIDTH_MASK=layout.width_mask, GROUP_MODE=layout.group_mode, SYM=layout.sym,
                  GATHER_X=config.gather, HAS_BIAS=bias is not None, ALIGNED=layout.rows % 16 == 0,
                  BLOCK_N=config.block_n,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kind == "gemv":
        if m != 1:
            raise ValueError("the gemv kernel takes one row of activations")
        mixed_gemv_kernel[(tiles_n, config.split)](*args, n, layout.groups, zcols, **common)
    else:
        mixed_gemm_kernel[(tiles_n, tiles_m, config.split)](*args, m, n, x_in.stride(0), out.stride(0),
                                                           layout.groups, zcols, BLOCK_M=config.block_m, **common)
    return out


# ---------------------------------------------------------------- autotuning


_CACHE = TuneCache()
_CHOSEN: dict[str, KernelConfig] = {}


def tune_key(layout: ServingLayout, m: int, device: torch.device, has_bias: bool) -> str:
    import triton  # only reached where the kernels run

    return make_key(gpu=_gpu_name(device), triton=triton.__version__, batch=batch_bucket(m), bias=has_bias,
                    **{k: (sorted(v.items()) if isinstance(v, dict) else v) for k, v in layout.signature().items()})


def time_config(fn: Callable[[], object], reps_ms: int = 25) -> float:
    """Median milliseconds of fn (L2 flushed before each run, as Triton's do_bench does)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=reps_ms, return_mode="median"))


def autotune(x2d: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None,
             log: Callable[[str], None] | None = None) -> KernelConfig:
    """Time every candidate configuration on these inputs and return (and store on disk) the fastest."""
    m = x2d.shape[0]
    best: tuple[float, KernelConfig] | None = None
    out = torch.empty(m, layout.rows, dtype=x2d.dtype, device=x2d.device)
    for config in candidate_configs(layout, m, x2d.device):
        try:
            launch(x2d, layout, bias, config, out)
            ms = time_config(lambda: launch(x2d, layout, bias, config, out))
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or fit is skipped
            if log:
                log(f"  config {config} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, config)
    if best is None:
        raise RuntimeError("no kernel configuration ran")
    key = tune_key(layout, m, x2d.device, bias is not None)
    _CACHE.put(key, best[1].as_dict())
    _CHOSEN[key] = best[1]
    if log:
        log(f"  tuned {best[1]}: {best[0] * 1e3:.1f} us")
    return best[1]


def choose_config(x2d: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None) -> KernelConfig:
    """The cached tuned configuration; else tune now (unless SERVING_AUTOTUNE=0, under the interpreter or
    during CUDA-graph capture, where the default is used)."""
    m = x2d.shape[0]
    device = x2d.device
    if device.type != "cuda":
        return default_config(layout, m, device)
    key = tune_key(layout, m, device, bias is not None)
    config = _CHOSEN.get(key)
    if config is not None:
        return config
    stored = _CACHE.get(key)
    if stored is not None:
        config = KernelConfig(**stored)
    elif os.environ.get("SERVING_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        config = default_config(layout, m, device)
    else:
        config = autotune(x2d, layout, bias)
    _CHOSEN[key] = config
    return config


def mixed_matmul(x: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None = None,
                 config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., columns) -> (..., rows) through the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if not is_available():
        raise RuntimeError(f"Triton kernels unavailable: {kernel_common._IMPORT_ERROR}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if config is None:
        config = choose_config(x2d, layout, bias)
    if config.kind == "gemv" and x2d.shape[0] != 1:
        config = default_config(layout, x2d.shape[0], x2d.device)
    return launch(x2d, layout, bias, config).view(*lead, layout.rows)

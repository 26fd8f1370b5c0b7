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
    gather: the kernel reads x through the permutation itself (else x[..., perm] is formed first); prefetch
    (gemv): each program loads the next panel's words before it uses this panel's."""

    kind: str
    block_n: int
    block_m: int = 1
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2
    gather: bool = True
    prefetch: bool = False

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
    """Splits along K worth trying: powers of two from one fewer than the smallest that gives a program per SM
    up to one plane-panel per program (at most eight values). Decode streams weights and nothing else, so more
    programs mean more loads in flight; their partial sums cost one atomic add per output each."""
    total = max(1, layout.total_cost)
    fits = [1 << i for i in range(16) if 1 << i <= total]
    first = next((i for i, s in enumerate(fits) if tiles * s >= sms), len(fits) - 1)
    return fits[max(0, first - 1):][:8]


# (block_n, num_warps, num_stages, gather, prefetch) of the decode kernel; (block_n, num_warps, num_stages) of the
# tensor-core kernel for up to 64 rows; (block_n, block_m, num_warps, num_stages) for more rows. Each is a
# compilation per width mix and group mode (5-17 s of CPU for five widths), so the lists are short. On the H100
# the decode tuning chose the narrowest tile (64) for most mixed and 3-bit layers, and the largest split it was
# offered: fewer registers per thread, more programs resident (serving/NOTES.md, "Measured"), hence 32 too.
GEMV_TILES = ((32, 4, 2, True, False), (64, 4, 2, True, False), (128, 4, 2, True, False), (256, 4, 2, True, False),
              (128, 4, 2, False, False),  # x permuted first: chosen for none of 12 layers on the H100, kept at one tile
              (32, 4, 2, True, True), (64, 4, 2, True, True), (128, 4, 2, True, True))
GEMM_SMALL_TILES = ((64, 4, 2), (128, 4, 3))
GEMM_LARGE_TILES = ((128, 128, 8, 3), (128, 256, 8, 3), (64, 256, 4, 3))


def candidate_configs(layout: ServingLayout, m: int, device: torch.device) -> list[KernelConfig]:
    """The configurations autotuning times for m rows of activations: decode both gathering x in-kernel and
    reading it permuted (which costs a separate gather), prefill reading it permuted."""
    sms = _sm_count(device)
    n = layout.rows
    out: list[KernelConfig] = []
    if m == 1:
        for block_n, warps, stages, gather, prefetch in GEMV_TILES:
            tiles = -(-n // block_n)
            out += [KernelConfig("gemv", block_n, 1, s, warps, stages, gather, prefetch)
                    for s in _splits(layout, tiles, sms)]
    elif m <= 64:
        block_m = max(16, batch_bucket(m))
        for block_n, warps, stages in GEMM_SMALL_TILES:
            tiles = -(-n // block_n) * -(-m // block_m)
            out += [KernelConfig("gemm", block_n, block_m, s, warps, stages, True) for s in _splits(layout, tiles, sms)]
    else:
        for block_n, block_m, warps, stages in GEMM_LARGE_TILES:
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


@dataclass(frozen=True)
class LaunchShape:
    """What a launch's compilation depends on besides the configuration: the layout's constexprs, the
    integers Triton specialises on (== 1, multiple of 16) and the tensors' dtypes. Precompiling
    (`warmup`) from this alone, in other processes, gives the very kernels `launch` later loads."""

    rows: int
    columns: int
    positions: int
    groups: int
    zero_columns: int
    width_mask: int
    group_mode: int
    sym: bool
    has_bias: bool
    spans_dtype: torch.dtype
    index_dtype: torch.dtype
    x_dtype: torch.dtype = torch.float16

    @classmethod
    def of(cls, layout: ServingLayout, has_bias: bool, x_dtype: torch.dtype = torch.float16) -> "LaunchShape":
        return cls(layout.rows, layout.columns, layout.positions, layout.groups,
                   layout.zeros.shape[1] if layout.zeros is not None else 1, layout.width_mask, layout.group_mode,
                   layout.sym, has_bias, layout.spans.dtype, layout.perm.dtype, x_dtype)


def kernel_call(shape: LaunchShape, config: KernelConfig, m: int, tensors: dict[str, torch.Tensor] | None = None):
    """(kernel, grid, positional args, keyword args) of one launch. With `tensors` None every tensor argument is
    replaced by its dtype (Triton's warmup compiles from dtypes), else they are taken from `tensors`."""
    n = shape.rows
    tiles_n = -(-n // config.block_n)
    tiles_m = -(-m // config.block_m)

    def arg(name: str, dtype: torch.dtype):
        return dtype if tensors is None else tensors[name]

    dummy = torch.int32  # absent tensors are passed as the metadata table: never read (constexprs switch them off)
    args = [arg("x", shape.x_dtype), arg("perm", shape.index_dtype), arg("out", shape.x_dtype),
            arg("bias", shape.x_dtype if shape.has_bias else dummy), arg("ws", torch.float32),
            arg("cnt", torch.int32), arg("codes", torch.int32), arg("spans", shape.spans_dtype),
            arg("factors", torch.float32), arg("zeros", dummy if shape.sym else torch.uint8),
            arg("group_of_slot", shape.index_dtype if shape.group_mode == 1 else dummy),
            arg("group_of_position", shape.index_dtype if shape.group_mode >= 1 else dummy), arg("meta", torch.int32)]
    kwargs = dict(WIDTH_MASK=shape.width_mask, GROUP_MODE=shape.group_mode, SYM=shape.sym, GATHER_X=config.gather,
                  HAS_BIAS=shape.has_bias, ALIGNED=n % 16 == 0, BLOCK_N=config.block_n,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kind == "gemv":
        if m != 1:
            raise ValueError("the gemv kernel takes one row of activations")
        return (mixed_gemv_kernel, (tiles_n, config.split), args + [n, shape.groups, shape.zero_columns],
                dict(kwargs, PREFETCH=config.prefetch))
    stride_x = shape.columns if config.gather else shape.positions
    return (mixed_gemm_kernel, (tiles_n, tiles_m, config.split),
            args + [m, n, stride_x, n, shape.groups, shape.zero_columns], dict(kwargs, BLOCK_M=config.block_m))


def precompile(shape: LaunchShape, config: KernelConfig, m: int):
    """Compile (into Triton's on-disk cache) the kernel `launch` would run, without running it; Triton's
    compiled kernel."""
    kernel, grid, args, kwargs = kernel_call(shape, config, m)
    return kernel.warmup(*args, grid=grid, **kwargs)


def launch(x2d: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None, config: KernelConfig,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, rows) = x2d (M, columns) . W^T (+ bias) with one kernel launch (plus x[..., perm] when the
    configuration does not gather in-kernel)."""
    m = x2d.shape[0]
    device = x2d.device
    if out is None:
        out = torch.empty(m, layout.rows, dtype=x2d.dtype, device=device)
    x_in = x2d if config.gather else permute_activations(x2d, layout.perm)
    tiles = -(-layout.rows // config.block_n) * -(-m // config.block_m)
    ws, cnt = workspace(device, m * layout.rows if config.split > 1 else 1, tiles)
    tensors = dict(layout.tensors(), x=x_in, out=out, bias=bias, ws=ws, cnt=cnt)
    tensors = {k: (v if v is not None else layout.meta) for k, v in tensors.items()}
    kernel, grid, args, kwargs = kernel_call(LaunchShape.of(layout, bias is not None, x2d.dtype), config, m, tensors)
    kernel[grid](*args, **kwargs)
    return out


# ---------------------------------------------------------------- autotuning


_CACHE = TuneCache()
_CHOSEN: dict[str, KernelConfig] = {}


def tune_key(layout: ServingLayout, m: int, device: torch.device, has_bias: bool) -> str:
    """GPU, Triton version, batch bucket, bias, and the layout's signature: shape, group size and mode,
    symmetry, and the share of the columns each width holds in 32ths (layers of one model with similar
    mixes share a tuned configuration instead of each being tuned)."""
    import triton  # only reached where the kernels run

    sig = layout.signature()
    mix = sorted((b, round(32 * k / layout.columns)) for b, k in sig.pop("columns").items())
    return make_key(gpu=_gpu_name(device), triton=triton.__version__, batch=batch_bucket(m), bias=has_bias, mix=mix,
                    columns=layout.columns, **sig)


_FLUSH: dict[str, torch.Tensor] = {}
GRAPH_CAPTURES = {"graphed": 0, "eager": 0}  # how time_us ran its calls (a call that cannot be captured runs eager)


def _captured(fn: Callable[[], object]) -> Callable[[], object] | None:
    """fn captured as a CUDA graph (its replay), or None where it cannot be captured. Timed as graphs, a call
    costs its kernels alone, as in a served model's captured step; timed eagerly, a short kernel also waits for
    the Python that launches it (tens of microseconds: more than a decode-sized Linear takes)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # on a side stream first, as capture wants
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception:  # noqa: BLE001 - counted; the call is then timed eagerly
        torch.cuda.synchronize()
        return None


def time_us(fn: Callable[[], object], reps: int = 20, flush: bool = True, graph: bool = True) -> float:
    """Median microseconds of fn over `reps` runs timed with CUDA events, the L2 cache overwritten before each
    run (64 MiB written: more than an H100's or H200's 50-60 MB of L2), as a layer of a model finds it: its
    weights were evicted by the other layers' since its last call. With `graph`, fn is captured as a CUDA graph
    and replayed (GRAPH_CAPTURES counts how each call was timed)."""
    if not torch.cuda.is_available():  # the interpreter: wall clock, for the plumbing only
        import time

        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6
    device = torch.cuda.current_device()
    buffer = _FLUSH.get(str(device))
    if flush and buffer is None:
        buffer = _FLUSH[str(device)] = torch.empty(16 * 2 ** 20, dtype=torch.float32, device="cuda")
    fn()  # compiles, tunes and allocates what later calls reuse
    run = _captured(fn) if graph else None
    GRAPH_CAPTURES["graphed" if run is not None else "eager"] += 1
    run = run or fn
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush:
            buffer.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends))
    return times[len(times) // 2]


@dataclass
class TuneResult:
    best: KernelConfig
    us: float
    timings: list[tuple[KernelConfig, float]]  # every candidate that ran

    def best_where(self, **fields) -> tuple[KernelConfig, float] | None:
        ok = [(c, t) for c, t in self.timings if all(getattr(c, k) == v for k, v in fields.items())]
        return min(ok, key=lambda ct: ct[1]) if ok else None


def autotune(x2d: torch.Tensor, layout: ServingLayout, bias: torch.Tensor | None,
             log: Callable[[str], None] | None = None, reps: int = 15) -> TuneResult:
    """Time every candidate configuration on these inputs; store the fastest on disk and return all timings."""
    m = x2d.shape[0]
    out = torch.empty(m, layout.rows, dtype=x2d.dtype, device=x2d.device)
    timings: list[tuple[KernelConfig, float]] = []
    for config in candidate_configs(layout, m, x2d.device):
        try:
            us = time_us(lambda: launch(x2d, layout, bias, config, out), reps)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or fit is skipped
            if log:
                log(f"  config {config} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        timings.append((config, us))
    if not timings:
        raise RuntimeError("no kernel configuration ran")
    best, us = min(timings, key=lambda ct: ct[1])
    key = tune_key(layout, m, x2d.device, bias is not None)
    _CACHE.put(key, best.as_dict())
    _CHOSEN[key] = best
    if log:
        log(f"  tuned {best}: {us:.1f} us ({len(timings)} configurations)")
    return TuneResult(best, us, timings)


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
        config = autotune(x2d, layout, bias).best
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

"""Triton pieces shared by the serving kernels: turning packed words into codes, reading activations and
bucket metadata, and writing the output (with the split-K reduction).

Triton is imported only where a CUDA device is present or TRITON_INTERPRET=1 asks for its CPU
interpreter (which must be chosen before Triton is first imported), so this module imports everywhere;
`is_available()` says whether the kernels can run. SERVING_COMPILE_ONLY=1 imports it without either, for
compiling the kernels for a GPU this machine lacks (experiments/probes/kernel_registers.py).

Reading codes (layout.py has the packing): code c of a unit is, for c < W*S, bits [b*(c%S), b*(c%S)+b) of
word c//S; the C - W*S spare codes of 3 and 6 bits are read from a 6-bit stream that collects each word's top
two bits as the word goes by (`spare_bits`), spare j at bits [j*b, (j+1)*b).

Codes become floats without an int-to-float conversion instruction (a quarter of an add's rate): OR-ing an
integer below 2**23 into the bits of 2.0**23 gives the float 2**23 + q exactly, and one subtraction q (or
q - z). The decode kernel goes further (gemv_kernel.py): (w & (mask << P)) | magic is 2**23 + q * 2**P
without a shift, the activation being pre-scaled by 2**-P, so a weight costs 3 instructions (AND/OR,
subtract, fused multiply-add) instead of 5.
"""
from __future__ import annotations

import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_COMPILE_ONLY = os.environ.get("SERVING_COMPILE_ONLY", "0") == "1"

triton = None
tl = None
_IMPORT_ERROR: Exception | None = None
try:
    if not (_INTERPRET or _COMPILE_ONLY or torch.cuda.is_available()):
        raise ImportError("no CUDA device")
    import triton  # noqa: F811
    import triton.language as tl  # noqa: F811
except Exception as exc:  # noqa: BLE001 - any failure means "no kernel path"
    triton = None
    tl = None
    _IMPORT_ERROR = exc


def is_available() -> bool:
    """True when Triton imports and there is a device to run it on (a GPU, or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


def interpreting() -> bool:
    return _INTERPRET


if triton is not None:

    @triton.jit
    def spare_bits(stream, w, WORD: tl.constexpr):
        """The spare-bit stream with word WORD's two top bits added (as its bits 2*WORD, 2*WORD + 1)."""
        return stream | (((w >> 30) & 3) << (2 * WORD))

    @triton.jit
    def raw_of_int(q):
        """The float 2**23 + q of an int32 q in [0, 2**23)."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def bucket_meta(meta_ptr, SLOT: tl.constexpr, ALIGNED: tl.constexpr):
        """(units, panels, word offset, x offset, zero offset, cost offset, slot offset) of one width.
        Word offsets are sums of W * units * rows, so multiples of 16 when the rows are (ALIGNED); x offsets
        are sums of whole panels, always multiples of 16 * C."""
        base = meta_ptr + SLOT * 8
        word_offset = tl.load(base + 2)
        if ALIGNED:
            word_offset = tl.multiple_of(word_offset, 16)
        return (tl.load(base + 0), tl.load(base + 1), word_offset, tl.multiple_of(tl.load(base + 3), 16),
                tl.load(base + 4), tl.load(base + 5), tl.load(base + 6))

    @triton.jit
    def panel_range(lo, hi, cost_offset, panels, W: tl.constexpr):
        """The panels [p0, p1) of a bucket whose first word's cost lies in this program's share [lo, hi)."""
        p0 = tl.minimum(tl.maximum(lo - cost_offset + (W - 1), 0) // W, panels)
        p1 = tl.minimum(tl.maximum(hi - cost_offset + (W - 1), 0) // W, panels)
        return p0, p1

    @triton.jit
    def load_zero(zeros_ptr, offset, SYM: tl.constexpr, BITS: tl.constexpr, mask):
        """Zero points as fp32: 2**(b-1) for symmetric grids, else the stored uint8 at `offset`."""
        if SYM:
            z = tl.full(offset.shape, 1 << (BITS - 1), tl.float32)
        else:
            z = tl.load(zeros_ptr + offset, mask=mask, other=0).to(tl.float32)
        return z

    @triton.jit
    def store_output(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr, tile_id, nsplit,
                     HAS_BIAS: tl.constexpr):
        """Write acc (BLOCK_M, BLOCK_N) fp32 (+ bias) to out in out's dtype. With several programs along K
        (nsplit > 1) each adds its share into an fp32 workspace; the last to arrive at the tile (counted in
        cnt) reads the sum, sets the workspace back to 0, writes the output and resets the counter,
        so the workspace is ready for the next launch (also inside a CUDA graph) and all in one kernel."""
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if nsplit == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()  # every thread's share is in before the count says so
            arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
            if arrived == nsplit - 1:
                # every share is in; an atomic read (adding 0) sees them at L2, whatever this SM's L1 holds
                total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask, sem="relaxed")
                total = tl.where(mask, total, 0.0)  # a masked-off atomic returns nothing defined
                tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(cnt_ptr + tile_id, 0)

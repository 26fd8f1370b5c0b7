"""Decode kernel for one row of activations (batch-1 decode): y = x W^T over every bucket in one launch,
with fused multiply-adds on the CUDA cores (a matrix instruction would waste 15 of its 16 rows).

Memory-bound: the weights are read once, 2-8 bits each, and nothing else of size. Each program owns
BLOCK_N output rows and a contiguous share of the K work (the "cost": one unit per plane-panel, so a
3-bit panel, three words per unit, counts three), so that with few output tiles the grid is widened along
K until the whole GPU streams weights; the shares are summed in store_output. Per bucket the program walks
its panels; for each plane it loads the (16 units, BLOCK_N rows) words (16 runs of BLOCK_N contiguous
words), then for each code slot of the word the 16 activations of that slot (gathered from x through the
permutation in-kernel, or read from x already permuted) and accumulates x * q into a (16, BLOCK_N) fp32
tile, reduced once per bucket. The slots are unrolled: every shift and mask is a constant.

Per-row grids: y_n += s_b[n] * (sum_k x_k q_nk - z_b[n] * sum_k x_k) over the
bucket's columns, so the codes are multiplied as integers and scale/zero are applied once per bucket and
row. Codes come out of the word pre-shifted (kernel_common.main_code_raw) and the activations are scaled by
the inverse power of two instead, which is exact: 3 instructions per weight.
Groups: per slot (each slot run in one group: scale and zero per row and slot) or per position.
"""
from __future__ import annotations

from .kernel_common import triton, tl

if triton is not None:
    from .kernel_common import bucket_meta, load_zero, panel_range, store_output

    @triton.jit
    def _panel_planes(ptr, mask, plane, W: tl.constexpr):
        """One panel's (16 units, BLOCK_N rows) words of each of its W planes; past W, plane 0 again (unused, and
        optimised away)."""
        w0 = tl.load(ptr, mask=mask, other=0)
        w1 = w0
        w2 = w0
        if W > 1:
            w1 = tl.load(ptr + plane, mask=mask, other=0)
        if W > 2:
            w2 = tl.load(ptr + 2 * plane, mask=mask, other=0)
        return w0, w1, w2

    @triton.jit
    def _gemv_bucket(x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr, meta_ptr,
                     rows, rmask, N, GROUPS, ZCOLS, lo, hi, magic,
                     SLOT: tl.constexpr, BITS: tl.constexpr, C: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                     GROUP_MODE: tl.constexpr, SYM: tl.constexpr, GATHER_X: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
        """This program's share of one bucket, (BLOCK_N,) fp32. The slot body is written out here rather than
        in helpers: it is unrolled C times per panel, and Triton's interpreter (the CPU tests) pays for
        every helper call. PREFETCH: the next panel's words are loaded before this panel's are used (two panels
        in flight per program, at the price of their registers)."""
        units, panels, word_offset, x_offset, zero_offset, cost_offset, slot_offset = bucket_meta(
            meta_ptr, SLOT, ALIGNED)
        factor = tl.load(factors_ptr + SLOT)
        p0, p1 = panel_range(lo, hi, cost_offset, panels, W)
        u = tl.arange(0, 16)
        plane = N * units
        MASK = (1 << BITS) - 1
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        xsum = tl.zeros([16], tl.float32)
        if PREFETCH:  # the first panel's planes
            first = p0 * 16 + u
            fmask = ((first < units) & (p0 < p1))[:, None] & rmask[None, :]
            next0, next1, next2 = _panel_planes(codes_ptr + word_offset + first[:, None] * N + rows[None, :], fmask,
                                                plane, W)
        for p in range(p0, p1):
            unit = p * 16 + u
            umask = unit < units
            wmask = umask[:, None] & rmask[None, :]
            wptr = codes_ptr + word_offset + unit[:, None] * N + rows[None, :]
            pos = x_offset + p * (16 * C) + u  # positions of slot 0; slot c is 16 * c further
            stream = tl.zeros([16, BLOCK_N], tl.int32)
            if PREFETCH:  # this panel's planes, and the next panel's on their way
                held0 = next0
                held1 = next1
                held2 = next2
                lmask = ((unit + 16 < units) & (p + 1 < p1))[:, None] & rmask[None, :]
                next0, next1, next2 = _panel_planes(wptr + 16 * N, lmask, plane, W)
            for c in tl.static_range(C):
                if c < W * S:
                    if c % S == 0:  # the next plane's words
                        if PREFETCH:
                            if c // S == 0:
                                w = held0
                            elif c // S == 1:
                                w = held1
                            else:
                                w = held2
                        else:
                            w = tl.load(wptr + (c // S) * plane, mask=wmask, other=0)
                        if C > W * S:  # 3 and 6 bits: collect the top bits that hold the spare codes
                            stream = stream | (((w >> 30) & 3) << (2 * (c // S)))
                    # code c % S: (w & mask) | magic, one instruction, is the float 2**23 + q * 2**P (P the code's
                    # offset, less 16 if it would not fit the mantissa)
                    if BITS * (c % S) + BITS > 23:
                        raw = (((w >> 16) & (MASK << (BITS * (c % S) - 16))) | magic).to(tl.float32,
                                                                                             bitcast=True)
                        step = 1.0 * (1 << (BITS * (c % S) - 16))
                    else:
                        raw = ((w & (MASK << (BITS * (c % S)))) | magic).to(tl.float32, bitcast=True)
                        step = 1.0 * (1 << (BITS * (c % S)))
                else:  # spare code j = c - W*S: bits [j*b, j*b + b) of the collected top bits
                    raw = (((stream >> ((c - W * S) * BITS)) & MASK) | magic).to(tl.float32, bitcast=True)
                    step = 1.0
                if GATHER_X:
                    col = tl.load(perm_ptr + pos + 16 * c, mask=umask, other=-1).to(tl.int32)
                    xv = tl.load(x_ptr + col, mask=col >= 0, other=0.0).to(tl.float32)
                else:
                    xv = tl.load(x_ptr + pos + 16 * c, mask=umask, other=0.0).to(tl.float32)
                xs = xv * (1.0 / step)  # exact: x * (raw - 2**23) is then x * q
                if GROUP_MODE == 0:  # integer codes now, the row's scale and zero once per bucket
                    acc += xs[:, None] * (raw - 8388608.0)
                    xsum += xv
                elif GROUP_MODE == 1:  # the slot run lies in one group: one scale and zero per row
                    g = tl.load(gslot_ptr + slot_offset + p * C + c).to(tl.int32)
                    scale = tl.load(spans_ptr + rows * GROUPS + g, mask=rmask, other=0.0).to(tl.float32) * factor
                    zero = load_zero(zeros_ptr, rows * ZCOLS + zero_offset + g, SYM, BITS, rmask)
                    acc += xs[:, None] * ((raw - (8388608.0 + zero * step)[None, :]) * scale[None, :])
                else:  # a group per position
                    g = tl.load(gpos_ptr + pos + 16 * c, mask=umask, other=0).to(tl.int32)
                    scale = tl.load(spans_ptr + rows[None, :] * GROUPS + g[:, None], mask=wmask,
                                    other=0.0).to(tl.float32) * factor
                    zero = load_zero(zeros_ptr, rows[None, :] * ZCOLS + zero_offset + g[:, None], SYM, BITS, wmask)
                    acc += xs[:, None] * ((raw - (8388608.0 + zero * step)) * scale)
        dot = tl.sum(acc, axis=0)
        if GROUP_MODE == 0:
            scale = tl.load(spans_ptr + rows, mask=rmask, other=0.0) * factor
            zero = load_zero(zeros_ptr, rows * ZCOLS + zero_offset, SYM, BITS, rmask)
            dot = scale * (dot - zero * tl.sum(xsum, axis=0))
        return dot

    @triton.jit
    def mixed_gemv_kernel(x_ptr, perm_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
                          codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr, meta_ptr,
                          N, GROUPS, ZCOLS,
                          WIDTH_MASK: tl.constexpr, GROUP_MODE: tl.constexpr, SYM: tl.constexpr,
                          GATHER_X: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr = False):
        """out[0, n] = sum_k x[0, k] W[n, k] (+ bias[n]). Grid: (cdiv(N, BLOCK_N), splits along K)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        nsplit = tl.num_programs(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        total = tl.load(meta_ptr + 5 * 8)
        magic = tl.load(meta_ptr + 5 * 8 + 1)  # 0x4B000000, the bits of 2.0**23 (see layout.MAGIC_BITS)
        lo = pid_s * total // nsplit
        hi = (pid_s + 1) * total // nsplit
        acc = tl.zeros([BLOCK_N], tl.float32)
        if WIDTH_MASK & 1:
            acc += _gemv_bucket(x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                                meta_ptr, rows, rmask, N, GROUPS, ZCOLS, lo, hi, magic, 0, 2, 16, 1, 16,
                                GROUP_MODE, SYM, GATHER_X, ALIGNED, BLOCK_N, PREFETCH)
        if WIDTH_MASK & 2:
            acc += _gemv_bucket(x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                                meta_ptr, rows, rmask, N, GROUPS, ZCOLS, lo, hi, magic, 1, 3, 32, 3, 10,
                                GROUP_MODE, SYM, GATHER_X, ALIGNED, BLOCK_N, PREFETCH)
        if WIDTH_MASK & 4:
            acc += _gemv_bucket(x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                                meta_ptr, rows, rmask, N, GROUPS, ZCOLS, lo, hi, magic, 2, 4, 8, 1, 8,
                                GROUP_MODE, SYM, GATHER_X, ALIGNED, BLOCK_N, PREFETCH)
        if WIDTH_MASK & 8:
            acc += _gemv_bucket(x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                                meta_ptr, rows, rmask, N, GROUPS, ZCOLS, lo, hi, magic, 3, 6, 16, 3, 5,
                                GROUP_MODE, SYM, GATHER_X, ALIGNED, BLOCK_N, PREFETCH)
        if WIDTH_MASK & 16:
            acc += _gemv_bucket(x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                                meta_ptr, rows, rmask, N, GROUPS, ZCOLS, lo, hi, magic, 4, 8, 4, 1, 4,
                                GROUP_MODE, SYM, GATHER_X, ALIGNED, BLOCK_N, PREFETCH)
        store_output(acc[None, :], tl.arange(0, 1), rows, 1, N, out_ptr, 0, bias_ptr, ws_ptr, cnt_ptr, pid_n,
                     nsplit, HAS_BIAS)

"""Tensor-core kernel for two or more rows of activations (batched decode and prefill): every bucket in one
launch, each (16 x BLOCK_N) slot tile of codes dequantized to fp16 in registers and multiplied with tl.dot,
accumulating in fp32 in one accumulator for all buckets.

A slot of a panel is 16 consecutive positions of the permuted activations, which is one K-step of the
matrix instruction: the activation tile (BLOCK_M tokens x 16 positions, 32 contiguous bytes per token) is
the left operand, the dequantized slot tile (16 x BLOCK_N output rows, rows contiguous as the planes store
them) the right one, so nothing is transposed or re-ordered in registers. One runtime loop over (panel,
slot) pairs -- rather than the slots unrolled -- keeps the code, and Triton's compile time, small, and gives
the software pipeliner one flat loop whose loads (a plane tile of words, an activation tile) it issues
stages ahead of the dot that uses them.

Per-row grids: the dot multiplies (q - z), exact in fp16 (|q - z| <= 255), and the bucket's scale s is
applied once per row: the accumulator is divided by s before the bucket and multiplied by s after it.
Grouped grids dequantize to (q - z) * s in fp16. Batched decode (few tokens) splits K over programs like the
decode kernel; prefill does not split and reads activations permuted beforehand (gathering them in-kernel
would read each token's row in 2-byte pieces).
"""
from __future__ import annotations

from .kernel_common import triton, tl

if triton is not None:
    from .kernel_common import bucket_meta, load_zero, panel_range, raw_of_int, spare_bits, store_output

    @triton.jit
    def _spare_dot(acc, raw, pos, umask, wmask, x_ptr, perm_ptr, spans_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                  rows, rmask, toks, tmask, stride_xm, GROUPS, ZCOLS, zero_offset, slot_index, factor, zero_raw,
                  BITS: tl.constexpr, GROUP_MODE: tl.constexpr, SYM: tl.constexpr, GATHER_X: tl.constexpr):
        """acc + x_slot . W_slot for one slot of spare codes: raw (16, BLOCK_N) holds 2**23 + code; pos the 16
        positions. (The main loop has the same body written out: Triton's interpreter pays for every call.)"""
        if GATHER_X:
            col = tl.load(perm_ptr + pos, mask=umask, other=-1).to(tl.int32)
            xt = tl.load(x_ptr + toks[:, None] * stride_xm + col[None, :],
                         mask=tmask[:, None] & (col >= 0)[None, :], other=0.0)
        else:
            xt = tl.load(x_ptr + toks[:, None] * stride_xm + pos[None, :],
                         mask=tmask[:, None] & umask[None, :], other=0.0)
        if GROUP_MODE == 0:
            wq = (raw - zero_raw[None, :]).to(xt.dtype)  # q - z: an integer, exact in fp16
        elif GROUP_MODE == 1:
            g = tl.load(gslot_ptr + slot_index).to(tl.int32)
            scale = tl.load(spans_ptr + rows * GROUPS + g, mask=rmask, other=0.0).to(tl.float32) * factor
            zero = load_zero(zeros_ptr, rows * ZCOLS + zero_offset + g, SYM, BITS, rmask)
            wq = ((raw - (8388608.0 + zero)[None, :]) * scale[None, :]).to(xt.dtype)
        else:
            g = tl.load(gpos_ptr + pos, mask=umask, other=0).to(tl.int32)
            scale = tl.load(spans_ptr + rows[None, :] * GROUPS + g[:, None], mask=wmask,
                            other=0.0).to(tl.float32) * factor
            zero = load_zero(zeros_ptr, rows[None, :] * ZCOLS + zero_offset + g[:, None], SYM, BITS, wmask)
            wq = ((raw - (8388608.0 + zero)) * scale).to(xt.dtype)
        return tl.dot(xt, wq, acc)

    @triton.jit
    def _gemm_bucket(acc, x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr,
                     meta_ptr, rows, rmask, toks, tmask, stride_xm, N, GROUPS, ZCOLS, lo, hi, magic,
                     SLOT: tl.constexpr, BITS: tl.constexpr, C: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                     GROUP_MODE: tl.constexpr, SYM: tl.constexpr, GATHER_X: tl.constexpr, ALIGNED: tl.constexpr):
        """acc + this program's share of one bucket."""
        units, panels, word_offset, x_offset, zero_offset, cost_offset, slot_offset = bucket_meta(
            meta_ptr, SLOT, ALIGNED)
        factor = tl.load(factors_ptr + SLOT)
        p0, p1 = panel_range(lo, hi, cost_offset, panels, W)
        u = tl.arange(0, 16)
        plane = N * units
        zero_raw = 0.0
        if GROUP_MODE == 0:
            scale = tl.load(spans_ptr + rows, mask=rmask, other=1.0) * factor
            acc = acc * (1.0 / scale)[None, :]
            zero_raw = 8388608.0 + load_zero(zeros_ptr, rows * ZCOLS + zero_offset, SYM, BITS, rmask)
        MAIN = W * S
        for t in range(p0 * MAIN, p1 * MAIN):
            p = t // MAIN
            c = t % MAIN  # the code's index in its unit: word c // S, bits BITS * (c % S)
            unit = p * 16 + u
            umask = unit < units
            wmask = umask[:, None] & rmask[None, :]
            w = tl.load(codes_ptr + word_offset + (c // S) * plane + unit[:, None] * N + rows[None, :],
                        mask=wmask, other=0)
            raw = (((w >> (BITS * (c % S))) & ((1 << BITS) - 1)) | magic).to(tl.float32, bitcast=True)
            pos = x_offset + p * (16 * C) + c * 16 + u
            if GATHER_X:
                col = tl.load(perm_ptr + pos, mask=umask, other=-1).to(tl.int32)
                xt = tl.load(x_ptr + toks[:, None] * stride_xm + col[None, :],
                             mask=tmask[:, None] & (col >= 0)[None, :], other=0.0)
            else:
                xt = tl.load(x_ptr + toks[:, None] * stride_xm + pos[None, :],
                             mask=tmask[:, None] & umask[None, :], other=0.0)
            if GROUP_MODE == 0:
                wq = (raw - zero_raw[None, :]).to(xt.dtype)  # q - z: an integer, exact in fp16
            elif GROUP_MODE == 1:
                g = tl.load(gslot_ptr + slot_offset + p * C + c).to(tl.int32)
                gscale = tl.load(spans_ptr + rows * GROUPS + g, mask=rmask, other=0.0).to(tl.float32) * factor
                zero = load_zero(zeros_ptr, rows * ZCOLS + zero_offset + g, SYM, BITS, rmask)
                wq = ((raw - (8388608.0 + zero)[None, :]) * gscale[None, :]).to(xt.dtype)
            else:
                g = tl.load(gpos_ptr + pos, mask=umask, other=0).to(tl.int32)
                gscale = tl.load(spans_ptr + rows[None, :] * GROUPS + g[:, None], mask=wmask,
                                 other=0.0).to(tl.float32) * factor
                zero = load_zero(zeros_ptr, rows[None, :] * ZCOLS + zero_offset + g[:, None], SYM, BITS, wmask)
                wq = ((raw - (8388608.0 + zero)) * gscale).to(xt.dtype)
            acc = tl.dot(xt, wq, acc)
        if C > MAIN:  # 3 and 6 bits: the codes in the words' top bits
            SPARES = C - MAIN
            for t in range(p0 * SPARES, p1 * SPARES):
                p = t // SPARES
                j = t % SPARES
                unit = p * 16 + u
                umask = unit < units
                wmask = umask[:, None] & rmask[None, :]
                wptr = codes_ptr + word_offset + unit[:, None] * N + rows[None, :]
                stream = tl.zeros([16, rows.shape[0]], tl.int32)
                for word in tl.static_range(W):
                    stream = spare_bits(stream, tl.load(wptr + word * plane, mask=wmask, other=0), word)
                raw = raw_of_int((stream >> (j * BITS)) & ((1 << BITS) - 1))
                pos = x_offset + p * (16 * C) + (MAIN + j) * 16 + u
                acc = _spare_dot(acc, raw, pos, umask, wmask, x_ptr, perm_ptr, spans_ptr, zeros_ptr, gslot_ptr,
                                gpos_ptr, rows, rmask, toks, tmask, stride_xm, GROUPS, ZCOLS, zero_offset,
                                slot_offset + p * C + MAIN + j, factor, zero_raw, BITS, GROUP_MODE, SYM, GATHER_X)
        if GROUP_MODE == 0:
            acc = acc * scale[None, :]
        return acc

    @triton.jit
    def mixed_gemm_kernel(x_ptr, perm_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
                          codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr, gpos_ptr, meta_ptr,
                          M, N, stride_xm, stride_om, GROUPS, ZCOLS,
                          WIDTH_MASK: tl.constexpr, GROUP_MODE: tl.constexpr, SYM: tl.constexpr,
                          GATHER_X: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]). Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), splits).
        x is the activations in the layout's order (GATHER_X = False) or in the original one (True)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        nsplit = tl.num_programs(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tmask = toks < M
        total = tl.load(meta_ptr + 5 * 8)
        magic = tl.load(meta_ptr + 5 * 8 + 1)  # 0x4B000000, the bits of 2.0**23 (see layout.MAGIC_BITS)
        lo = pid_s * total // nsplit
        hi = (pid_s + 1) * total // nsplit
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if WIDTH_MASK & 1:
            acc = _gemm_bucket(acc, x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr,
                               gpos_ptr, meta_ptr, rows, rmask, toks, tmask, stride_xm, N, GROUPS, ZCOLS, lo, hi, magic,
                               0, 2, 16, 1, 16, GROUP_MODE, SYM, GATHER_X, ALIGNED)
        if WIDTH_MASK & 2:
            acc = _gemm_bucket(acc, x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr,
                               gpos_ptr, meta_ptr, rows, rmask, toks, tmask, stride_xm, N, GROUPS, ZCOLS, lo, hi, magic,
                               1, 3, 32, 3, 10, GROUP_MODE, SYM, GATHER_X, ALIGNED)
        if WIDTH_MASK & 4:
            acc = _gemm_bucket(acc, x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr,
                               gpos_ptr, meta_ptr, rows, rmask, toks, tmask, stride_xm, N, GROUPS, ZCOLS, lo, hi, magic,
                               2, 4, 8, 1, 8, GROUP_MODE, SYM, GATHER_X, ALIGNED)
        if WIDTH_MASK & 8:
            acc = _gemm_bucket(acc, x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr,
                               gpos_ptr, meta_ptr, rows, rmask, toks, tmask, stride_xm, N, GROUPS, ZCOLS, lo, hi, magic,
                               3, 6, 16, 3, 5, GROUP_MODE, SYM, GATHER_X, ALIGNED)
        if WIDTH_MASK & 16:
            acc = _gemm_bucket(acc, x_ptr, perm_ptr, codes_ptr, spans_ptr, factors_ptr, zeros_ptr, gslot_ptr,
                               gpos_ptr, meta_ptr, rows, rmask, toks, tmask, stride_xm, N, GROUPS, ZCOLS, lo, hi, magic,
                               4, 8, 4, 1, 4, GROUP_MODE, SYM, GATHER_X, ALIGNED)
        tile = pid_m * tl.num_programs(0) + pid_n
        store_output(acc, toks, rows, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr, tile, nsplit, HAS_BIAS)

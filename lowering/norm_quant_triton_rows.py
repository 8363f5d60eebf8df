"""Row loads and what a program keeps across rows, for the norm-quant kernel's program shapes
(lowering/norm_quant_triton.py, docs/kernels.md "Tiling").

A row is NCH <= 8 chunks, each a separate register tile (Triton cannot keep a list of
tensors across a loop): the helpers here take and return the chunks one by one, behind
constexpr `NCH > c` guards; unused chunk slots repeat chunk 0 and are never read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .norm_quant_triton_math import _ld, _ld_w


@triton.jit
def _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, c: tl.constexpr, x_dflt, r_dflt, H: tl.constexpr,
              CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, RES: tl.constexpr,
              LDMASK: tl.constexpr):
    """Raw chunk c of x and of the residual (x again without one); the defaults past NCH."""
    if NCH > c:
        xv = _ld(x_ptr, rows_x, lm, c, H, CH, CG, GS, LDMASK)
        if RES != 0:
            rv = _ld(r_ptr, rows_r, lm, c, H, CH, CG, GS, LDMASK)
        else:
            rv = xv
    else:
        xv = x_dflt
        rv = r_dflt
    return xv, rv


@triton.jit
def _ld_rows(x_ptr, r_ptr, rows, M, x_stride, r_stride, H: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr,
             CG: tl.constexpr, GS: tl.constexpr, RES: tl.constexpr, LDMASK: tl.constexpr):
    """The raw chunks x0..x7, r0..r7 of `rows`: what a program (or the persistent loop's
    prefetch) holds before the row is processed."""
    rows_x = rows.to(tl.int64)[:, None, None] * x_stride
    rows_r = rows.to(tl.int64)[:, None, None] * r_stride
    lm = (rows < M)[:, None, None]
    x0 = _ld(x_ptr, rows_x, lm, 0, H, CH, CG, GS, LDMASK)
    if RES != 0:
        r0 = _ld(r_ptr, rows_r, lm, 0, H, CH, CG, GS, LDMASK)
    else:
        r0 = x0
    x1, r1 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 1, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    x2, r2 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 2, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    x3, r3 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 3, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    x4, r4 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 4, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    x5, r5 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 5, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    x6, r6 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 6, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    x7, r7 = _ld_chunk(x_ptr, r_ptr, rows_x, rows_r, lm, 7, x0, r0, H, CH, NCH, CG, GS, RES, LDMASK)
    return x0, x1, x2, x3, x4, x5, x6, x7, r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _pre_w(w_ptr, c: tl.constexpr, dflt, H: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr,
           GS: tl.constexpr, WST: tl.constexpr, WPRE: tl.constexpr, MASKED: tl.constexpr):
    """Chunk c of the weight when it is prefetched (WPRE), else a placeholder never read."""
    if WPRE and WST != 0 and NCH > c:
        wv = _ld_w(w_ptr, c, H, CH, CG, GS, MASKED)
    else:
        wv = dflt
    return wv


@triton.jit
def _pre_ws(w_ptr, dflt, H: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr,
            GS: tl.constexpr, WST: tl.constexpr, WPRE: tl.constexpr, MASKED: tl.constexpr):
    """Every weight chunk, when prefetched (WPRE); placeholders otherwise."""
    w0 = _pre_w(w_ptr, 0, dflt, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w1 = _pre_w(w_ptr, 1, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w2 = _pre_w(w_ptr, 2, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w3 = _pre_w(w_ptr, 3, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w4 = _pre_w(w_ptr, 4, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w5 = _pre_w(w_ptr, 5, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w6 = _pre_w(w_ptr, 6, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    w7 = _pre_w(w_ptr, 7, w0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _keep_scales(a0, a1, a2, a3, a4, a5, a6, a7, k0, k1, k2, k3, k4, k5, k6, k7, i, NCH: tl.constexpr,
                 SEQ: tl.constexpr):
    """Row i of a SEQ program: its group scales of each chunk (k0.., [1, CG]) into the
    program's [SEQ, CG] blocks."""
    sel = tl.arange(0, SEQ)[:, None] == i
    a0 = tl.where(sel, k0, a0)
    if NCH > 1:
        a1 = tl.where(sel, k1, a1)
    if NCH > 2:
        a2 = tl.where(sel, k2, a2)
    if NCH > 3:
        a3 = tl.where(sel, k3, a3)
    if NCH > 4:
        a4 = tl.where(sel, k4, a4)
    if NCH > 5:
        a5 = tl.where(sel, k5, a5)
    if NCH > 6:
        a6 = tl.where(sel, k6, a6)
    if NCH > 7:
        a7 = tl.where(sel, k7, a7)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _store_scale_block(s_ptr, a, c: tl.constexpr, base, M, G: tl.constexpr, CG: tl.constexpr, NCH: tl.constexpr,
                       SEQ: tl.constexpr):
    """Chunk c's column-major scales of a SEQ program's rows: per group, SEQ contiguous floats."""
    if NCH > c:
        gidx = c * CG + tl.arange(0, CG)[None, :]  # [1, CG]
        rr = base + tl.arange(0, SEQ)[:, None]  # [SEQ, 1]
        tl.store(s_ptr + gidx.to(tl.int64) * M + rr, a, mask=(rr < M) & (gidx < G))


@triton.jit
def _store_scale_blocks(s_ptr, a0, a1, a2, a3, a4, a5, a6, a7, base, M, G: tl.constexpr, CG: tl.constexpr,
                        NCH: tl.constexpr, SEQ: tl.constexpr):
    """Every chunk's block of a SEQ program's column-major scales (`_store_scale_block`)."""
    _store_scale_block(s_ptr, a0, 0, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a1, 1, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a2, 2, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a3, 3, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a4, 4, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a5, 5, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a6, 6, base, M, G, CG, NCH, SEQ)
    _store_scale_block(s_ptr, a7, 7, base, M, G, CG, NCH, SEQ)

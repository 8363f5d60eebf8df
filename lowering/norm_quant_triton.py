"""Triton kernels for the fused RMSNorm -> quantization op (`fusewright::rms_norm_quant`).

One kernel, specialised at compile time (constexpr) per :class:`NormQuantSpec`, covers
every variant: residual none / input_dtype / f32; weight styles none / after_cast /
before_cast / one_plus; quant fp8 static, fp8 per-token, fp8 per-group (row- or
column-major scales, ue8m0), int8 per-token; exact and fast numerics.

Design (see docs/kernels.md):

* A program owns ROWS rows (1 for the large hidden sizes). The row is split into NCH
  chunks of CH = a power of two columns (NCH <= 8), each held in registers as a
  ``[ROWS, CG, GS]`` tile (GS = the quant group, or 128 columns for the other kinds).
  Unlike one ``next_pow2(H)`` block, chunks waste no lanes at H = 5120 or 7168 (5 and 7
  chunks of 1024). x is read from HBM once; every output is written once.
* The chunks are separate SSA values, unrolled with constexpr ``if NCH > k`` blocks
  (Triton cannot keep a list of tensors across a loop).
* Rounding follows the spec step by step in exact mode: IEEE division and square root
  (``div_rn``, ``sqrt_rn``; Triton's plain ``/`` on f32 is an approximate division),
  NaN-propagating min/max (the hardware min/max drop NaN), ``rsqrt`` computed in f64 and
  rounded once to f32 (correctly rounded), ue8m0 via f64 log2/exp2.
* Spec constants (eps, scale constant, clamps, floor, upper bound) are constexpr; each
  is materialised as an f32 (or f64, for f64 scale math) constant in the kernel, so no
  float argument is ever computed in double by accident and nothing is read back to
  the host: the launch is CUDA-graph safe and allocates only from shapes.

The Triton interpreter (TRITON_INTERPRET=1, CPU CI) converts f32 -> bf16 by truncation
and f32 -> fp8 with a rounding that is neither RNE nor carry-correct (see
docs/kernels.md). Under the interpreter (constexpr INTERP) those conversions are done
bit-exactly in integer arithmetic instead; on the GPU the hardware conversions are used.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

from .norm_quant_spec import NormQuantSpec, SpecError
from .norm_quant_plan import (  # noqa: F401  (plan, supports, the tuning table: re-exported API)
    _APPLY_CODE, _DT_CODE, _INV_CODE, _KIND_CODE, _RES_CODE, _W_CODE, ENV_TUNING, TUNING_PATH,
    LARGE_M, SMALL_M, _tuning_table, plan, size_class, supports, tuning_key,
)
from .norm_quant_triton_division import DIV_ANY, DIV_NONNEG, DIV_OK, _div_exact, _div_ok, scale_division
from .norm_quant_triton_math import (
    _c32, _cvt_out, _finish_h, _group_finish, _int8_rows_in_range, _max_nan, _normalize, _quant_store,
    _scale_from_amax, _store_scales, _store_y, _up,
)
from .norm_quant_triton_rows import _keep_scales, _ld_rows, _pre_ws, _store_scale_blocks


# ---------------------------------------------------------------------- kernel
# Why per-chunk helpers and `if NCH > k` ladders: a row is NCH <= 8 separate register tiles
# (Triton cannot keep a list of tensors across a loop), so each step is one helper called
# once per chunk behind a constexpr guard; unused chunk slots repeat chunk 0 and are never read.


@triton.jit
def _head_chunk(xv, rv, c: tl.constexpr, h_dflt, sq, ro_ptr, orow, rmask3, H: tl.constexpr, CH: tl.constexpr,
                NCH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, XDT: tl.constexpr, RES: tl.constexpr,
                HS_DT: tl.constexpr, MASKED: tl.constexpr, INTERP: tl.constexpr):
    """Chunk c's norm input h (stores the new residual) and the running elementwise sum of
    squares. Squares are summed across chunks elementwise and reduced once per row: the
    contract leaves the summation order free, and one block reduction instead of NCH saves
    NCH - 1 cross-warp barriers, which is most of a single row's latency at decode sizes."""
    if NCH > c:
        h = _finish_h(xv, rv, ro_ptr, orow, rmask3, c, H, CH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
        hh = _up(h, HS_DT, INTERP)
        sq = sq + hh * hh
    else:
        h = h_dflt
    return h, sq


@triton.jit
def _token_chunk(h, wv, c: tl.constexpr, yk_dflt, am, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H: tl.constexpr,
                 CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, INV: tl.constexpr,
                 WST: tl.constexpr, WDT: tl.constexpr, CDT: tl.constexpr, ODT: tl.constexpr, HS_DT: tl.constexpr,
                 RET_Y: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, WPRE: tl.constexpr,
                 INTERP: tl.constexpr):
    """Per-token kinds, chunk c: normalise, fold |y| into the running elementwise amax (one
    block reduction per row, as for the sum of squares), and keep the value to quantize
    once the row's scale is known (in the output dtype in exact mode: half the registers)."""
    if NCH > c:
        ya, yq = _normalize(_up(h, HS_DT, INTERP), rinv, rsq, w_ptr, wv, c, H, CH, CG, GS, INV, WST, WDT, CDT, ODT,
                            FAST, MASKED, WPRE, INTERP)
        am = _max_nan(am, tl.abs(ya))
        if RET_Y:
            _store_y(ya, y_ptr, orow, rmask3, c, H, CH, CG, GS, ODT, MASKED, INTERP)
        if FAST:
            yk = yq
        else:
            yk = _cvt_out(ya, ODT, INTERP)
    else:
        yk = yk_dflt
    return yk, am


@triton.jit
def _token_stores(yk0, yk1, yk2, yk3, yk4, yk5, yk6, yk7, s3, rs3, q_ptr, orow, rmask3, H: tl.constexpr,
                  CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, APPLY: tl.constexpr,
                  UE8M0: tl.constexpr, INT8: tl.constexpr, CLO: tl.constexpr, CHI: tl.constexpr, FAST: tl.constexpr,
                  MASKED: tl.constexpr, INTERP: tl.constexpr, YS_DT: tl.constexpr, DIV: tl.constexpr,
                  IN_RANGE: tl.constexpr = False):
    """Per-token kinds: quantize and store every kept chunk with the row's scale."""
    _quant_store(_up(yk0, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 0, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                 CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 1:
        _quant_store(_up(yk1, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 1, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 2:
        _quant_store(_up(yk2, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 2, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 3:
        _quant_store(_up(yk3, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 3, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 4:
        _quant_store(_up(yk4, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 4, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 5:
        _quant_store(_up(yk5, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 5, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 6:
        _quant_store(_up(yk6, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 6, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)
    if NCH > 7:
        _quant_store(_up(yk7, YS_DT, INTERP), s3, rs3, q_ptr, orow, rmask3, 7, H, CH, CG, GS, APPLY, UE8M0, INT8, CLO,
                     CHI, FAST, MASKED, INTERP, DIV, IN_RANGE)


@triton.jit
def _process(
    rows, x0, x1, x2, x3, x4, x5, x6, x7,
    r0, r1, r2, r3, r4, r5, r6, r7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    w_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr, M, x_stride, r_stride,
    H: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr,
    ROWS: tl.constexpr, MASKED: tl.constexpr,
    XDT: tl.constexpr, WDT: tl.constexpr, CDT: tl.constexpr, ODT: tl.constexpr,
    RES: tl.constexpr, WST: tl.constexpr, INV: tl.constexpr, EPS: tl.constexpr,
    KIND: tl.constexpr, G: tl.constexpr, COLMAJ: tl.constexpr, UE8M0: tl.constexpr,
    SMD: tl.constexpr, HAS_UB: tl.constexpr, UB: tl.constexpr, HAS_FLOOR: tl.constexpr,
    FLOOR_AMAX: tl.constexpr, FLOOR: tl.constexpr, CONST_DIV: tl.constexpr, SCONST: tl.constexpr,
    RCONST: tl.constexpr, RH: tl.constexpr,
    APPLY: tl.constexpr, CLO: tl.constexpr, CHI: tl.constexpr, SIN_DT: tl.constexpr,
    RET_Y: tl.constexpr, FAST: tl.constexpr, INTERP: tl.constexpr, WPRE: tl.constexpr, SDIV: tl.constexpr,
    KEEP: tl.constexpr,
):
    """Everything after the raw loads of the rows' chunks x0.. (and residual r0..; unused
    ones are dummies) and, with WPRE, of the weight chunks w0.. (else dummies). With KEEP
    (per-group kinds) the group scales of each chunk are returned, not stored; the other
    returned values are placeholders."""
    rmask3 = (rows < M)[:, None, None]
    r64 = rows.to(tl.int64)[:, None, None]
    orow = r64 * H  # outputs are contiguous [M, H]
    INT8: tl.constexpr = KIND == 3
    # registers: the row is kept in the input dtype when that is exact (no f32 residual add),
    # and per-token kinds keep the normalised row in the output dtype (exact mode)
    HS_DT: tl.constexpr = XDT if RES != 2 else 0
    YS_DT: tl.constexpr = 0 if FAST else ODT

    # Loads that do not depend on the row statistic are issued before its block reduction:
    # after it they would add a memory round trip to every row's latency (the static scale
    # always; the weight chunks with WPRE, loaded by the caller: the small-T plans, where
    # latency is the cost, and persistent plans, which load them once per program).
    s_static = 0.0
    rs_static = 0.0
    if KIND == 0:
        sv = tl.load(sin_ptr)
        if SIN_DT == 1 and INTERP:
            s_static = _up(sv, 1, INTERP)
        else:
            s_static = sv.to(tl.float32)
        rs_static = tl.div_rn(_c32(1.0), s_static)

    # ---- pass 1: the norm input of every chunk, its sum of squares
    h0 = _finish_h(x0, r0, ro_ptr, orow, rmask3, 0, H, CH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    hh = _up(h0, HS_DT, INTERP)
    sq = hh * hh
    h1, sq = _head_chunk(x1, r1, 1, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    h2, sq = _head_chunk(x2, r2, 2, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    h3, sq = _head_chunk(x3, r3, 3, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    h4, sq = _head_chunk(x4, r4, 4, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    h5, sq = _head_chunk(x5, r5, 5, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    h6, sq = _head_chunk(x6, r6, 6, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    h7, sq = _head_chunk(x7, r7, 7, h0, sq, ro_ptr, orow, rmask3, H, CH, NCH, CG, GS, XDT, RES, HS_DT, MASKED, INTERP)
    ss = tl.sum(tl.sum(sq, 2), 1)

    # ---- the row statistic: mean = sum / H (true division, as eager CPU mean), + f32 eps
    v = _div_exact(ss, _c32(H), _c32(RH)) + _c32(EPS)
    if INV == 0:  # rsqrt rounded once to f32 from an f64 rsqrt (1 f64 ulp: correctly rounded
        # unless within 2^-29 f32 ulps of a midpoint)
        if INTERP:
            rinv = (1.0 / tl.sqrt(v.to(tl.float64))).to(tl.float32)
        else:
            rinv = libdevice.rsqrt(v.to(tl.float64)).to(tl.float32)
        rsq = rinv
    elif INV == 1:  # 1 / sqrt(v), each step rounded to f32
        rinv = tl.div_rn(_c32(1.0), tl.sqrt_rn(v))
        rsq = rinv
    else:  # h / sqrt(v): pass sqrt(v) and its reciprocal, _normalize divides
        rinv = tl.sqrt_rn(v)
        rsq = tl.div_rn(_c32(1.0), rinv)
    rinv = rinv[:, None, None]
    rsq = rsq[:, None, None]

    # the chunks' kept group scales (KEEP); placeholders otherwise
    k0, k1, k2, k3, k4, k5, k6, k7 = rinv, rinv, rinv, rinv, rinv, rinv, rinv, rinv
    # ---- pass 2: normalise; per group / static quantize chunk by chunk, per token
    # keeps the normalised chunks until the row amax is known
    if KIND == 1 or KIND == 3:
        ya0, yq0 = _normalize(_up(h0, HS_DT, INTERP), rinv, rsq, w_ptr, w0, 0, H, CH, CG, GS, INV, WST, WDT, CDT, ODT,
                              FAST, MASKED, WPRE, INTERP)
        amt = tl.abs(ya0)
        if RET_Y:
            _store_y(ya0, y_ptr, orow, rmask3, 0, H, CH, CG, GS, ODT, MASKED, INTERP)
        if FAST:
            yk0 = yq0
        else:
            yk0 = _cvt_out(ya0, ODT, INTERP)
        yk1, amt = _token_chunk(h1, w1, 1, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        yk2, amt = _token_chunk(h2, w2, 2, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        yk3, amt = _token_chunk(h3, w3, 3, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        yk4, amt = _token_chunk(h4, w4, 4, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        yk5, amt = _token_chunk(h5, w5, 5, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        yk6, amt = _token_chunk(h6, w6, 6, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        yk7, amt = _token_chunk(h7, w7, 7, yk0, amt, rinv, rsq, w_ptr, y_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                                INV, WST, WDT, CDT, ODT, HS_DT, RET_Y, FAST, MASKED, WPRE, INTERP)
        am = tl.reduce(tl.reduce(amt, 2, _max_nan), 1, _max_nan)
        s_row = _scale_from_amax(am, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0,
                                 INTERP)
        _store_scales(s_ptr + rows, s_row, rows < M, INTERP)
        rs_row = tl.div_rn(_c32(1.0), s_row)
        s3 = s_row[:, None, None]
        rs3 = rs_row[:, None, None]
        if APPLY == 0 and not FAST and not UE8M0 and not INT8:  # _quant_store divides
            # one test per program picks the division: the special cases are rows with inf or NaN
            if tl.min(_div_ok(am, s_row, rs_row).to(tl.int32), 0) == 1:
                _token_stores(yk0, yk1, yk2, yk3, yk4, yk5, yk6, yk7, s3, rs3, q_ptr, orow, rmask3, H, CH, NCH, CG,
                              GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, INTERP, YS_DT, DIV_OK)
            else:
                _token_stores(yk0, yk1, yk2, yk3, yk4, yk5, yk6, yk7, s3, rs3, q_ptr, orow, rmask3, H, CH, NCH, CG,
                              GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, INTERP, YS_DT, SDIV)
        elif INT8:
            # one test per program: rows with no element past the clamp and no NaN (all finite
            # rows of the usual int8 specs) take the short conversion
            if _int8_rows_in_range(am, s_row, rs_row, APPLY, CLO, CHI, FAST, SDIV):
                _token_stores(yk0, yk1, yk2, yk3, yk4, yk5, yk6, yk7, s3, rs3, q_ptr, orow, rmask3, H, CH, NCH, CG,
                              GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, INTERP, YS_DT, SDIV, True)
            else:
                _token_stores(yk0, yk1, yk2, yk3, yk4, yk5, yk6, yk7, s3, rs3, q_ptr, orow, rmask3, H, CH, NCH, CG,
                              GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, INTERP, YS_DT, SDIV)
        else:
            _token_stores(yk0, yk1, yk2, yk3, yk4, yk5, yk6, yk7, s3, rs3, q_ptr, orow, rmask3, H, CH, NCH, CG, GS,
                          APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, INTERP, YS_DT, SDIV)
    else:
        k0 = _chunk_local(_up(h0, HS_DT, INTERP), w0, 0, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                          H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                          FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 1:
            k1 = _chunk_local(_up(h1, HS_DT, INTERP), w1, 1, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 2:
            k2 = _chunk_local(_up(h2, HS_DT, INTERP), w2, 2, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 3:
            k3 = _chunk_local(_up(h3, HS_DT, INTERP), w3, 3, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 4:
            k4 = _chunk_local(_up(h4, HS_DT, INTERP), w4, 4, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 5:
            k5 = _chunk_local(_up(h5, HS_DT, INTERP), w5, 5, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 6:
            k6 = _chunk_local(_up(h6, HS_DT, INTERP), w6, 6, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
        if NCH > 7:
            k7 = _chunk_local(_up(h7, HS_DT, INTERP), w7, 7, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                              H, CH, CG, GS, INV, WST, WDT, CDT, ODT, KIND, G, COLMAJ, SMD, HAS_UB, UB, HAS_FLOOR,
                              FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, RET_Y, FAST, MASKED, WPRE, INTERP, SDIV, KEEP)
    return k0, k1, k2, k3, k4, k5, k6, k7




@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, w_ptr, r_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr,
    M, x_stride, r_stride,
    H: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr,
    ROWS: tl.constexpr, MASKED: tl.constexpr,
    XDT: tl.constexpr, WDT: tl.constexpr, CDT: tl.constexpr, ODT: tl.constexpr,
    RES: tl.constexpr, WST: tl.constexpr, INV: tl.constexpr, EPS: tl.constexpr,
    KIND: tl.constexpr, G: tl.constexpr, COLMAJ: tl.constexpr, UE8M0: tl.constexpr,
    SMD: tl.constexpr, HAS_UB: tl.constexpr, UB: tl.constexpr, HAS_FLOOR: tl.constexpr,
    FLOOR_AMAX: tl.constexpr, FLOOR: tl.constexpr, CONST_DIV: tl.constexpr, SCONST: tl.constexpr,
    RCONST: tl.constexpr, RH: tl.constexpr,
    APPLY: tl.constexpr, CLO: tl.constexpr, CHI: tl.constexpr, SIN_DT: tl.constexpr,
    RET_Y: tl.constexpr, FAST: tl.constexpr, INTERP: tl.constexpr, PERSIST: tl.constexpr, WPRE: tl.constexpr,
    PIPE: tl.constexpr, SDIV: tl.constexpr, SEQ: tl.constexpr,
):
    """One program per ROWS rows, or (PERSIST) a persistent loop over rows, in one of two forms:

    * PIPE = 0: the next row's raw chunks are loaded into registers before the current one
      is processed (loop-carried registers, twice the row's registers);
    * PIPE = S > 1: the loop is software-pipelined by the compiler (``tl.range(num_stages=S)``):
      the loads of the next S - 1 rows are issued as asynchronous copies into shared memory,
      so a program keeps rows in flight without holding them in registers;

    or (SEQ > 0) runs of SEQ consecutive rows, processed one after another with the next row
    prefetched into registers as in the first form: one program per run, or (PERSIST) a
    persistent loop over runs. Column-major group scales are then kept in registers and
    stored once per run: SEQ consecutive tokens of a group are contiguous, so each group's
    scales go out as one SEQ * 4-byte store instead of SEQ 4-byte stores into sectors that
    other programs complete."""
    pid = tl.program_id(0)
    # the register-prefetch loops' load of the row after the last one is masked off
    LDMASK: tl.constexpr = (PERSIST and PIPE == 0) or SEQ > 0 or MASKED
    if PERSIST and PIPE > 0:
        nprog = tl.num_programs(0)
        # placeholders of the weight chunks when they are not held (never read)
        w0, w1, w2, w3, w4, w5, w6, w7 = _pre_ws(w_ptr, tl.zeros([1, CG, GS], tl.float32), H, CH, NCH, CG, GS,
                                                 WST, WPRE, MASKED)
        for r in tl.range(pid, M, nprog, num_stages=PIPE):
            rows = r + tl.arange(0, 1)
            x0, x1, x2, x3, x4, x5, x6, x7, r0, r1, r2, r3, r4, r5, r6, r7 = _ld_rows(
                x_ptr, r_ptr, rows, M, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
            _process(rows, x0, x1, x2, x3, x4, x5, x6, x7,
                     r0, r1, r2, r3, r4, r5, r6, r7,
                     w0, w1, w2, w3, w4, w5, w6, w7,
                     w_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr, M, x_stride, r_stride,
                     H, CH, NCH, CG, GS, ROWS, MASKED, XDT, WDT, CDT, ODT, RES, WST, INV, EPS, KIND, G, COLMAJ, UE8M0, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, RH, APPLY, CLO, CHI, SIN_DT, RET_Y, FAST, INTERP, WPRE, SDIV, False)
    elif SEQ > 0 and PERSIST:
        BATCH: tl.constexpr = KIND == 2 and COLMAJ
        # persistent, over runs of SEQ rows: runs pid, pid + nprog, ... (the grid is at most
        # one program per run), their rows in turn; the next row, in this run or the next,
        # prefetched into registers. Column-major scales go out once per run.
        nprog = tl.num_programs(0)
        nk = tl.cdiv(tl.cdiv(M, SEQ) - pid, nprog) * SEQ
        rows = pid * SEQ + tl.arange(0, 1)
        x0, x1, x2, x3, x4, x5, x6, x7, r0, r1, r2, r3, r4, r5, r6, r7 = _ld_rows(
            x_ptr, r_ptr, rows, M, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
        w0, w1, w2, w3, w4, w5, w6, w7 = _pre_ws(w_ptr, x0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
        a0 = tl.zeros([SEQ, CG], tl.float32)
        a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
        for k in range(0, nk):
            kn = k + 1
            nrows = (pid + (kn // SEQ) * nprog) * SEQ + kn % SEQ + tl.arange(0, 1)  # past M: masked off
            nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7, nr0, nr1, nr2, nr3, nr4, nr5, nr6, nr7 = _ld_rows(
                x_ptr, r_ptr, nrows, M, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
            k0, k1, k2, k3, k4, k5, k6, k7 = _process(
                rows, x0, x1, x2, x3, x4, x5, x6, x7,
                r0, r1, r2, r3, r4, r5, r6, r7,
                w0, w1, w2, w3, w4, w5, w6, w7,
                w_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr, M, x_stride, r_stride,
                H, CH, NCH, CG, GS, ROWS, MASKED, XDT, WDT, CDT, ODT, RES, WST, INV, EPS, KIND, G, COLMAJ, UE8M0, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, RH, APPLY, CLO, CHI, SIN_DT, RET_Y, FAST, INTERP, WPRE, SDIV, BATCH)
            if BATCH:
                a0, a1, a2, a3, a4, a5, a6, a7 = _keep_scales(a0, a1, a2, a3, a4, a5, a6, a7, k0, k1, k2, k3, k4, k5,
                                                              k6, k7, k % SEQ, NCH, SEQ)
                if k % SEQ == SEQ - 1:  # the run's last row: its scales out
                    _store_scale_blocks(s_ptr, a0, a1, a2, a3, a4, a5, a6, a7, (pid + (k // SEQ) * nprog) * SEQ, M,
                                        G, CG, NCH, SEQ)
            x0, x1, x2, x3, x4, x5, x6, x7 = nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7
            r0, r1, r2, r3, r4, r5, r6, r7 = nr0, nr1, nr2, nr3, nr4, nr5, nr6, nr7
            rows = nrows
    elif SEQ > 0:
        BATCH: tl.constexpr = KIND == 2 and COLMAJ
        base = pid * SEQ
        end = tl.minimum(M, base + SEQ)
        # each program starts its block at its own offset (rows base + (i + rot) % SEQ):
        # otherwise the rows read at one time are SEQ rows apart, a power-of-two stride
        rot = pid % SEQ
        rows = base + rot + tl.arange(0, 1)
        x0, x1, x2, x3, x4, x5, x6, x7, r0, r1, r2, r3, r4, r5, r6, r7 = _ld_rows(
            x_ptr, r_ptr, rows, end, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
        w0, w1, w2, w3, w4, w5, w6, w7 = _pre_ws(w_ptr, x0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
        # the program's scales, [SEQ, CG] per chunk (BATCH); unused otherwise
        a0 = tl.zeros([SEQ, CG], tl.float32)
        a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
        for i in range(SEQ):
            nrows = base + (i + 1 + rot) % SEQ + tl.arange(0, 1)
            # the last turn's prefetch (the block's first row again) is masked off
            nend = tl.where(i + 1 < SEQ, end, 0)
            nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7, nr0, nr1, nr2, nr3, nr4, nr5, nr6, nr7 = _ld_rows(
                x_ptr, r_ptr, nrows, nend, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
            k0, k1, k2, k3, k4, k5, k6, k7 = _process(
                rows, x0, x1, x2, x3, x4, x5, x6, x7,
                r0, r1, r2, r3, r4, r5, r6, r7,
                w0, w1, w2, w3, w4, w5, w6, w7,
                w_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr, M, x_stride, r_stride,
                H, CH, NCH, CG, GS, ROWS, MASKED, XDT, WDT, CDT, ODT, RES, WST, INV, EPS, KIND, G, COLMAJ, UE8M0, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, RH, APPLY, CLO, CHI, SIN_DT, RET_Y, FAST, INTERP, WPRE, SDIV, BATCH)
            if BATCH:
                a0, a1, a2, a3, a4, a5, a6, a7 = _keep_scales(a0, a1, a2, a3, a4, a5, a6, a7, k0, k1, k2, k3, k4, k5,
                                                              k6, k7, (i + rot) % SEQ, NCH, SEQ)
            x0, x1, x2, x3, x4, x5, x6, x7 = nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7
            r0, r1, r2, r3, r4, r5, r6, r7 = nr0, nr1, nr2, nr3, nr4, nr5, nr6, nr7
            rows = nrows
        if BATCH:
            _store_scale_blocks(s_ptr, a0, a1, a2, a3, a4, a5, a6, a7, base, M, G, CG, NCH, SEQ)
    elif PERSIST:
        nprog = tl.num_programs(0)
        rows = pid + tl.arange(0, 1)
        x0, x1, x2, x3, x4, x5, x6, x7, r0, r1, r2, r3, r4, r5, r6, r7 = _ld_rows(
            x_ptr, r_ptr, rows, M, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
        # the weight does not change from row to row: with WPRE it stays in registers
        w0, w1, w2, w3, w4, w5, w6, w7 = _pre_ws(w_ptr, x0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
        for _ in range(pid, M, nprog):
            nrows = rows + nprog
            nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7, nr0, nr1, nr2, nr3, nr4, nr5, nr6, nr7 = _ld_rows(
                x_ptr, r_ptr, nrows, M, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
            _process(rows, x0, x1, x2, x3, x4, x5, x6, x7,
                     r0, r1, r2, r3, r4, r5, r6, r7,
                     w0, w1, w2, w3, w4, w5, w6, w7,
                     w_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr, M, x_stride, r_stride,
                     H, CH, NCH, CG, GS, ROWS, MASKED, XDT, WDT, CDT, ODT, RES, WST, INV, EPS, KIND, G, COLMAJ, UE8M0, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, RH, APPLY, CLO, CHI, SIN_DT, RET_Y, FAST, INTERP, WPRE, SDIV, False)
            x0, x1, x2, x3, x4, x5, x6, x7 = nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7
            r0, r1, r2, r3, r4, r5, r6, r7 = nr0, nr1, nr2, nr3, nr4, nr5, nr6, nr7
            rows = nrows
    else:
        rows = pid * ROWS + tl.arange(0, ROWS)
        x0, x1, x2, x3, x4, x5, x6, x7, r0, r1, r2, r3, r4, r5, r6, r7 = _ld_rows(
            x_ptr, r_ptr, rows, M, x_stride, r_stride, H, CH, NCH, CG, GS, RES, LDMASK)
        w0, w1, w2, w3, w4, w5, w6, w7 = _pre_ws(w_ptr, x0, H, CH, NCH, CG, GS, WST, WPRE, MASKED)
        _process(rows, x0, x1, x2, x3, x4, x5, x6, x7,
                 r0, r1, r2, r3, r4, r5, r6, r7,
                 w0, w1, w2, w3, w4, w5, w6, w7,
                 w_ptr, sin_ptr, q_ptr, s_ptr, ro_ptr, y_ptr, M, x_stride, r_stride,
                 H, CH, NCH, CG, GS, ROWS, MASKED, XDT, WDT, CDT, ODT, RES, WST, INV, EPS, KIND, G, COLMAJ, UE8M0, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, RH, APPLY, CLO, CHI, SIN_DT, RET_Y, FAST, INTERP, WPRE, SDIV, False)


@triton.jit
def _chunk_local(h, wv, c, rinv, rsq, w_ptr, rows, rmask3, M, q_ptr, orow, s_ptr, y_ptr, s_static, rs_static,
                 H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, INV: tl.constexpr,
                 WST: tl.constexpr, WDT: tl.constexpr, CDT: tl.constexpr, ODT: tl.constexpr, KIND: tl.constexpr,
                 G: tl.constexpr, COLMAJ: tl.constexpr, SMD: tl.constexpr, HAS_UB: tl.constexpr, UB: tl.constexpr,
                 HAS_FLOOR: tl.constexpr, FLOOR_AMAX: tl.constexpr, FLOOR: tl.constexpr, CONST_DIV: tl.constexpr,
                 SCONST: tl.constexpr, RCONST: tl.constexpr, UE8M0: tl.constexpr, APPLY: tl.constexpr,
                 CLO: tl.constexpr,
                 CHI: tl.constexpr, RET_Y: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr,
                 WPRE: tl.constexpr, INTERP: tl.constexpr, SDIV: tl.constexpr, KEEP: tl.constexpr):
    """Static or per-group quantization of chunk c (needs nothing from the other chunks).
    Returns the chunk's group scales when KEEP (not stored here), else a placeholder."""
    kept = s_static
    ya, yq = _normalize(h, rinv, rsq, w_ptr, wv, c, H, CH, CG, GS, INV, WST, WDT, CDT, ODT, FAST, MASKED, WPRE, INTERP)
    if KIND == 0:
        if APPLY == 0 and not FAST:
            # a static scale's sign is known only at run time (`_div_exact_nonneg` needs it not
            # negative): one scalar test per chunk
            if s_static >= 0.0:
                _quant_store(yq, s_static, rs_static, q_ptr, orow, rmask3, c, H, CH, CG, GS, APPLY, False, False, CLO,
                             CHI, FAST, MASKED, INTERP, DIV_NONNEG)
            else:
                _quant_store(yq, s_static, rs_static, q_ptr, orow, rmask3, c, H, CH, CG, GS, APPLY, False, False, CLO,
                             CHI, FAST, MASKED, INTERP, DIV_ANY)
        else:
            _quant_store(yq, s_static, rs_static, q_ptr, orow, rmask3, c, H, CH, CG, GS, APPLY, False, False, CLO, CHI,
                         FAST, MASKED, INTERP)
    else:
        kept = _group_finish(ya, yq, c, rows, rmask3, M, q_ptr, orow, s_ptr, G, COLMAJ, H, CH, CG, GS, SMD, HAS_UB,
                             UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0, APPLY, CLO, CHI, FAST,
                             MASKED, INTERP, SDIV, True, KEEP)
    if RET_Y:
        _store_y(ya, y_ptr, orow, rmask3, c, H, CH, CG, GS, ODT, MASKED, INTERP)
    return kept


# ---------------------------------------------------------------------- launch
def _f32_recip(v: float) -> float:
    """RN_f32(1 / v) as a Python float (the reciprocal `_div_exact` needs for a constant divisor)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(v), dtype=torch.float32))


@functools.lru_cache(maxsize=8)
def _num_sms(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _as_2d(t: torch.Tensor, hidden: int) -> tuple[torch.Tensor, int]:
    """t viewed as [M, H] with a unit stride on the last dim, and its row stride."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t, t.stride(0)
    t2 = t.reshape(-1, hidden)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


@functools.lru_cache(maxsize=256)
def _cached_plan(spec: NormQuantSpec, hidden: int, size: str, table_path: str) -> dict:
    return plan(spec, hidden, None, {"small": 0, "mid": SMALL_M, "large": LARGE_M}[size])


@functools.lru_cache(maxsize=256)
def _spec_kwargs(spec: NormQuantSpec, hidden: int, has_weight: bool, scale_dtype: torch.dtype | None,
                 interp: bool) -> dict:
    """The constexpr arguments fixed by the spec (built once per spec: the launch is on the host's
    critical path when the graph is not replayed from a CUDA graph)."""
    norm, quant = spec.norm, spec.quant
    groups = hidden // quant.group_size if quant.kind == "fp8_per_group" else 1
    return dict(
        H=hidden,
        XDT=_DT_CODE[norm.input_dtype], WDT=_DT_CODE[norm.weight_dtype] if has_weight else 0,
        CDT=_DT_CODE[norm.cast_dtype], ODT=_DT_CODE[norm.out_dtype],
        RES=_RES_CODE[norm.residual], WST=_W_CODE[norm.weight], INV=_INV_CODE[norm.inv], EPS=float(norm.eps),
        KIND=_KIND_CODE[quant.kind], G=groups, COLMAJ=bool(quant.col_major), UE8M0=bool(quant.ue8m0),
        SMD=_DT_CODE[quant.scale_math_dtype], HAS_UB=quant.amax_ub is not None, UB=float(quant.amax_ub or 0.0),
        HAS_FLOOR=quant.floor is not None, FLOOR_AMAX=quant.floor_on == "amax", FLOOR=float(quant.floor or 0.0),
        CONST_DIV=quant.scale_form == "const_div", SCONST=float(quant.scale_const),
        RCONST=_f32_recip(quant.scale_const), RH=_f32_recip(hidden),
        APPLY=_APPLY_CODE[quant.apply], CLO=float(quant.clamp_lo), CHI=float(quant.clamp_hi),
        SIN_DT=_DT_CODE.get(scale_dtype, 0) if scale_dtype is not None else 0,
        RET_Y=bool(spec.return_normalized), FAST=spec.numerics == "fast", INTERP=interp,
        SDIV=scale_division(quant),
    )


def launch(spec: NormQuantSpec, x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, *, tuning: dict | None = None,
           info: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Run the fused kernel; same inputs and outputs as `norm_quant_reference.reference`.

    `tuning` overrides the tile plan (benchmarks); `info`, if given, receives the plan and
    the compiled kernel's register and spill counts."""
    norm, quant = spec.norm, spec.quant
    if x.dtype != norm.input_dtype:
        raise SpecError(f"x has dtype {x.dtype}, the spec expects {norm.input_dtype}")
    if (weight is None) != (norm.weight == "none"):
        raise SpecError(f"weight style {norm.weight!r} but weight is {'missing' if weight is None else 'given'}")
    if (residual is None) != (norm.residual == "none"):
        raise SpecError(f"residual mode {norm.residual!r} but residual is {'missing' if residual is None else 'given'}")
    if (scale is None) != quant.dynamic:
        raise SpecError(f"quant kind {quant.kind!r} but scale is {'missing' if scale is None else 'given'}")
    hidden = x.shape[-1]
    spec.check_hidden(hidden)
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if tuning is None:  # the plan depends on m only through its size class: cached
        cfg = _cached_plan(spec, hidden, size_class(m), os.environ.get(ENV_TUNING) or TUNING_PATH)
    else:
        cfg = plan(spec, hidden, tuning, m)

    x2, xs = _as_2d(x, hidden)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise SpecError("residual must have x's shape and dtype")
        r2, rs = _as_2d(residual, hidden)
    else:
        r2, rs = x2, 0
    if weight is not None:
        if tuple(weight.shape) != (hidden,) or weight.dtype != norm.weight_dtype:
            raise SpecError(f"weight must be [{hidden}] {norm.weight_dtype}, got {tuple(weight.shape)} {weight.dtype}")
        w = weight.contiguous()
    else:
        w = x2
    if scale is not None:
        if scale.numel() != 1:
            raise SpecError(f"static scale must have one element, got shape {tuple(scale.shape)}")
        if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise SpecError(f"static scale dtype {scale.dtype} not supported")
        sin = scale.reshape(1)
    else:
        sin = x2

    dev = x.device
    q = torch.empty((m, hidden), dtype=quant.out_dtype, device=dev)
    outs: list[torch.Tensor] = [q.view(x.shape)]
    s_out = x2
    if quant.dynamic:
        if quant.kind == "fp8_per_group":
            groups = hidden // quant.group_size
            if quant.col_major:
                buf = torch.empty((groups, m), dtype=torch.float32, device=dev)
                nd = len(lead) + 1
                outs.append(buf.view((groups,) + lead).permute(tuple(range(1, nd)) + (0,)))
            else:
                buf = torch.empty((m, groups), dtype=torch.float32, device=dev)
                outs.append(buf.view(lead + (groups,)))
        else:
            groups = 1
            buf = torch.empty((m,), dtype=torch.float32, device=dev)
            outs.append(buf.view(lead + (1,)))
        s_out = buf
    else:
        groups = 1
    r_out = x2
    if norm.residual != "none":
        r_out = torch.empty((m, hidden), dtype=norm.input_dtype, device=dev)
        outs.append(r_out.view(x.shape))
    y_out = x2
    if spec.return_normalized:
        y_out = torch.empty((m, hidden), dtype=norm.out_dtype, device=dev)
        outs.append(y_out.view(x.shape))
    if m == 0:
        return tuple(outs)

    seq = int(cfg.get("SEQ", 0))
    masked = (hidden % cfg["CH"] != 0) or (cfg["ROWS"] > 1 and m % cfg["ROWS"] != 0) or (seq > 0 and m % seq != 0)
    persist = bool(cfg.get("PERSIST")) and cfg["ROWS"] == 1
    grid = (triton.cdiv(m, cfg["ROWS"]),)
    if persist and seq:  # PERSIST programs per SM over runs of SEQ rows
        grid = (min(triton.cdiv(m, seq), _num_sms(dev) * int(cfg["PERSIST"])),)
    elif persist:  # PERSIST = programs per SM
        grid = (min(m, _num_sms(dev) * int(cfg["PERSIST"])),)
    elif seq:
        grid = (triton.cdiv(m, seq),)
    kw = _spec_kwargs(spec, hidden, weight is not None, scale.dtype if scale is not None else None, _interpreting())
    compiled = _rms_norm_quant_kernel[grid](
        x2, w, r2, sin, q, s_out, r_out, y_out,
        m, xs, rs,
        CH=cfg["CH"], NCH=cfg["NCH"], CG=cfg["CG"], GS=cfg["GS"], ROWS=cfg["ROWS"], MASKED=masked, PERSIST=persist,
        WPRE=bool(cfg["WPRE"]), PIPE=cfg["PIPE"], SEQ=seq,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **kw,
    )
    if info is not None:
        info.update(cfg)
        info["n_regs"] = getattr(compiled, "n_regs", None)
        info["n_spills"] = getattr(compiled, "n_spills", None)
        info["shared"] = getattr(getattr(compiled, "metadata", None), "shared", None)
    return tuple(outs)

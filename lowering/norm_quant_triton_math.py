"""Exact-arithmetic Triton building blocks of the fused RMSNorm -> quant kernel.

Conversions that round like torch does (also under the interpreter, whose own f32->bf16
truncates and f32->fp8 mis-rounds: those are done in integer arithmetic when INTERP is
set), NaN-propagating max, and the per-chunk row
pieces (load, residual, normalise, scale, quantize, store) that
`norm_quant_triton._rms_norm_quant_kernel` unrolls over the chunks of a row.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

from .norm_quant_triton_division import DIV_ANY, DIV_FINITE, DIV_OK, _apply_scale, _div_exact, _finite_divisor

# ----------------------------------------------------------------- conversions
@triton.jit
def _bf16_bits_rne(x):
    """f32 -> the 16 bits of its RNE bf16 rounding, in a uint32 (NaN stays a quiet NaN)."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, (b >> 16) | 0x40, r)


@triton.jit
def _rnd(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """f32 value rounded to dtype DT (RNE) and back to f32."""
    if DT == 0:
        return x
    elif DT == 1:
        if INTERP:
            return (_bf16_bits_rne(x) << 16).to(tl.float32, bitcast=True)
        else:
            return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def _cvt_out(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """f32 -> dtype DT (RNE), as the tensor to store."""
    if DT == 0:
        return x
    elif DT == 1:
        if INTERP:
            return _bf16_bits_rne(x).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def _up(v, DT: tl.constexpr, INTERP: tl.constexpr):
    """A loaded bf16/f16/f32 tensor -> f32 (exact)."""
    if DT == 1 and INTERP:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)



# libdevice is not patched by the interpreter: under INTERP use tl.math / plain f32 tricks
@triton.jit
def _rint(x, INTERP: tl.constexpr):
    """Round half to even to an integer value (f32)."""
    if INTERP:
        big = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |x| < 2^22 to an integer (RNE)
        return tl.where(tl.abs(x) < 4194304.0, (x + big) - big, x)
    else:
        return libdevice.rint(x)


@triton.jit
def _log2(x, INTERP: tl.constexpr):
    if INTERP:
        return tl.math.log2(x)
    else:
        return libdevice.log2(x)


@triton.jit
def _exp2_int(n):
    """2^n in f32 for an integer-valued f32 n (or +-inf, NaN), built from its bits: exact,
    as the f64 exp2 of an integer rounded to f32 is (0 below 2^-149, inf above 2^127), and
    without the f64 library call, which costs as much as the rest of a group's math."""
    ni = tl.minimum(tl.maximum(n, -150.0), 128.0).to(tl.int32)  # a NaN n is put back below
    normal = ((ni + 127) << 23).to(tl.float32, bitcast=True)  # ni = 128 gives the inf pattern
    sub = (1 << tl.maximum(ni + 149, 0)).to(tl.float32, bitcast=True)
    r = tl.where(ni >= -126, normal, tl.where(ni >= -149, sub, 0.0))
    return tl.where(n != n, n, r)


# floor(2^(j-1) * ln 2), j = 0..7, one byte each: the largest mantissa m (of 2^23) for which
# log2(1 + m/2^23) stays below 2^(j-24), half an f32 ulp of an integer exponent of order 2^j
_UE8M0_M = tl.constexpr(0x2C160B0502010000)  # a jit global must be a constexpr


@triton.jit
def _floor_log2_int(x):
    """floor(log2 x) of positive integer-valued f32 x (< 2^24), from its exponent bits."""
    return (x.to(tl.int32, bitcast=True) >> 23) - 127


@triton.jit
def _ue8m0_f32(s):
    """2^ceil(RN_f32(log2 s)) for an f32 scale s >= 0 (or inf, NaN), in integer arithmetic.

    With s = 2^e (1 + m/2^23), log2 s = e + log2(1 + m/2^23). Its f32 rounding is e itself
    (ceil e) when m = 0 or when log2(1 + m/2^23) is under half the f32 spacing next to e
    (a power of two 2^(j-24) that depends on |e|: _UE8M0_M holds the largest such m per j),
    else it lies in (e, e + 1] (ceil e + 1). The spacings are far from every candidate m
    (margin >= 0.09 of an m step), so the f64 log2 rounded to f32 that this replaces gives
    the same result: checked for every positive finite f32 (docs/kernels.md)."""
    bits = s.to(tl.int32, bitcast=True)
    eb = bits >> 23
    m = bits & 0x7FFFFF
    # subnormal s = m 2^-149: normalise m to 1.f with p = floor(log2 m)
    p = _floor_log2_int(tl.maximum(m, 1).to(tl.float32))
    sub = eb == 0
    e = tl.where(sub, p - 149, eb - 127)
    mm = tl.where(sub, (m - (1 << p)) << (23 - p), m)
    ae = tl.abs(e)
    fl = _floor_log2_int(tl.maximum(ae, 1).to(tl.float32))
    pow2 = (ae & (ae - 1)) == 0
    j = tl.where(e > 0, fl, tl.where(pow2, fl - 1, fl))
    mmax = tl.where(j >= 0, (_UE8M0_M >> (8 * tl.maximum(j, 0)).to(tl.int64)) & 0xFF, 0)
    n = tl.where(mm.to(tl.int64) <= mmax, e, e + 1)
    r = _exp2_int(n.to(tl.float32))
    r = tl.where(s == 0.0, 0.0, r)
    return tl.where(s != s, s, tl.where(s == float("inf"), s, r))


# _UE8M0_M's bytes j = 0..3 and 4..7 as two 32-bit words (64-bit shifts take several instructions)
_UE8M0_LO = tl.constexpr(0x02010000)
_UE8M0_HI = tl.constexpr(0x2C160B05)
# scales at least this large are normal f32 after the rounding of a division (2^-124)
_NORMAL_SCALE_MIN = tl.constexpr(2.0 ** -124)


@triton.jit
def _ue8m0_f32_normal(s):
    """`_ue8m0_f32` of s >= 2^-126 (or +inf, NaN), which a scale floor guarantees: no subnormal
    input or result, no zero. It matters because a group's scale is computed by every thread
    that holds part of the group: on an H100 the T = 4096 group kernels, issue-bound at 16
    warps per SM, ran ~13% longer with the general form than without ue8m0 (group128 at
    H = 7168: 1472 SASS instructions with it, 1288 with this one, 1336 without ue8m0;
    docs/benchmarks.md, session 12)."""
    bits = s.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = bits & 0x7FFFFF
    ae = tl.abs(e)
    fl = _floor_log2_int(tl.maximum(ae, 1).to(tl.float32))
    j = tl.where(e > 0, fl, tl.where((ae & (ae - 1)) == 0, fl - 1, fl))
    word = tl.where(j < 4, _UE8M0_LO, _UE8M0_HI)
    mmax = tl.where(j >= 0, (word >> (8 * (j & 3))) & 0xFF, 0)
    n = tl.where(m > mmax, e + 1, e)
    # n in [-126, 128]: the normal pattern, and 128 gives the inf pattern (s = inf)
    return tl.where(s != s, s, ((n + 127) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _ceil(x, INTERP: tl.constexpr):
    if INTERP:
        return tl.math.ceil(x)
    else:
        return libdevice.ceil(x)


# f32 -> int8, four to a register: cvt.rni.sat rounds half to even and saturates to
# [-128, 127] (NaN -> 0), which is rint, the clamp to the int8 range and the conversion in
# one instruction (F2I.S8 on sm_90); prmt packs the four bytes
_S8X4_ASM = tl.constexpr("""{
    .reg .b32 r0, r1, r2, r3, lo, hi;
    cvt.rni.sat.s8.f32 r0, $1;
    cvt.rni.sat.s8.f32 r1, $2;
    cvt.rni.sat.s8.f32 r2, $3;
    cvt.rni.sat.s8.f32 r3, $4;
    prmt.b32 lo, r0, r1, 0x0040;
    prmt.b32 hi, r2, r3, 0x0040;
    prmt.b32 $0, lo, hi, 0x5410;
}""")


@triton.jit
def _to_s8_rni_sat(t):
    """f32 -> int8: round half to even, saturate to [-128, 127], NaN -> 0 (GPU only)."""
    return tl.inline_asm_elementwise(_S8X4_ASM, "=r,r,r,r,r", [t], dtype=tl.int8, is_pure=True, pack=4)


# rint by the magic-number sum, for |t| < 2^22: RN(t + 1.5 * 2^23) = 1.5 * 2^23 + rint(t) (the
# sum's unit in the last place is 1, ties to even), and as 1.5 * 2^23 = 0x4B400000 ends in a
# zero byte, the sum's low byte is rint(t) as an int8 when |rint(t)| <= 127. `add.rn` is never
# contracted with the multiply by the scale before it (a plain add was fused into an fma:
# one rounding instead of the spec's two)
_S8X4_INRANGE_ASM = tl.constexpr("""{
    .reg .b32 r0, r1, r2, r3, lo, hi;
    add.rn.f32 r0, $1, 0f4B400000;
    add.rn.f32 r1, $2, 0f4B400000;
    add.rn.f32 r2, $3, 0f4B400000;
    add.rn.f32 r3, $4, 0f4B400000;
    prmt.b32 lo, r0, r1, 0x0040;
    prmt.b32 hi, r2, r3, 0x0040;
    prmt.b32 $0, lo, hi, 0x5410;
}""")
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _to_s8_rint_inrange(t, INTERP: tl.constexpr):
    """f32 -> int8 for |t| < 127.5 (no NaN): round half to even, with two full-rate
    operations per element instead of the saturating conversion, which sm_90 issues at a
    quarter of the rate."""
    if INTERP:
        q = (t + _RINT_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)
    else:
        q = tl.inline_asm_elementwise(_S8X4_INRANGE_ASM, "=r,r,r,r,r", [t], dtype=tl.int8, is_pure=True, pack=4)
    return q


@triton.jit
def _to_fp8(t, INTERP: tl.constexpr):
    """f32 in [-448, 448] or NaN -> float8_e4m3fn, round to nearest even."""
    if INTERP:
        b = t.to(tl.uint32, bitcast=True)
        sign = (b >> 24) & 0x80
        a = tl.abs(t)
        ab = a.to(tl.uint32, bitcast=True)
        # subnormal range of e4m3 (|t| < 2^-6): multiples of 2^-9, RNE via rint (exact scaling)
        sub = _rint(a * 512.0, INTERP).to(tl.uint32)
        # normal range: keep 3 mantissa bits, RNE; the carry propagates into the exponent
        m = ab & 0x7FFFFF
        m3 = m >> 20
        rem = m & 0xFFFFF
        up = ((rem > 0x80000) | ((rem == 0x80000) & ((m3 & 1) == 1))).to(tl.uint32)
        e = (ab >> 23).to(tl.int32) - 127 + 7
        nrm = (e.to(tl.uint32) << 3) + m3 + up
        mag = tl.where(a < 0.015625, sub, nrm)
        mag = tl.where(t != t, 0x7F, mag)
        return (mag | sign).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return t.to(tl.float8e4nv)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _c32(v: tl.constexpr):
    return tl.full([1], v, tl.float32)


@triton.jit
def _c64(v: tl.constexpr):
    return tl.full([1], v, tl.float64)


# ------------------------------------------------------------------ row pieces
@triton.jit
def _offs(c, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr):
    g = tl.arange(0, CG)[None, :, None]
    j = tl.arange(0, GS)[None, None, :]
    return c * CH + g * GS + j  # [1, CG, GS] column index


@triton.jit
def _ld(ptr, roff, rmask, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr,
        MASKED: tl.constexpr):
    """Raw load of chunk c of the rows (no conversion: the raw chunk is what a prefetch keeps)."""
    col = _offs(c, CH, CG, GS)
    if MASKED:
        return tl.load(ptr + roff + col, mask=rmask & (col < H), other=0.0)
    else:
        return tl.load(ptr + roff + col)


@triton.jit
def _finish_h(xv, rv, ro_ptr, orow, rmask, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr,
              GS: tl.constexpr, XDT: tl.constexpr, RES: tl.constexpr, HS_DT: tl.constexpr,
              MASKED: tl.constexpr, INTERP: tl.constexpr):
    """h, the norm's input (after the residual add), as it is kept in registers until the row
    statistic is known: in the input dtype when that is exact (HS_DT != 0: half the
    registers of f32, so more rows in flight per SM), else f32. Stores the new residual."""
    if RES == 0:
        if HS_DT == 0:
            h = _up(xv, XDT, INTERP)
        else:
            h = xv
    else:
        x = _up(xv, XDT, INTERP)
        r = _up(rv, XDT, INTERP)
        if RES == 1:  # add in the input dtype: the sum is rounded, the norm reads the rounded sum
            h = _rnd(x + r, XDT, INTERP)
        else:  # f32 add: the norm reads the unrounded sum
            h = x + r
        hx = _cvt_out(h, XDT, INTERP)
        col = _offs(c, CH, CG, GS)
        if MASKED:
            tl.store(ro_ptr + orow + col, hx, mask=rmask & (col < H))
        else:
            tl.store(ro_ptr + orow + col, hx)
        if HS_DT != 0:
            h = hx
    return h


@triton.jit
def _ld_w(w_ptr, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, MASKED: tl.constexpr):
    """Raw chunk c of the weight ([1, CG, GS])."""
    col = _offs(c, CH, CG, GS)
    if MASKED:
        return tl.load(w_ptr + col, mask=col < H, other=0.0)
    else:
        return tl.load(w_ptr + col)


@triton.jit
def _normalize(h, rinv, rsq, w_ptr, wv, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr,
               INV: tl.constexpr, WST: tl.constexpr, WDT: tl.constexpr, CDT: tl.constexpr,
               ODT: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, WPRE: tl.constexpr,
               INTERP: tl.constexpr):
    """Returns (ya, yq): ya = f32(y) (y rounded to the output dtype: amax, scales and the
    returned normalised tensor use it); yq = the value quantized (ya, or in fast mode the
    f32 product without the intermediate roundings). With WPRE, `wv` is chunk c of the
    weight, loaded before the row's reduction; else the chunk is loaded here."""
    if INV == 2:
        hr = _div_exact(h, rinv, rsq)  # rinv holds sqrt(v) for div_sqrt
    else:
        hr = h * rinv
    if WST == 0:
        ya = _rnd(hr, ODT, INTERP)
        yq = hr
    else:
        if WPRE:
            w = _up(wv, WDT, INTERP)
        else:
            w = _up(_ld_w(w_ptr, c, H, CH, CG, GS, MASKED), WDT, INTERP)
        if WST == 1:
            n = _rnd(hr, CDT, INTERP)
            ya = _rnd(n * w, ODT, INTERP)
            if FAST:
                yq = hr * w
            else:
                yq = ya
        else:
            if WST == 3:
                w = 1.0 + w
            yq = hr * w
            ya = _rnd(yq, ODT, INTERP)
    if not FAST:
        yq = ya
    return ya, yq


@triton.jit
def _scale_from_amax(a, SMD: tl.constexpr, HAS_UB: tl.constexpr, UB: tl.constexpr, HAS_FLOOR: tl.constexpr,
                     FLOOR_AMAX: tl.constexpr, FLOOR: tl.constexpr, CONST_DIV: tl.constexpr,
                     SCONST: tl.constexpr, RCONST: tl.constexpr, UE8M0: tl.constexpr, INTERP: tl.constexpr):
    """amax (f32, any shape) -> the f32 scale, in the spec's scale-math dtype (SMD 0 f32, 1 bf16, 3 f64)."""
    if SMD == 3:
        a64 = a.to(tl.float64)
        if HAS_UB:
            a64 = tl.minimum(a64, _c64(UB), propagate_nan=tl.PropagateNan.ALL)
        if HAS_FLOOR and FLOOR_AMAX:
            a64 = tl.maximum(a64, _c64(FLOOR), propagate_nan=tl.PropagateNan.ALL)
        if CONST_DIV:  # eager `c / t` is `t.reciprocal() * c`: two roundings
            s64 = (1.0 / a64) * _c64(SCONST)
        else:
            s64 = a64 / _c64(SCONST)
        if HAS_FLOOR and not FLOOR_AMAX:
            s64 = tl.maximum(s64, _c64(FLOOR), propagate_nan=tl.PropagateNan.ALL)
        if UE8M0:  # ceil(log2) in f64; 2^n of an integer n rounded to f32 is _exp2_int's
            s = _exp2_int(_ceil(_log2(s64, INTERP), INTERP).to(tl.float32))
        else:
            s = s64.to(tl.float32)
    else:
        # f32 math; with bf16 math every op result is rounded to bf16 (torch computes bf16
        # ops in f32 and rounds each result)
        s = _rnd(a, SMD, INTERP)
        if HAS_UB:
            s = tl.minimum(s, _c32(UB), propagate_nan=tl.PropagateNan.ALL)
        if HAS_FLOOR and FLOOR_AMAX:
            s = tl.maximum(s, _c32(FLOOR), propagate_nan=tl.PropagateNan.ALL)
        if CONST_DIV:  # eager `c / t` is `t.reciprocal() * c`: two roundings
            s = _rnd(_rnd(tl.div_rn(_c32(1.0), s), SMD, INTERP) * _c32(SCONST), SMD, INTERP)
        else:
            s = _rnd(_div_exact(s, _c32(SCONST), _c32(RCONST)), SMD, INTERP)
        if HAS_FLOOR and not FLOOR_AMAX:
            s = tl.maximum(s, _c32(FLOOR), propagate_nan=tl.PropagateNan.ALL)
        if UE8M0 and SMD == 0:
            # 2^ceil(log2 s) with log2 rounded to f32, without the f64 log2 (as costly as
            # the rest of a group's math at T = 16384); the short form where the floor keeps
            # every scale normal
            if HAS_FLOOR and not CONST_DIV and FLOOR_AMAX and FLOOR >= _NORMAL_SCALE_MIN * SCONST:
                s = _ue8m0_f32_normal(s)
            elif HAS_FLOOR and not FLOOR_AMAX and FLOOR >= _NORMAL_SCALE_MIN:
                s = _ue8m0_f32_normal(s)
            else:
                s = _ue8m0_f32(s)
        elif UE8M0:
            # log2 rounded to f32 (computed in f64, rounded once), then to the math dtype;
            # ceil and exp2 of an integer are exact
            lg = _rnd(_log2(s.to(tl.float64), INTERP).to(tl.float32), SMD, INTERP)
            s = _exp2_int(_ceil(lg, INTERP))
    return s


_E4M3_MAX = tl.constexpr(448.0)
_INT8_LO = tl.constexpr(-128.0)
_INT8_HI = tl.constexpr(127.0)
# a row whose scaled amax is below this rounds into [-127, 127], inside the clamp of every int8
# spec `_int8_rows_in_range` takes
_INT8_INRANGE = tl.constexpr(127.5)


@triton.jit
def _int8_rows_in_range(am, s, rs, APPLY: tl.constexpr, CLO: tl.constexpr, CHI: tl.constexpr,
                        FAST: tl.constexpr, DIV: tl.constexpr):
    """True (a scalar) where every element of the program's rows quantizes to int8 without the
    clamp and none is NaN: the scaled row amax is below 127.5 and the clamp holds [-127, 127].
    Exact mode (the values quantized are those the amax was taken of): |t| <= t(amax), as
    `_apply_scale` is monotone and odd; a NaN or inf amax fails the test."""
    if CLO <= -127.0 and CHI >= 127.0 and not FAST:
        tmax = _apply_scale(am, s, rs, APPLY, False, FAST, DIV)
        ok = tl.min((tmax < _INT8_INRANGE).to(tl.int32), 0) == 1
    else:
        ok = False
    return ok


@triton.jit
def _quant_store(yq, s, rs, q_ptr, qrow, rmask, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr,
                 GS: tl.constexpr, APPLY: tl.constexpr, UE8M0: tl.constexpr, INT8: tl.constexpr,
                 CLO: tl.constexpr, CHI: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr,
                 INTERP: tl.constexpr, DIV: tl.constexpr = DIV_ANY, IN_RANGE: tl.constexpr = False):
    """Quantize chunk c (scale s, its reciprocal rs) and store it; DIV picks the exact division.
    IN_RANGE (int8): `_int8_rows_in_range` holds for the rows, so no clamp and no NaN."""
    t = _apply_scale(yq, s, rs, APPLY, UE8M0, FAST, DIV)
    if INT8 and IN_RANGE:
        qv = _to_s8_rint_inrange(t, INTERP)
    elif INT8 and not INTERP and CLO == _INT8_LO and CHI == _INT8_HI:
        # rint, the clamp to exactly the int8 range and the conversion are one saturating
        # conversion (NaN -> 0, as the conversion after a NaN-propagating clamp gives):
        # ~4 instructions per element fewer (SASS, sm_90)
        qv = _to_s8_rni_sat(t)
    else:
        if INT8:
            t = _rint(t, INTERP)
        # The GPU's f32 -> e4m3 conversion saturates (cvt.rn.satfinite: beyond +-448 -> +-448,
        # NaN -> NaN; the sm_90 compile test checks the PTX), so a clamp to exactly +-448 is
        # the conversion's own and is left to it: one instruction per element fewer
        if INT8 or INTERP or CLO != -_E4M3_MAX or CHI != _E4M3_MAX:
            t = tl.clamp(t, CLO, CHI, propagate_nan=tl.PropagateNan.ALL)
        if INT8:
            qv = t.to(tl.int8)
        else:
            qv = _to_fp8(t, INTERP)
    col = _offs(c, CH, CG, GS)
    if MASKED:
        tl.store(q_ptr + qrow + col, qv, mask=rmask & (col < H))
    else:
        tl.store(q_ptr + qrow + col, qv)


@triton.jit
def _store_y(ya, y_ptr, yrow, rmask, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr,
             ODT: tl.constexpr, MASKED: tl.constexpr, INTERP: tl.constexpr):
    col = _offs(c, CH, CG, GS)
    if MASKED:
        tl.store(y_ptr + yrow + col, _cvt_out(ya, ODT, INTERP), mask=rmask & (col < H))
    else:
        tl.store(y_ptr + yrow + col, _cvt_out(ya, ODT, INTERP))


# a predicated 32-bit global store, as an elementwise op of the value's own layout
_ST_F32_ASM = tl.constexpr("""{
    .reg .pred p;
    setp.ne.b32 p, $3, 0;
    @p st.global.b32 [$1], $2;
    mov.b32 $0, 0;
}""")


@triton.jit
def _store_scales(ptr, s, mask, INTERP: tl.constexpr):
    """tl.store(ptr, s, mask) of f32 scales (a reduction's result), on the GPU in s's own
    register layout.

    Triton's coalescing pass gives a tl.store of a small tensor a layout of its own, and the
    reduction result is converted to it through shared memory: a barrier pair per group
    chunk, one per per-token row (sm_90 TTGIR). As an elementwise inline-asm store, every
    lane holding a scale stores it; the lanes that hold copies of the same scale store the
    same value to the same address, which the warp's store instruction merges."""
    if INTERP:
        tl.store(ptr, s, mask=mask)
    else:
        tl.inline_asm_elementwise(_ST_F32_ASM, "=r,l,r,r", [ptr, s.to(tl.int32, bitcast=True), mask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _group_finish(ya, yq, c, rows, rmask, M, q_ptr, qrow, s_ptr, G: tl.constexpr, COLMAJ: tl.constexpr,
                  H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr,
                  SMD: tl.constexpr, HAS_UB: tl.constexpr, UB: tl.constexpr, HAS_FLOOR: tl.constexpr,
                  FLOOR_AMAX: tl.constexpr, FLOOR: tl.constexpr, CONST_DIV: tl.constexpr,
                  SCONST: tl.constexpr, RCONST: tl.constexpr, UE8M0: tl.constexpr, APPLY: tl.constexpr, CLO: tl.constexpr,
                  CHI: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, INTERP: tl.constexpr,
                  DIV: tl.constexpr = DIV_ANY, ST_HERE: tl.constexpr = True, KEEP: tl.constexpr = False):
    """Per-group quantization of one chunk: the groups of a chunk are all inside it. DIV: how
    `_quant_store` divides by the group scales (DIV_NONNEG where the spec keeps them >= 0).
    ST_HERE: the scales are stored by `_store_scales` (else by tl.store, which converts them to
    a layout of its own: the act-quant kernel's tiles measured 2-3% faster that way at
    T = 16384 on an H100, the norm-quant kernel's up to 5% slower; docs/kernels.md).
    KEEP (with ST_HERE): the scales are not stored but returned ([ROWS, CG]), for the caller
    to store a block of rows' scales at once (the SEQ program shape)."""
    a = tl.reduce(tl.abs(ya), 2, _max_nan)  # [ROWS, CG]
    if ST_HERE:
        # scales computed on [ROWS, CG]: a [ROWS, CG, 1] tile repeats each value in every
        # register of the thread's part of the group axis, and _store_scales would store each
        s = _scale_from_amax(a, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST, UE8M0,
                             INTERP)
        s3 = s[:, :, None]
    else:
        s3 = _scale_from_amax(a[:, :, None], SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST,
                              UE8M0, INTERP)
    rs3 = tl.div_rn(_c32(1.0), s3)
    if DIV == DIV_FINITE and APPLY == 0 and not FAST and not UE8M0:
        # two operations per element fewer than DIV_NONNEG; one select per group instead
        _quant_store(yq, _finite_divisor(s3), rs3, q_ptr, qrow, rmask, c, H, CH, CG, GS, APPLY, UE8M0, False, CLO,
                     CHI, FAST, MASKED, INTERP, DIV_OK)
    else:
        _quant_store(yq, s3, rs3, q_ptr, qrow, rmask, c, H, CH, CG, GS, APPLY, UE8M0, False, CLO, CHI, FAST, MASKED,
                     INTERP, DIV)
    if ST_HERE:
        if not KEEP:
            gidx = c * CG + tl.arange(0, CG)[None, :]  # [1, CG]
            r2 = rows[:, None].to(tl.int64)
            if COLMAJ:
                sp = s_ptr + gidx.to(tl.int64) * M + r2
            else:
                sp = s_ptr + r2 * G + gidx
            _store_scales(sp, s, (rows < M)[:, None] & (gidx < G), INTERP)
        kept = s
    else:
        gidx3 = c * CG + tl.arange(0, CG)[None, :, None]  # [1, CG, 1]
        r3 = rows[:, None, None].to(tl.int64)
        if COLMAJ:
            sp3 = s_ptr + gidx3.to(tl.int64) * M + r3
        else:
            sp3 = s_ptr + r3 * G + gidx3
        if MASKED:
            tl.store(sp3, s3, mask=rmask & (gidx3 < G))
        else:
            tl.store(sp3, s3)
        kept = s3
    return kept

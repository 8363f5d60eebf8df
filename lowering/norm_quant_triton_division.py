"""Exact division by a quantization scale, for the fused RMSNorm -> quant kernel
(lowering/norm_quant_triton.py) and the act-quant kernel: the general IEEE-exact form and
its shorter forms, where each one is exact, and which one a spec takes (`scale_division`).

The kernels quantize x / s correctly rounded (as eager torch divides). `div.rn` costs ~15
instructions and a branch; the forms here are a product by the reciprocal and one fma
correction, with fewer special cases where the spec or a run-time test rules them out
(docs/kernels.md, "Numerics").
"""

from __future__ import annotations

import math

import triton
import triton.language as tl


@triton.jit
def _div_exact(a, b, rb):
    """a / b correctly rounded, given rb = RN(1/b): q0 = RN(a*rb) is within an ulp, the fma
    residual a - b*q0 is exact, and one fma correction rounds to RN(a/b) (Markstein's
    theorem, the fast path of CUDA's div.rn). 3 ops instead of div.rn's ~15 with a branch.
    Where the residual is zero q0 is exact (and keeps the sign of a zero quotient, which the
    correction would lose); where it is not finite (b = 0 or inf, a = inf) q0 already is
    the IEEE quotient."""
    q0 = a * rb
    r = tl.fma(-q0, b, a)
    q1 = tl.fma(r, rb, q0)
    return tl.where((r == 0.0) | (q1 != q1), q0, q1)


# where _div_exact's correction needs no special case: divisors of normal size, quotients
# far from overflow (the bounds leave margin on both sides of Markstein's conditions)
_DIVOK_B_MIN = tl.constexpr(2.0 ** -125)
_DIVOK_B_MAX = tl.constexpr(2.0 ** 125)
_DIVOK_Q_MAX = tl.constexpr(2.0 ** 120)


@triton.jit
def _div_ok(amax, b, rb):
    """True where `_div_exact_ok(a, b, rb)` equals `_div_exact(a, b, rb)` for every |a| <= amax:
    b normal and not near the f32 range ends, amax / b finite and far from overflow (false
    for a NaN or inf amax, b or rb)."""
    return (b >= _DIVOK_B_MIN) & (b <= _DIVOK_B_MAX) & (amax * rb < _DIVOK_Q_MAX)


@triton.jit
def _neg(x):
    """-x with the sign of a zero flipped too. Triton's unary minus is `0 - x` in some
    versions (3.6: +0 for x = +-0); a product by -1 is exact and compiles to a negated
    operand of the instruction that uses it."""
    return x * -1.0


@triton.jit
def _div_exact_nonneg(a, b, rb):
    """`_div_exact` for a divisor that is not negative (+-0, +inf and NaN included), without
    the residual test. The residual is taken with the opposite sign, rn = q0*b - a = -r
    exactly (an fma rounds symmetrically), so q1 = fma(-rn, rb, q0) is the same value; where
    rn is zero, a = +-0 and the zero added to q0 is -0 (b >= 0), so q1 keeps the sign of a
    zero q0 without the residual test. Only the non-finite cases (q1 NaN) keep q0. Bitwise
    `_div_exact` for every such b (interpreter test); for b < 0 a +0 dividend would lose the
    quotient's sign, so callers use this form only where the divisor's sign is known."""
    q0 = a * rb
    rn = tl.fma(q0, b, _neg(a))
    q1 = tl.fma(_neg(rn), rb, q0)
    return tl.where(q1 != q1, q0, q1)


@triton.jit
def _div_exact_ok(a, b, rb):
    """`_div_exact_nonneg` without its NaN select, where q1 is NaN only with q0: divisors
    `_div_ok` accepted (positive, q1 then always finite; the per-token rows) and the group
    scales of DIV_FINITE specs (`_finite_group_division`). Three floating-point operations
    per element; the general form costs ~6 SASS instructions per element more (sm_90,
    triton 3.6; docs/kernels.md)."""
    q0 = a * rb
    rn = tl.fma(q0, b, _neg(a))
    return tl.fma(_neg(rn), rb, q0)


# how _quant_store divides by the scale (APPLY "div", exact mode): `_div_exact` (any divisor),
# `_div_exact_nonneg` (scales known not to be negative), `_div_exact_ok` (checked by `_div_ok`)
DIV_ANY = tl.constexpr(0)
DIV_NONNEG = tl.constexpr(1)
DIV_OK = tl.constexpr(2)
# per-group scales of a spec whose every finite scale `_div_exact_ok` divides by exactly
# (`_finite_group_division`): `_group_finish` divides with it, an infinite scale replaced by 0
DIV_FINITE = tl.constexpr(3)
# the smallest floor (on the scale, or on the amax over the scale constant) DIV_FINITE takes:
# two binades above the least normal f32, so RN(1/s) is finite and the scale bf16 rounding
# (scale math in bf16) keeps it normal
_FINITE_FLOOR_MIN = 2.0 ** -124
_FINITE_CONST_MAX = 2.0 ** 64


def _finite_group_division(quant) -> bool:
    """True where, for every group whose amax is finite, `_div_exact_ok` (three operations
    per element) is bitwise `_div_exact_nonneg` (five: it selects q0 where q1 is NaN).

    Those two differ only where q1 = fma(-rn, rb, q0) is NaN and q0 = RN(a * rb) is not. For a
    group with a finite amax, the floor keeps s >= 2^-124 (so rb = RN(1/s) is finite and
    positive) and, without an amax bound, s >= RN(amax / c) (c the scale constant, <= 2^64;
    one more rounding with bf16 scale math), so amax * rb <= c * (1 + 2^-7): q0 is finite for
    every |a| <= amax, and so are rn = fma(q0, s, -a) (about 0) and q1. The other groups:
    an amax of NaN makes s and rb NaN, so q0 is NaN in both; an amax of +inf makes s = +inf and
    rb = 0, where `_div_exact_nonneg` returns q0 = +-0 (a finite) or NaN (a = +-inf), and
    `_div_exact_ok` with the divisor 0 in place of s returns the same: rn = -a, q1 = a * 0 + q0
    (zeros of one sign). Exact mode only: a is the group's own value (|a| <= amax)."""
    if quant.kind != "fp8_per_group" or quant.apply != "div" or quant.ue8m0:
        return False
    if quant.scale_form != "amax_div" or quant.amax_ub is not None or quant.floor is None:
        return False
    c = quant.scale_const
    if not (0.0 < c <= _FINITE_CONST_MAX):
        return False
    least = quant.floor / c if quant.floor_on == "amax" else quant.floor
    return least >= _FINITE_FLOOR_MIN


@triton.jit
def _finite_divisor(s):
    """The divisor `_div_exact_ok` takes for a DIV_FINITE group scale s (its reciprocal
    stays RN(1/s)): s, or 0 where s is inf (`_finite_group_division` says why)."""
    return tl.where(s == float("inf"), 0.0, s)


def scale_division(quant) -> int:
    """How the kernel divides by a dynamic spec's scales (APPLY "div", exact mode): per-group
    scales `_finite_group_division` accepts with `_div_exact_ok` (DIV_FINITE), else with
    `_div_exact_nonneg` (DIV_NONNEG) where no scale can be negative, else `_div_exact`.

    A scale comes from an amax >= 0 (or NaN, inf); only a negative amax bound or scale
    constant can make it negative, and a floor >= 0 on the scale puts it back (NaN stays
    NaN, which either division handles). Static scales are tested at run time instead."""
    if not quant.dynamic:
        return int(DIV_ANY)
    nonneg = int(DIV_FINITE) if _finite_group_division(quant) else int(DIV_NONNEG)
    floor_ok = quant.floor is not None and quant.floor >= 0
    if floor_ok and quant.floor_on == "scale":
        return nonneg
    amax_ok = quant.amax_ub is None or quant.amax_ub >= 0 or (floor_ok and quant.floor_on == "amax")
    const_ok = math.copysign(1.0, quant.scale_const) > 0  # a / -0.0 is -inf
    return nonneg if amax_ok and const_ok else int(DIV_ANY)


@triton.jit
def _apply_scale(yq, s, rs, APPLY: tl.constexpr, UE8M0: tl.constexpr, FAST: tl.constexpr,
                 DIV: tl.constexpr = DIV_ANY):
    """yq scaled as the spec says (s the scale, rs its reciprocal); DIV picks the exact division.
    Each form rounds once (or is the correctly rounded quotient), so it is monotone and odd in yq."""
    if APPLY == 2:
        t = yq * s
    elif APPLY == 1 or FAST or UE8M0:
        # x / 2^k == x * 2^-k exactly, so ue8m0 scales may always multiply
        t = yq * rs
    elif DIV == DIV_OK:
        t = _div_exact_ok(yq, s, rs)
    elif DIV == DIV_NONNEG:
        t = _div_exact_nonneg(yq, s, rs)
    else:
        t = _div_exact(yq, s, rs)
    return t

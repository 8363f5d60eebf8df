"""The fused RMSNorm -> quant Triton kernels against the pure-torch reference.

CPU CI: the kernels run under the Triton interpreter (TRITON_INTERPRET=1) in a
subprocess (the flag must be set before the kernel module is imported, and other
tests in the same process may already have imported it). The GPU tests (the same matrix
on CUDA at real hidden sizes, random data, edge cases, dynamic token counts, CUDA graphs)
are in tests/test_norm_quant_triton_gpu.py; the matrix, inputs and comparison they share
in tests/norm_quant_kernel_helpers.py.

Bitwise comparisons use "grid" inputs: multiples of 1/8 small enough that every
partial sum of x*x is exact in f32, so the one step the contract leaves open (the
summation order of the mean) cannot change a bit. They also replace the reference's
`torch.rsqrt` by the correctly rounded rsqrt that the kernel computes: eager CPU
`torch.rsqrt` is MKL's vector rsqrt, which is not correctly rounded (it differs from
`1/sqrt` in f64 rounded to f32 on ~25% of random inputs, and depends on the CPU), so no
GPU kernel can reproduce it bit for bit. Everything after the rsqrt - every rounding,
the amax, the scales, saturation, NaN/inf - is compared bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# a global: the jit probe in the interpreter worker resolves it from this module's globals
from fusewright.lowering.norm_quant_triton_division import (_div_exact, _div_exact_nonneg, _div_exact_ok, _div_ok,
                                                             _finite_divisor)
from fusewright.lowering.norm_quant_triton_math import _c32, _exp2_int, _to_s8_rint_inrange, _ue8m0_f32, _ue8m0_f32_normal

from fusewright.lowering.norm_quant_spec import FP8, NormQuantSpec, NormSpec

from norm_quant_kernel_helpers import (  # tests/, on sys.path by tests/conftest.py
    _CORE, _EDGE_SCALE_SPECS, _NEGATIVE_SCALES, BF16, _check_scale_edges, _check_negative_scale, _q, grid_inputs,
    mismatches, reference_cr, spec_matrix,
)


# ------------------------------------------------------------ interpreter
_INTERP_SHAPES = ((5, 256), (3, 320), (9, 64), (2, 4, 128))


def _elementwise(kernel, ins, out_dtypes, piece=8192):
    """Runs an elementwise probe kernel(*ins, *outs, N, BLOCK) as one program per piece of
    `piece` lanes (the interpreter's cost grows with the block) and returns the outputs."""
    n = ins[0].numel()
    res = [torch.empty(n, dtype=dt) for dt in out_dtypes]
    for i in range(0, n, piece):
        sl = slice(i, i + piece)
        cin = [t[sl].contiguous() for t in ins]
        cout = [torch.empty(cin[0].numel(), dtype=dt) for dt in out_dtypes]
        kernel[(1,)](*cin, *cout, cin[0].numel(), BLOCK=piece)
        for r, c in zip(res, cout):
            r[sl] = c
    return res


def _interp_worker() -> dict:
    """Runs under TRITON_INTERPRET=1: the matrix on small shapes, and the raw-conversion probe."""
    import triton
    import triton.language as tl

    from fusewright.lowering.norm_quant_triton import launch

    failures = {}
    count = 0
    for name, spec in spec_matrix(full=False):
        for shape in _INTERP_SHAPES:
            if spec.quant.kind == "fp8_per_group" and shape[-1] % spec.quant.group_size:
                continue
            x, w, r, s = grid_inputs(spec, shape)
            errs = mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))
            count += 1
            if errs:
                failures[f"{name}@{shape}"] = errs

    # the persistent variants, few programs (each loops over several rows): the next row
    # prefetched into registers (PIPE 0) or the loop pipelined by the compiler (PIPE > 1; a
    # plain loop under the interpreter, so this checks the loop's row indexing and masks),
    # with the weight loaded per row and (WPRE) once per program before the loop
    for name, spec in spec_matrix(full=False):
        if name not in _CORE and name not in ("token-f32", "fast-token_div", "token-ret", "gemma-g128-ret"):
            continue
        for shape, wpre, pipe in (((9, 256), 0, 0), ((5, 320), 1, 0), ((7, 2, 64), 0, 0), ((9, 256), 1, 0),
                                  ((9, 384), 0, 3), ((7, 2, 64), 1, 2)):
            if spec.quant.kind == "fp8_per_group" and shape[-1] % spec.quant.group_size:
                continue
            x, w, r, s = grid_inputs(spec, shape)
            tuning = {"PERSIST": 1, "ROWS": 1, "WPRE": wpre, "PIPE": pipe}
            errs = mismatches(launch(spec, x, w, r, s, tuning=tuning), reference_cr(spec, x, w, r, s))
            count += 1
            if errs:
                failures[f"persist:wpre{wpre}:pipe{pipe}:{name}@{shape}"] = errs

    # SEQ programs: consecutive rows in turn, the next one prefetched; column-major group
    # scales kept and stored once per program. Token counts that leave the last program
    # short (9 rows in programs of 4) and that fill it (16 in 8); persistent, 4 programs
    # looping over runs, the last one short (37 rows in runs of 2, 21 in runs of 4)
    for name, spec in spec_matrix(full=False):
        if name not in _CORE and name not in ("g128_col-none", "g128_col-input_dtype", "g64_col_ue8m0-none",
                                              "token-ret", "gemma-g128-ret"):
            continue
        for shape, wpre, seq, persist in (((9, 256), 0, 4, 0), ((16, 384), 1, 8, 0), ((7, 2, 64), 0, 2, 0),
                                          ((5, 128), 1, 8, 0), ((37, 256), 1, 2, 1), ((21, 128), 0, 4, 1)):
            if spec.quant.kind == "fp8_per_group" and shape[-1] % spec.quant.group_size:
                continue
            x, w, r, s = grid_inputs(spec, shape)
            tuning = {"SEQ": seq, "ROWS": 1, "WPRE": wpre, "CH": 128, "PERSIST": persist}
            errs = mismatches(launch(spec, x, w, r, s, tuning=tuning), reference_cr(spec, x, w, r, s))
            count += 1
            if errs:
                failures[f"seq{seq}:persist{persist}:wpre{wpre}:{name}@{shape}"] = errs

    # inf, NaN and out-of-range rows: the kernels' exact division takes its general form for
    # them (its short form for the other rows of the same launch, _div_ok)
    for name, spec in spec_matrix(full=False):
        if name not in _CORE:
            continue
        x, w, r, s = grid_inputs(spec, (9, 256))
        x[3, 5] = float("inf")
        x[4, 100] = float("nan")
        x[5, 7] = float("-inf")
        x[6] = 16384.0
        errs = mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))
        count += 1
        if errs:
            failures[f"special:{name}"] = errs

    # scales that can be negative: the kernel divides with the general form there
    for name, spec in _NEGATIVE_SCALES.items():
        errs = _check_negative_scale(launch, spec, (9, 256), "cpu")
        count += 1
        if errs:
            failures[f"negative:{name}"] = errs

    # groups whose amax is inf beside finite groups (DIV_FINITE's substituted divisor); int8
    # rows past the clamp and with inf (the saturating conversion) beside in-range rows
    for name, spec in _EDGE_SCALE_SPECS.items():
        errs = _check_scale_edges(launch, spec, (9, 256), "cpu")
        count += 1
        if errs:
            failures[f"scale_edges:{name}"] = errs

    # the short exact division against the general one and against f64 division rounded to
    # f32 (correctly rounded: 53 >= 2 * 24 + 2 bits), on every pair _div_ok accepts
    @triton.jit
    def _div(a_ptr, b_ptr, ok_ptr, q_ptr, q_ref_ptr, q_nn_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        a = tl.load(a_ptr + o, mask=m, other=1.0)
        b = tl.load(b_ptr + o, mask=m, other=1.0)
        rb = tl.div_rn(_c32(1.0), b)
        tl.store(ok_ptr + o, _div_ok(tl.abs(a), b, rb).to(tl.int8), mask=m)
        tl.store(q_ptr + o, _div_exact_ok(a, b, rb), mask=m)
        tl.store(q_ref_ptr + o, _div_exact(a, b, rb), mask=m)
        tl.store(q_nn_ptr + o, _div_exact_nonneg(a, b, rb), mask=m)

    g = torch.Generator().manual_seed(1)
    n = 60000
    mag = torch.exp2(torch.randint(-140, 128, (n,), generator=g).float())
    a = (torch.rand(n, generator=g) + 0.5) * mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    b = torch.exp2(torch.randint(-130, 128, (n,), generator=g).float()) * (torch.rand(n, generator=g) + 0.5)
    # the quantization case: |a| <= amax, b = amax / 448 or a floor; zeros of both signs
    amax = torch.rand(n, generator=g) * 1000 + 1e-3
    aq = (torch.rand(n, generator=g) * 2 - 1) * amax
    aq[:2000] = 0.0
    aq[2000:4000] = -0.0
    edge = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3e38, 1.0])
    ea, eb = torch.meshgrid(edge, edge, indexing="ij")
    a = torch.cat([a, aq, ea.flatten()]).contiguous()
    b = torch.cat([b, amax / 448.0, eb.flatten()]).contiguous()
    ok, q, q_ref, q_nn = _elementwise(_div, [a, b], [torch.int8] + [torch.float32] * 3)
    okb = ok.bool()
    cr_div = (a.double() / b.double()).float()
    bits = lambda t: t.view(torch.int32)  # noqa: E731
    div = {"pairs": int(a.numel()), "ok": int(okb.sum()),
           "short_vs_general": int((bits(q) != bits(q_ref))[okb].sum()),
           # every divisor that is not negative: +-0, subnormal, inf and NaN included
           "nonneg_pairs": int((~(b < 0)).sum()),
           "nonneg_vs_general": int((bits(q_nn) != bits(q_ref))[~(b < 0)].sum()),
           # Markstein's theorem assumes no underflow: for dividends within 2^24 of the
           # subnormal range or subnormal quotients both forms may miss by an ulp (such
           # values quantize to zero, with the sign both keep)
           "short_vs_f64": int(((bits(q) != bits(cr_div)) & (a.abs() >= 2.0 ** -100)
                                & (cr_div.abs() >= 2.0 ** -126))[okb].sum()),
           # an inf or NaN dividend or divisor, a zero or subnormal divisor
           "ok_rejects_specials": bool(not okb[-edge.numel() ** 2:][~(ea.flatten().isfinite() & eb.flatten().isfinite()
                                                                       & (eb.flatten().abs() >= 2.0 ** -125))].any())}

    # DIV_FINITE: the 3-op division by a group scale (an inf scale replaced by 0) against
    # `_div_exact_nonneg`, for scales as a floored spec makes them: s = max(RN(amax / 448),
    # floor) (also one bf16-sized step lower, as bf16 scale math may round), |a| <= amax, amax
    # over every exponent; amax = inf (s = inf, any a) and NaN
    @triton.jit
    def _divf(a_ptr, s_ptr, f_ptr, n_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        a = tl.load(a_ptr + o, mask=m, other=1.0)
        sc = tl.load(s_ptr + o, mask=m, other=1.0)
        rs = tl.div_rn(_c32(1.0), sc)
        tl.store(f_ptr + o, _div_exact_ok(a, _finite_divisor(sc), rs), mask=m)
        tl.store(n_ptr + o, _div_exact_nonneg(a, sc, rs), mask=m)

    n = 40000
    amax = torch.exp2(torch.randint(-149, 128, (n,), generator=g).float()) * (1 + torch.rand(n, generator=g))
    amax = torch.where(amax.isfinite(), amax, torch.tensor(3.4e38))
    floor = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(1e-10), torch.tensor(2.0 ** -124))
    sf = torch.maximum(amax / 448.0, floor)
    sf = torch.where(torch.rand(n, generator=g) < 0.3, torch.maximum(sf * (1 - 2.0 ** -8), floor), sf)
    frac = torch.rand(n, generator=g) * 2 - 1
    frac[:500], frac[500:1000], frac[1000:1500], frac[1500:2000] = 1.0, -1.0, 0.0, -0.0
    af = frac * amax
    big = torch.tensor([0.0, -0.0, 1.0, -3.0, 1e-45, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")])
    a = torch.cat([af, big, torch.tensor([1.0, -2.0, float("nan")])]).contiguous()
    sc = torch.cat([sf, torch.full_like(big, float("inf")), torch.full((3,), float("nan"))]).contiguous()
    qf, qn = _elementwise(_divf, [a, sc], [torch.float32, torch.float32])
    bits = lambda t: t.view(torch.int32)  # noqa: E731
    div_finite = {"pairs": int(a.numel()), "mismatch": int((bits(qf) != bits(qn)).sum())}

    # the in-range int8 conversion (the interpreter's integer form; the GPU's asm is checked
    # on every f32 of its range by the GPU tests): ties, their neighbours, random values
    @triton.jit
    def _s8(x_ptr, o_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        tl.store(o_ptr + o, _to_s8_rint_inrange(tl.load(x_ptr + o, mask=m, other=0.0), True), mask=m)

    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5
    vals = torch.cat([ties, torch.nextafter(ties, torch.tensor(200.0)), torch.nextafter(ties, torch.tensor(-200.0)),
                      torch.arange(-127, 128, dtype=torch.float32), (torch.rand(20000, generator=g) * 2 - 1) * 127.49,
                      torch.tensor([0.0, -0.0, 1e-45, -1e-45, 127.49999, -127.49999])]).contiguous()
    got8, = _elementwise(_s8, [vals], [torch.int8])
    s8_inrange = {"n": int(vals.numel()), "mismatch": int((got8 != torch.round(vals).to(torch.int8)).sum())}

    # what the interpreter itself does with f32 -> bf16 / fp8 (why the kernel emulates them)
    @triton.jit
    def _raw(x_ptr, b_ptr, f_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        v = tl.load(x_ptr + o, mask=m)
        tl.store(b_ptr + o, v.to(tl.bfloat16), mask=m)
        tl.store(f_ptr + o, v.to(tl.float8e4nv), mask=m)

    fp8 = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    fp8 = fp8[fp8.isfinite()].sort().values
    mids = (fp8[1:] + fp8[:-1]) / 2  # exact ties between fp8 neighbours
    probe = torch.cat([mids, -mids, torch.tensor([1.0 + 2.0 ** -9, 1e-40, 3.0e-3])]).contiguous()
    n = probe.numel()
    ob = torch.empty(n, dtype=BF16)
    of = torch.empty(n, dtype=FP8)
    _raw[(1,)](probe, ob, of, n, BLOCK=triton.next_power_of_2(n))
    raw = {
        "fp8_mismatch": int((of.view(torch.uint8) != probe.to(FP8).view(torch.uint8)).sum()),
        "bf16_mismatch": int((ob.view(torch.int16) != probe.to(BF16).view(torch.int16)).sum()),
        "n": n,
    }
    # 2^n built from bits (the ue8m0 scale) against f64 exp2 rounded to f32, every n that matters
    @triton.jit
    def _pow2(n_ptr, o_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        tl.store(o_ptr + o, _exp2_int(tl.load(n_ptr + o, mask=m)), mask=m)

    ns = torch.cat([torch.arange(-300, 301, dtype=torch.float32),
                    torch.tensor([float("inf"), float("-inf"), float("nan")])])
    got = torch.empty_like(ns)
    _pow2[(1,)](ns, got, ns.numel(), BLOCK=triton.next_power_of_2(ns.numel()))
    want = torch.exp2(ns.double()).float()
    pow2_bad = int((~((got == want) | (got.isnan() & want.isnan()))).sum())
    # the integer ue8m0 rule against ceil(f32(log2(f64 s))): every exponent, the mantissas at
    # and around each threshold, subnormals, random bit patterns, 0 / inf / NaN
    @triton.jit
    def _ue8m0(s_ptr, o_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        tl.store(o_ptr + o, _ue8m0_f32(tl.load(s_ptr + o, mask=m)), mask=m)

    exps = torch.arange(1, 255, dtype=torch.int64)
    mants = torch.tensor([0, 1, 2, 3, 5, 6, 11, 12, 22, 23, 44, 45, 46, 2**22, 2**23 - 1])
    bits = ((exps[:, None] << 23) | mants[None, :]).flatten()
    g = torch.Generator().manual_seed(0)
    bits = torch.cat([bits, torch.randint(1, 2**23, (4000,), generator=g),  # subnormals
                      torch.randint(1, 0x7F800000, (20000,), generator=g),
                      torch.tensor([0, 0x7F800000, 0x7FC00000])])
    sv = bits.to(torch.int32).view(torch.float32).contiguous()

    got, = _elementwise(_ue8m0, [sv], [torch.float32])
    want = torch.exp2(torch.ceil(torch.log2(sv.double()).float()).double()).float()
    ue_bad = int((~((got == want) | (got.isnan() & want.isnan()))).sum())
    # its short form on the same values, where they are normal, inf or NaN (a floored scale)
    @triton.jit
    def _ue8m0_normal(s_ptr, o_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < N
        tl.store(o_ptr + o, _ue8m0_f32_normal(tl.load(s_ptr + o, mask=m)), mask=m)

    normal = bits >= 0x00800000
    sn, wn = sv[normal].contiguous(), want[normal]
    gn, = _elementwise(_ue8m0_normal, [sn], [torch.float32])
    ue_normal_bad = int((~((gn == wn) | (gn.isnan() & wn.isnan()))).sum())
    return {"cases": count, "failures": failures, "raw_conversion": raw, "exp2_int_mismatch": pow2_bad, "div": div,
            "div_finite": div_finite, "s8_inrange": s8_inrange,
            "ue8m0_mismatch": ue_bad, "ue8m0_cases": sv.numel(), "ue8m0_normal_mismatch": ue_normal_bad,
            "ue8m0_normal_cases": sn.numel()}


@pytest.fixture(scope="module")
def interp_result():
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        # Seen with triton 3.6 (the GPU machine, where the GPU tests cover the kernel):
        # its interpreter cannot index the persistent loop's `range(pid, M, nprog)`.
        pytest.skip(f"the interpreter of triton {triton.__version__} lacks tensor loop bounds; CI runs 3.9")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interp-worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_matrix_bitwise(interp_result):
    assert interp_result["cases"] > 150
    assert not interp_result["failures"], json.dumps(interp_result["failures"], indent=1)[:6000]


def test_interpreter_short_exact_division(interp_result):
    """Where `_div_ok` accepts the divisor and the quotient's bound, the 3-op division is
    bitwise the general one, and correctly rounded for normal quotients of dividends above
    2^-100; it rejects what the general form's special cases are for. For every divisor
    that is not negative, `_div_exact_nonneg` is bitwise the general form."""
    div = interp_result["div"]
    assert div["ok"] > 0.8 * 60000, div
    assert div["short_vs_general"] == 0 and div["short_vs_f64"] == 0, div
    assert div["nonneg_pairs"] > 2 * 60000 and div["nonneg_vs_general"] == 0, div
    assert div["ok_rejects_specials"], div


def test_interpreter_group_division_without_select(interp_result):
    """DIV_FINITE (`_finite_group_division`): for the scales a floored spec gives and every
    |a| <= amax, and for inf and NaN scales (the divisor 0 in place of inf), the 3-op
    division is bitwise `_div_exact_nonneg`."""
    d = interp_result["div_finite"]
    assert d["pairs"] > 40000 and d["mismatch"] == 0, d


def test_interpreter_int8_in_range_conversion(interp_result):
    """`_to_s8_rint_inrange` rounds half to even on ties, their neighbours and random values."""
    d = interp_result["s8_inrange"]
    assert d["n"] > 20000 and d["mismatch"] == 0, d


def test_interpreter_exp2_of_integers_is_exact(interp_result):
    assert interp_result["exp2_int_mismatch"] == 0


def test_interpreter_ue8m0_integer_rule_matches_f64_log2(interp_result):
    assert interp_result["ue8m0_cases"] > 25000
    assert interp_result["ue8m0_mismatch"] == 0
    # the short form for scales a floor keeps normal (checked for every normal f32 too,
    # docs/kernels.md)
    assert interp_result["ue8m0_normal_cases"] > 20000
    assert interp_result["ue8m0_normal_mismatch"] == 0


def test_interpreter_raw_conversions_are_not_rne(interp_result):
    """The reason for the INTERP emulation: the interpreter's own f32->fp8 rounds ties away
    from zero (and mis-carries), f32->bf16 truncates. If this starts failing, the
    interpreter was fixed and the emulation could go."""
    raw = interp_result["raw_conversion"]
    assert raw["fp8_mismatch"] > 0 and raw["bf16_mismatch"] > 0, raw


def test_scale_division_only_where_no_scale_can_be_negative():
    """`_div_exact_nonneg` (DIV_NONNEG) is chosen only for specs whose scales cannot be negative;
    its per-group short form (DIV_FINITE) only where a floor keeps them normal and no amax
    bound lets the quotients grow past the scale constant."""
    from fusewright.lowering.norm_quant_triton_division import DIV_ANY, DIV_FINITE, DIV_NONNEG, scale_division

    finite = [_q("g128"), _q("g64", col_major=True), _q("g128", floor=2.0 ** -124),
              _q("g128", floor=1e-8, floor_on="amax"), _q("g128", scale_math_dtype=torch.bfloat16),
              _q("g128", scale_math_dtype=torch.float64)]
    nonneg = [_q("token"), _q("token_div"), _q("int8_div"),
              _q("g128", ue8m0=True),  # ue8m0 scales multiply: no division to shorten
              _q("g128", floor=2.0 ** -126),  # RN(1/s) could be inf for a subnormal ...
              _q("g128", floor=1e-40, floor_on="amax"),  # ... or a floor / constant below 2^-124
              _q("g128", amax_ub=1200.0),  # quotients up to amax / (bound / 448)
              _q("g128", scale_const=2.0 ** 70),  # quotients near the constant, too close to overflow
              _q("g128", apply="mul_recip"),
              _q("token_div", scale_const=-448.0, floor=1e-10),  # the floor on the scale restores the sign
              _q("token_div", amax_ub=-1.0, floor=0.0, floor_on="amax"),  # ... or on the amax
              _q("token_div", amax_ub=1200.0)]
    anysign = [_q("static"),  # tested at run time
               _q("token_div", scale_const=-448.0), _q("token_div", scale_const=-0.0),
               _q("g128", scale_const=-448.0, floor=None), _q("token_div", amax_ub=-1.0),
               _q("token_div", scale_const=-448.0, floor=-1.0)]
    assert [scale_division(q) for q in finite] == [int(DIV_FINITE)] * len(finite)
    assert [scale_division(q) for q in nonneg] == [int(DIV_NONNEG)] * len(nonneg)
    assert [scale_division(q) for q in anysign] == [int(DIV_ANY)] * len(anysign)


def test_spec_errors_before_launch():
    from fusewright.lowering.norm_quant_spec import SpecError
    from fusewright.lowering.norm_quant_triton import launch

    spec = NormQuantSpec(NormSpec(eps=1e-6), _q("g128"))
    x = torch.zeros(2, 200, dtype=BF16)
    with pytest.raises(SpecError, match="not divisible"):
        launch(spec, x, torch.ones(200, dtype=BF16))
    with pytest.raises(SpecError, match="weight"):
        launch(NormQuantSpec(NormSpec(eps=1e-6), _q("token")), x, None)


def test_plan_has_no_padding_waste_at_common_sizes():
    from fusewright.lowering.norm_quant_triton import plan

    spec = NormQuantSpec(NormSpec(eps=1e-6), _q("token"))
    for h in (4096, 5120, 7168, 8192):
        p = plan(spec, h)  # the chunk width may come from the measured tuning table
        assert p["NCH"] <= 8 and p["CH"] * p["NCH"] == h, (h, p)
    p = plan(spec, 2880)  # not a multiple of 1024: the last chunk is masked, < 7% idle lanes
    assert p["CH"] * p["NCH"] < 2880 * 1.07, p


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(_interp_worker()))

"""The fused RMSNorm -> quant Triton kernels against the pure-torch reference.

CPU CI: the kernels run under the Triton interpreter (TRITON_INTERPRET=1) in a
subprocess (the flag must be set before the kernel module is imported, and other
tests in the same process may already have imported it). GPU (`gpu` marker): the same
matrix on CUDA at real hidden sizes, plus random data, edge cases, dynamic token counts
and CUDA graphs.

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

import contextlib
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

# a global: the jit probe in the interpreter worker resolves it from this module's globals
from fusewright.lowering.norm_quant_triton_math import (_c32, _div_exact, _div_exact_nonneg, _div_exact_ok, _div_ok,
                                                         _exp2_int, _ue8m0_f32)

from fusewright.lowering.norm_quant_reference import reference
from fusewright.lowering.norm_quant_spec import FP8, NormQuantSpec, NormSpec, QuantSpec

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


# ------------------------------------------------------------------ the matrix
def _q(kind: str, **kw) -> QuantSpec:
    if kind == "int8":
        base = dict(kind="int8_per_token", scale_form="const_div", scale_const=127.0, apply="mul",
                    clamp_lo=-128.0, clamp_hi=127.0, floor=1e-5, floor_on="amax", out_dtype=torch.int8)
    elif kind == "int8_div":  # vLLM reference int8: scale = amax / 127, divide
        base = dict(kind="int8_per_token", scale_const=127.0, apply="div", clamp_lo=-128.0, clamp_hi=127.0,
                    floor=1e-10, out_dtype=torch.int8)
    elif kind == "static":
        base = dict(kind="fp8_static", apply="div")
    elif kind == "token":
        base = dict(kind="fp8_per_token", floor=1.0 / (448.0 * 512.0), apply="mul_recip")
    elif kind == "token_div":  # torchao rowwise: amax / finfo.max, divide, no floor
        base = dict(kind="fp8_per_token", apply="div")
    else:
        base = dict(kind="fp8_per_group", group_size=int(kind[1:]), floor=1e-10, apply="div")
    base.update(kw)
    return QuantSpec(**base)


def spec_matrix(full: bool = False) -> list[tuple[str, NormQuantSpec]]:
    """(id, spec) pairs: every quant family x residual mode, the weight styles and dtypes
    on the common tails, the inv forms, fast numerics, f64/bf16 scale math."""
    out = []
    quants = {
        "static": _q("static"), "static_recip": _q("static", apply="mul_recip"),
        "token": _q("token"), "token_div": _q("token_div"),
        "g128": _q("g128"), "g64": _q("g64"), "g128_col": _q("g128", col_major=True),
        "g64_col_ue8m0": _q("g64", col_major=True, ue8m0=True), "g128_ue8m0": _q("g128", ue8m0=True),
        "int8": _q("int8"), "int8_div": _q("int8_div"),
    }
    for qn, q in quants.items():
        for res in ("none", "input_dtype", "f32"):
            if not full and res == "f32" and qn not in ("token", "g128", "static"):
                continue
            out.append((f"{qn}-{res}", NormQuantSpec(NormSpec(eps=1e-6, residual=res), q)))
    norms = {
        "before_cast": NormSpec(eps=1e-6, weight="before_cast"),
        "one_plus": NormSpec(eps=1e-6, weight="one_plus"),
        "none": NormSpec(eps=1e-5, weight="none", weight_dtype=None),
        "implicit_f32w": NormSpec(eps=1e-6, weight="before_cast", weight_dtype=F32, cast_dtype=F32, out_dtype=F32),
        "t5_f32w": NormSpec(eps=1e-6, weight="after_cast", weight_dtype=F32, out_dtype=F32),
        "f16": NormSpec(eps=1e-6, input_dtype=F16, cast_dtype=F16, out_dtype=F16, weight_dtype=F16),
        "f32in": NormSpec(eps=1e-6, input_dtype=F32, cast_dtype=F32, out_dtype=F32, weight_dtype=F32,
                          weight="before_cast"),
        "recip_sqrt": NormSpec(eps=1e-6, inv="recip_sqrt"),
        "div_sqrt": NormSpec(eps=1e-6, inv="div_sqrt", residual="input_dtype"),
    }
    for nn, n in norms.items():
        for qn in ("token", "g128") if full else ("token",):
            out.append((f"{nn}-{qn}", NormQuantSpec(n, quants[qn], return_normalized=True)))
    out.append(("gemma-g128-ret", NormQuantSpec(norms["one_plus"], quants["g128"], return_normalized=True)))
    # fast numerics
    for qn in ("token_div", "g128", "static", "int8"):
        out.append((f"fast-{qn}", NormQuantSpec(NormSpec(eps=1e-6), quants[qn], numerics="fast")))
    out.append(("fast-olmo-g64", NormQuantSpec(norms["before_cast"], quants["g64"], numerics="fast")))
    # scale math in f64 (torchao training) and bf16 (amax kept in bf16)
    out.append(("f64math-token", NormQuantSpec(NormSpec(eps=1e-6), _q("token", scale_math_dtype=torch.float64,
                                                                       floor=1e-12, floor_on="amax"))))
    out.append(("f64math-constdiv", NormQuantSpec(NormSpec(eps=1e-6), _q(
        "token", scale_math_dtype=torch.float64, scale_form="const_div", apply="mul", floor=1e-12,
        floor_on="amax"))))
    out.append(("bf16math-g128-ue8m0", NormQuantSpec(NormSpec(eps=1e-6), _q(
        "g128", scale_math_dtype=torch.bfloat16, ue8m0=True, floor=round(1e-10, 12)))))
    out.append(("token-ub", NormQuantSpec(NormSpec(eps=1e-6), _q("token", amax_ub=3.0))))
    out.append(("token-ret", NormQuantSpec(NormSpec(eps=1e-6, residual="input_dtype"), _q("token"),
                                          return_normalized=True)))
    return out


# ------------------------------------------------------------------- inputs
# specs whose scales can be negative (a negative static scale, a negative scale constant
# without a floor): the kernel must divide with the general form, which keeps the sign of a
# zero quotient (grid_inputs' row 0 is zeros; with negative weights some are -0)
_NEGATIVE_SCALES = {
    "static-neg_scale": NormQuantSpec(NormSpec(eps=1e-6), _q("static")),
    "token-neg_const": NormQuantSpec(NormSpec(eps=1e-6), _q("token_div", scale_const=-448.0)),
    "g128-neg_const": NormQuantSpec(NormSpec(eps=1e-6), _q("g128", scale_const=-448.0, floor=None)),
}


def _check_negative_scale(launch, spec, shape, device):
    x, w, r, s = grid_inputs(spec, shape, device=device)
    if s is not None:
        s = -s
    return mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))


def grid_inputs(spec: NormQuantSpec, shape, device="cpu", seed=0, special=True):
    """x (and residual) on a 1/8 grid with |h| <= 4, so sum(h*h) is exact in any order for
    H <= 8192 (< 2^24 units of 1/64). Row 0 all zeros, a row of huge values when `special`."""
    g = torch.Generator().manual_seed(seed)
    lim = 16 if spec.norm.residual != "none" else 32
    x = (torch.randint(-lim, lim + 1, shape, generator=g).float() / 8)
    r = (torch.randint(-lim, lim + 1, shape, generator=g).float() / 8) if spec.norm.residual != "none" else None
    H = shape[-1]
    w = None
    if spec.norm.weight != "none":
        w = (torch.randn(H, generator=g) * 2).to(spec.norm.weight_dtype)
    xf = x.reshape(-1, H)
    if special and xf.shape[0] >= 3:
        xf[0] = 0.0
        if r is not None:
            r.reshape(-1, H)[0] = 0.0
        # one row with a single large element: after the norm most values are tiny and one
        # is ~sqrt(H): beyond 448 for a static scale, stresses subnormal fp8 and scales
        xf[2] = 0.125
        xf[2, H // 3] = 4.0
    x = x.to(spec.norm.input_dtype)
    if r is not None:
        r = r.to(spec.norm.input_dtype)
    scale = torch.tensor(0.0125, dtype=F32) if spec.quant.kind == "fp8_static" else None
    return x.to(device), None if w is None else w.to(device), None if r is None else r.to(device), \
        None if scale is None else scale.to(device)


def _cr_rsqrt(v, *args, **kwargs):
    """Correctly rounded rsqrt (what the kernel computes)."""
    return (1.0 / torch.sqrt(v.double())).to(v.dtype)


@contextlib.contextmanager
def _reference_rsqrt_cr():
    with mock.patch.object(torch, "rsqrt", _cr_rsqrt):
        yield


def reference_cr(spec, x, w, r, s):
    """The reference on CPU, with its rsqrt correctly rounded (see the module docstring)."""
    cpu = lambda t: None if t is None else t.cpu()
    with _reference_rsqrt_cr():
        return reference(spec, cpu(x), cpu(w), cpu(r), cpu(s))


def mismatches(got, ref) -> list[str]:
    """Bitwise comparison output by output (NaN == NaN; int8 NaN results are excluded:
    the float->int conversion of NaN is undefined in C++)."""
    errs = []
    names = ["q", "scale", "residual", "normalized"]
    for i, (a, b) in enumerate(zip(got, ref)):
        a = a.cpu()
        # strides of size-1 dims carry no meaning (eager and the fake impl differ there)
        st_a = [st for st, n in zip(a.stride(), a.shape) if n > 1]
        st_b = [st for st, n in zip(b.stride(), b.shape) if n > 1]
        if a.shape != b.shape or a.dtype != b.dtype or st_a != st_b:
            errs.append(f"out{i}: {a.shape}/{a.dtype}/{a.stride()} vs {b.shape}/{b.dtype}/{b.stride()}")
            continue
        if a.dtype == torch.int8:
            bad = a != b
        else:
            af, bf = a.float(), b.float()
            bytes_a = a.reshape(-1).clone().view(torch.uint8).reshape(-1, a.element_size())
            bytes_b = b.reshape(-1).clone().view(torch.uint8).reshape(-1, b.element_size())
            same_bits = (bytes_a == bytes_b).all(-1).reshape(a.shape)
            bad = ~(same_bits | (af.isnan() & bf.isnan()))
        if bad.any():
            idx = bad.nonzero()[0].tolist()
            errs.append(f"out{i} ({names[i] if i < 4 else i}): {int(bad.sum())} of {a.numel()} differ, "
                        f"first at {idx}: {a[tuple(idx)].item()} vs {b[tuple(idx)].item()}")
    if len(got) != len(ref):
        errs.append(f"{len(got)} outputs vs {len(ref)}")
    return errs


# ------------------------------------------------------------ interpreter
_CORE = ("token-none", "g128-input_dtype", "static-f32", "int8-none", "g64_col_ue8m0-input_dtype")
_INTERP_SHAPES = ((5, 256), (3, 320), (9, 64), (2, 4, 128))


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
    # short (9 rows in programs of 4) and that fill it (16 in 8)
    for name, spec in spec_matrix(full=False):
        if name not in _CORE and name not in ("g128_col-none", "g128_col-input_dtype", "g64_col_ue8m0-none",
                                              "token-ret", "gemma-g128-ret"):
            continue
        for shape, wpre, seq in (((9, 256), 0, 4), ((16, 384), 1, 8), ((7, 2, 64), 0, 2), ((5, 128), 1, 8)):
            if spec.quant.kind == "fp8_per_group" and shape[-1] % spec.quant.group_size:
                continue
            x, w, r, s = grid_inputs(spec, shape)
            tuning = {"SEQ": seq, "ROWS": 1, "WPRE": wpre, "CH": 128}
            errs = mismatches(launch(spec, x, w, r, s, tuning=tuning), reference_cr(spec, x, w, r, s))
            count += 1
            if errs:
                failures[f"seq{seq}:wpre{wpre}:{name}@{shape}"] = errs

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
    ok = torch.empty(a.numel(), dtype=torch.int8)
    q, q_ref, q_nn = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    for i in range(0, a.numel(), 8192):
        sl = slice(i, i + 8192)
        ca, cb = a[sl].contiguous(), b[sl].contiguous()
        co, cq, cr, cn = (torch.empty(ca.numel(), dtype=torch.int8), torch.empty_like(ca), torch.empty_like(ca),
                          torch.empty_like(ca))
        _div[(1,)](ca, cb, co, cq, cr, cn, ca.numel(), BLOCK=8192)
        ok[sl], q[sl], q_ref[sl], q_nn[sl] = co, cq, cr, cn
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
    got = torch.empty_like(sv)
    for i in range(0, sv.numel(), 8192):
        chunk = sv[i:i + 8192].contiguous()
        out = torch.empty_like(chunk)
        _ue8m0[(1,)](chunk, out, chunk.numel(), BLOCK=8192)
        got[i:i + 8192] = out
    want = torch.exp2(torch.ceil(torch.log2(sv.double()).float()).double()).float()
    ue_bad = int((~((got == want) | (got.isnan() & want.isnan()))).sum())
    return {"cases": count, "failures": failures, "raw_conversion": raw, "exp2_int_mismatch": pow2_bad, "div": div,
            "ue8m0_mismatch": ue_bad, "ue8m0_cases": sv.numel()}


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


def test_interpreter_exp2_of_integers_is_exact(interp_result):
    assert interp_result["exp2_int_mismatch"] == 0


def test_interpreter_ue8m0_integer_rule_matches_f64_log2(interp_result):
    assert interp_result["ue8m0_cases"] > 25000
    assert interp_result["ue8m0_mismatch"] == 0


def test_interpreter_raw_conversions_are_not_rne(interp_result):
    """The reason for the INTERP emulation: the interpreter's own f32->fp8 rounds ties away
    from zero (and mis-carries), f32->bf16 truncates. If this starts failing, the
    interpreter was fixed and the emulation could go."""
    raw = interp_result["raw_conversion"]
    assert raw["fp8_mismatch"] > 0 and raw["bf16_mismatch"] > 0, raw


def test_scale_division_only_where_no_scale_can_be_negative():
    """`_div_exact_nonneg` (DIV_NONNEG) is chosen only for specs whose scales cannot be negative."""
    from fusewright.lowering.norm_quant_triton_math import DIV_ANY, DIV_NONNEG, scale_division

    nonneg = [_q("token"), _q("token_div"), _q("g128"), _q("int8_div"),
              _q("token_div", scale_const=-448.0, floor=1e-10),  # the floor on the scale restores the sign
              _q("token_div", amax_ub=-1.0, floor=0.0, floor_on="amax"),  # ... or on the amax
              _q("token_div", amax_ub=1200.0)]
    anysign = [_q("static"),  # tested at run time
               _q("token_div", scale_const=-448.0), _q("token_div", scale_const=-0.0),
               _q("g128", scale_const=-448.0, floor=None), _q("token_div", amax_ub=-1.0),
               _q("token_div", scale_const=-448.0, floor=-1.0)]
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


# ------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu
_GPU_SHAPES = ((1, 4096), (7, 7168), (333, 5120), (130, 2880), (67, 8192), (1000, 4096), (33, 128), (5, 3, 1536),
               (1500, 7168), (2100, 4096))  # the last two take the large-M plans (persistent ones included)


def _gpu_launch():
    from fusewright.lowering.norm_quant_triton import launch

    return launch


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in _CORE],
                         ids=[c[0] for c in spec_matrix() if c[0] in _CORE])
def test_gpu_shapes_bitwise(name, spec):
    """The core specs over every hidden size and token counts that are not multiples of anything."""
    _check_shapes(spec, _GPU_SHAPES)


def _check_shapes(spec, shapes):
    launch = _gpu_launch()
    fails = {}
    for shape in shapes:
        if spec.quant.kind == "fp8_per_group" and shape[-1] % spec.quant.group_size:
            continue
        x, w, r, s = grid_inputs(spec, shape, device="cuda")
        errs = mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))
        if errs:
            fails[str(shape)] = errs
    assert not fails, fails


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in (
    "token-none", "g128-input_dtype", "static-none", "int8-none", "g64_col_ue8m0-none")])
def test_gpu_special_values(name, spec):
    """inf and NaN inputs, values past the fp8 range: propagated / saturated as the reference."""
    launch = _gpu_launch()
    x, w, r, s = grid_inputs(spec, (9, 4096), device="cuda")
    x[3, 5] = float("inf")
    x[4, 100] = float("nan")
    x[5, 7] = float("-inf")
    x[6] = 16384.0  # large but a power of two: the row's sum of squares stays exact
    errs = mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))
    assert not errs, errs


@gpu
@pytest.mark.parametrize("name", sorted(_NEGATIVE_SCALES))
def test_gpu_negative_scales(name):
    """Negative scales take the general division (a run-time test for the static scale)."""
    errs = _check_negative_scale(_gpu_launch(), _NEGATIVE_SCALES[name], (67, 7168), "cuda")
    assert not errs, errs


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in ("token-none", "g128-none", "fast-token_div")])
def test_gpu_random_data_within_one_step(name, spec):
    """Random data (inexact sums) against the unpatched reference: the order of the mean's sum
    and eager's rsqrt may move a value by one quantization step, never more, rarely."""
    launch = _gpu_launch()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 7168, generator=g).to(BF16)
    w = torch.randn(7168, generator=g).to(BF16)
    got = launch(spec, x.cuda(), w.cuda())
    ref = reference(spec, x, w)
    qa, qb = got[0].cpu().float(), ref[0].float()
    sa, sb = got[1].cpu(), ref[1]
    # a one-ulp rstd difference can flip the bf16 rounding of a row's largest element
    assert (sa == sb).float().mean() > 0.99
    assert torch.allclose(sa, sb, rtol=2.0 ** -7, atol=0)
    step = (qb.abs() * 2.0 ** -3).clamp(min=2.0 ** -9)
    assert ((qa - qb).abs() <= step * 1.001).all()
    assert (qa != qb).float().mean() < 1e-3


@gpu
def test_gpu_cuda_graph_dynamic_tokens_one_launch():
    """No host sync and no data-dependent allocation: capture, replay with new data; one kernel."""
    launch = _gpu_launch()
    spec = NormQuantSpec(NormSpec(eps=1e-6, residual="input_dtype"), _q("g128"))
    for T in (1, 16, 257):
        x, w, r, s = grid_inputs(spec, (T, 7168), device="cuda")
        launch(spec, x, w, r)  # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = launch(spec, x, w, r)
        x2, _, r2, _ = grid_inputs(spec, (T, 7168), device="cuda", seed=5)
        x.copy_(x2)
        r.copy_(r2)
        g.replay()
        torch.cuda.synchronize()
        assert not mismatches(outs, reference_cr(spec, x, w, r, None))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        launch(spec, x, w, r)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


@gpu
def test_gpu_op_uses_the_kernel():
    from fusewright.lowering import norm_quant_ops

    spec = NormQuantSpec(NormSpec(eps=1e-6), _q("token"))
    assert norm_quant_ops._triton_launch() is not None
    x, w, r, s = grid_inputs(spec, (64, 4096), device="cuda")
    outs = norm_quant_ops.call(spec, x, w)
    assert not mismatches(outs, reference_cr(spec, x, w, r, s))


_PLANS = ({"PERSIST": 2, "WPRE": 1, "ROWS": 1, "CH": 1024, "num_warps": 4},
          {"PERSIST": 8, "WPRE": 1, "ROWS": 1, "CH": 512, "num_warps": 4},
          {"PERSIST": 4, "WPRE": 1, "ROWS": 1, "CH": 2048, "num_warps": 4},
          {"PERSIST": 0, "WPRE": 1, "ROWS": 1, "CH": 1024, "num_warps": 8},
          # software-pipelined persistent loops: rows in flight through shared memory
          {"PERSIST": 2, "PIPE": 3, "ROWS": 1, "CH": 1024, "num_warps": 4},
          {"PERSIST": 1, "PIPE": 4, "ROWS": 1, "CH": 2048, "num_warps": 8},
          {"PERSIST": 2, "PIPE": 2, "WPRE": 1, "ROWS": 1, "CH": 512, "num_warps": 4},
          # programs of SEQ consecutive rows (column-major group scales stored per program)
          {"SEQ": 8, "WPRE": 1, "ROWS": 1, "CH": 2048, "num_warps": 4},
          {"SEQ": 16, "ROWS": 1, "CH": 1024, "num_warps": 4})


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in _CORE], ids=[c[0] for c in spec_matrix() if c[0] in _CORE])
def test_gpu_prefill_sizes_and_plans_bitwise(name, spec):
    """The shipped plans at the benchmark's T = 4096 / 16384 shapes, and persistent plans that
    hold the weight in registers across rows (PERSIST with WPRE) or are software-pipelined
    (PIPE), programs of SEQ consecutive rows, tokens not a multiple of the programs."""
    launch = _gpu_launch()
    fails = {}
    for T, H in ((4096, 4096), (4099, 5120), (4096, 7168), (4096, 8192), (16384, 8192)):
        if spec.quant.kind == "fp8_per_group" and H % spec.quant.group_size:
            continue
        x, w, r, s = grid_inputs(spec, (T, H), device="cuda")
        ref = reference_cr(spec, x, w, r, s)
        for plan in (None,) + _PLANS:
            errs = mismatches(launch(spec, x, w, r, s, tuning=plan), ref)
            if errs:
                fails[f"{T}x{H} {plan}"] = errs
    assert not fails, fails


@gpu
@pytest.mark.parametrize("name,spec", spec_matrix(full=True), ids=[n for n, _ in spec_matrix(full=True)])
def test_gpu_matrix_bitwise(name, spec):
    """Every spec at H = 7168 (7 chunks) and 67 tokens; the core specs cover the other shapes."""
    _check_shapes(spec, ((67, 7168),))


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(_interp_worker()))

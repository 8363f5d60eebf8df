"""What the norm-quant kernel tests share: the spec matrix, grid inputs, the reference with a
correctly rounded rsqrt, and the bitwise comparison (tests/test_norm_quant_triton.py, the
interpreter and CPU tests; tests/test_norm_quant_triton_gpu.py, the GPU ones).
tests/conftest.py puts tests/ on sys.path for it (the interpreter worker, run as a script
from tests/, has it there already)."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from fusewright.lowering.norm_quant_reference import reference
from fusewright.lowering.norm_quant_spec import NormQuantSpec, NormSpec, QuantSpec

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# the specs every shape, plan and special case runs with
_CORE = ("token-none", "g128-input_dtype", "static-f32", "int8-none", "g64_col_ue8m0-input_dtype")


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
        # no floor: zero and subnormal scales, the general form of the ue8m0 rule
        "g128_ue8m0_nofloor": _q("g128", ue8m0=True, floor=None),
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


# the quantization's short forms next to their general ones (`_check_scale_edges`): groups
# whose amax is inf beside finite groups, which the per-group division without a select
# (DIV_FINITE) divides by 0 in place of the inf scale; int8 rows past the clamp (a scale
# constant above 127) or with inf and NaN, which take the saturating conversion, beside rows
# that take the in-range one
_EDGE_SCALE_SPECS = {
    "g128-inf_groups": NormQuantSpec(NormSpec(eps=1e-6), _q("g128")),
    "g64_col-inf_groups": NormQuantSpec(NormSpec(eps=1e-6, residual="input_dtype"), _q("g64", col_major=True)),
    "g128_amaxfloor-inf_groups": NormQuantSpec(NormSpec(eps=1e-6), _q("g128", floor=1e-8, floor_on="amax")),
    "int8_div-saturating": NormQuantSpec(NormSpec(eps=1e-6), _q("int8_div", scale_const=254.0)),
    "int8-special_rows": NormQuantSpec(NormSpec(eps=1e-6), _q("int8")),
}


def _check_scale_edges(launch, spec, shape, device):
    """Group specs: an inf, a -inf and a huge weight (y overflows to inf in its group, the
    row's other groups stay finite). int8 specs: an inf row and a NaN row among grid rows."""
    x, w, r, s = grid_inputs(spec, shape, device=device)
    if spec.quant.kind == "fp8_per_group":
        w[3] = float("inf")
        w[70] = float("-inf")
        w[200] = 3e38
    else:
        x[3, 5] = float("inf")
        x[4, 100] = float("nan")
    return mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))


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

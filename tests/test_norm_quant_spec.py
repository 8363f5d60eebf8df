"""NormQuantSpec, the pure-torch reference, the aten sequence and the fused op's fake/CPU impls."""

import itertools

import pytest
import torch

from fusewright.lowering import registry
from fusewright.lowering.norm_quant_aten import aten_sequence
from fusewright.lowering.norm_quant_ops import call, fake_outputs, rms_norm_quant
from fusewright.lowering.norm_quant_reference import reference
from fusewright.lowering.norm_quant_spec import (
    FP8,
    NormQuantSpec,
    NormSpec,
    QuantSpec,
    SpecError,
    f32_round,
)

BF16, F32 = torch.bfloat16, torch.float32

QUANTS = {
    "static_div": QuantSpec(kind="fp8_static", apply="div"),
    "token_recip": QuantSpec(floor=f32_round(1 / (448 * 512))),
    "token_bf16_math": QuantSpec(apply="div", scale_math_dtype=BF16),
    "token_ub": QuantSpec(amax_ub=1200.0, floor=f32_round(1 / (448 * 512))),
    "training_f64": QuantSpec(scale_form="const_div", apply="mul", scale_math_dtype=torch.float64, floor=1e-12, floor_on="amax"),
    "group128": QuantSpec(kind="fp8_per_group", group_size=128, apply="div", floor=1e-10, floor_on="amax"),
    "group64_col_ue8m0": QuantSpec(kind="fp8_per_group", group_size=64, col_major=True, ue8m0=True, apply="div", floor=1e-10, floor_on="amax"),
    "int8": QuantSpec(kind="int8_per_token", apply="div", scale_const=127.0, clamp_lo=-128.0, clamp_hi=127.0, out_dtype=torch.int8),
    "int8_bitnet": QuantSpec(kind="int8_per_token", scale_form="const_div", apply="mul", scale_const=127.0, clamp_lo=-128.0,
                             clamp_hi=127.0, floor=f32_round(1e-5), floor_on="amax", out_dtype=torch.int8),
}
NORMS = {
    "after_cast": NormSpec(eps=f32_round(1e-6)),
    "before_cast": NormSpec(eps=f32_round(1e-5), weight="before_cast"),
    "one_plus": NormSpec(eps=f32_round(1e-6), weight="one_plus", inv="recip_sqrt"),
    "implicit_f32w": NormSpec(eps=f32_round(1e-6), weight="before_cast", cast_dtype=F32, out_dtype=F32, weight_dtype=F32),
    "none_divsqrt": NormSpec(eps=f32_round(1e-6), weight="none", weight_dtype=None, inv="div_sqrt"),
}
RESIDUALS = ("none", "input_dtype", "f32")


def _inputs(spec, tokens=(3, 5), hidden=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*tokens, hidden, generator=g) * 3).to(spec.norm.input_dtype)
    w = None if spec.norm.weight == "none" else (1 + 0.3 * torch.randn(hidden, generator=g)).to(spec.norm.weight_dtype)
    r = None if spec.norm.residual == "none" else torch.randn(*tokens, hidden, generator=g).to(spec.norm.input_dtype)
    s = torch.tensor([0.05]) if spec.quant.kind == "fp8_static" else None
    return x, w, r, s


def _bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _specs():
    for (qn, q), (nn_, n), res, ret, num in itertools.product(QUANTS.items(), NORMS.items(), RESIDUALS, (False, True), ("exact", "fast")):
        if (ret or num == "fast") and res == "f32":
            continue  # keeps the grid small; the flags are independent of the residual mode
        yield f"{nn_}-{qn}-{res}-{'ret' if ret else 'q'}-{num}", NormQuantSpec(NormSpec(**{**n.__dict__, "residual": res}), q, ret, num)


SPECS = dict(_specs())


def test_spec_string_round_trip_and_hash():
    for spec in SPECS.values():
        text = spec.to_str()
        assert NormQuantSpec.from_str(text) == spec
        assert hash(NormQuantSpec.from_str(text)) == hash(spec)
    assert len({s.to_str() for s in SPECS.values()}) == len(SPECS)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: NormSpec(eps=1e-6, weight="sideways"), "weight style"),
        (lambda: NormSpec(eps=1e-6, weight="after_cast", out_dtype=F32), "promote"),
        (lambda: QuantSpec(kind="fp8_per_group"), "group_size"),
        (lambda: QuantSpec(kind="fp8_static", apply="mul"), "fp8_static"),
        (lambda: QuantSpec(scale_form="const_div", apply="div"), "multiplier"),
        (lambda: QuantSpec(kind="int8_per_token"), "int8"),
        (lambda: NormQuantSpec.from_str('{"norm": {"eps": 1e-6, "colour": 1}, "quant": {}}'), "unknown NormSpec fields"),
        (lambda: NormQuantSpec.from_str("not json"), "not a NormQuantSpec"),
    ],
)
def test_bad_specs_raise_clear_errors(bad, match):
    with pytest.raises(SpecError, match=match):
        bad()


def test_reference_checks_its_inputs():
    spec = SPECS["after_cast-group128-none-q-exact"]
    x, w, r, s = _inputs(spec, hidden=192)
    with pytest.raises(SpecError, match="not divisible by the group size 128"):
        reference(spec, x, w)
    x, w, r, s = _inputs(spec)
    with pytest.raises(SpecError, match="dtype"):
        reference(spec, x.float(), w)
    with pytest.raises(SpecError, match="residual"):
        reference(spec, x, w, residual=x)


@pytest.mark.parametrize("name", list(SPECS))
def test_aten_sequence_is_bitwise_the_reference(name):
    spec = SPECS[name]
    x, w, r, s = _inputs(spec)
    ref = reference(spec, x, w, r, s)
    seq = aten_sequence(spec, x, w, r, s)
    assert [t.shape for t in ref] == [t.shape for t in seq]
    for a, b, what in zip(seq, ref, spec.output_names()):
        assert a.dtype == b.dtype and a.stride() == b.stride(), what
        assert torch.equal(_bits(a), _bits(b)), what


def test_reference_output_layouts():
    spec = SPECS["after_cast-group64_col_ue8m0-input_dtype-ret-exact"]
    x, w, r, s = _inputs(spec, tokens=(6,))
    q, sc, res, y = reference(spec, x, w, r, s)
    assert spec.output_names() == ("q", "scale", "residual", "normalized")
    assert q.dtype == FP8 and q.shape == x.shape and q.is_contiguous()
    assert sc.shape == (6, 4) and sc.stride() == (1, 6)  # column-major, as DeepGEMM reads it
    assert torch.equal(sc, torch.exp2(torch.round(torch.log2(sc))))  # powers of two
    assert torch.equal(res, x + r) and y.dtype == BF16
    spec = SPECS["after_cast-token_recip-none-q-exact"]
    q, sc = reference(spec, *_inputs(spec))
    assert sc.shape == (3, 5, 1) and sc.dtype == F32


def test_fast_mode_within_one_step_and_same_scales():
    for name, spec in SPECS.items():
        if spec.numerics != "fast":
            continue
        exact = spec.replace(numerics="exact")
        x, w, r, s = _inputs(spec, tokens=(64,), seed=3)
        fast_out, exact_out = reference(spec, x, w, r, s), reference(exact, x, w, r, s)
        qf, qe = fast_out[0], exact_out[0]
        if qf.dtype == FP8:
            qf, qe = qf.float(), qe.float()
            # one fp8 step: compare on the value line via the next representable value
            step = (qe.abs() * 2**-3).clamp(min=2**-9)
            assert ((qf - qe).abs() <= step * 1.01).float().mean() >= 0.999, name
        else:
            assert ((qf.int() - qe.int()).abs() <= 1).all(), name
        if spec.quant.dynamic:
            assert torch.equal(fast_out[1], exact_out[1]), name


def test_op_fake_impl_and_opcheck():
    for name in ("after_cast-group64_col_ue8m0-input_dtype-ret-exact", "one_plus-static_div-input_dtype-q-exact",
                 "before_cast-int8_bitnet-f32-q-exact"):
        spec = SPECS[name]
        x, w, r, s = _inputs(spec, tokens=(7,))
        real = call(spec, x, w, r, s)
        fake = fake_outputs(spec, x)
        assert [(t.shape, t.dtype, t.stride()) for t in real] == [(t.shape, t.dtype, t.stride()) for t in fake]
        torch.library.opcheck(rms_norm_quant, (x, w, r, s, spec.to_str()))


def test_op_under_compile_with_dynamic_tokens():
    spec = SPECS["after_cast-group64_col_ue8m0-input_dtype-ret-exact"]
    text = spec.to_str()
    fn = torch.compile(lambda x, w, r: torch.ops.fusewright.rms_norm_quant(x, w, r, None, text), dynamic=True, fullgraph=True)
    for tokens in (5, 9):
        x, w, r, _ = _inputs(spec, tokens=(tokens,))
        got, want = fn(x, w, r), reference(spec, x, w, r)
        for a, b in zip(got, want):
            assert a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))


def test_registered_implementations():
    impls = registry.implementations("rms_norm_quant")
    assert {"aten", "triton"} <= set(impls)
    spec = SPECS["after_cast-token_recip-input_dtype-q-exact"]
    x, w, r, s = _inputs(spec)
    params = {"spec": spec.to_str(), "ndim": x.dim()}
    tensors = {"x": x, "weight": w, "residual": r, "scale": s}
    want = reference(spec, x, w, r, s)
    for name in ("aten", "triton"):
        got = impls[name].run(tensors, params)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want)), name
    bad = registry.OpCall.make("rms_norm_quant", {"x": torch.empty(2, 96, dtype=BF16)},
                               variant=SPECS["after_cast-group128-none-q-exact"].to_str())
    assert "not divisible" in impls["aten"].supports(bad)

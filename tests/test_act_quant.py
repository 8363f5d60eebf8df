"""The activation -> quantization fusion (`fuse_act_quant`) on CPU graphs: the spec, the
reference against the spellings it stands for, where the pass fires (counts, outputs),
where it must not, and its configuration.

On CPU the fused op is the eager reference, so with `lowering.act_quant=triton` the
rewritten graph is bitwise the eager function (the CPU reference follows eager's op
order and roundings). The Triton kernel's numerics are tested in
tests/test_act_quant_triton.py.
"""

import pytest
import torch
import torch.nn.functional as F

import fusewright
from fusewright.lowering import act_quant_ops
from fusewright.lowering.act_quant_choice import family, shipped_choice_for_call
from fusewright.lowering.act_quant_reference import reference
from fusewright.lowering.act_quant_spec import ActQuantSpec
from fusewright.lowering.norm_quant_spec import QuantSpec, SpecError
from fusewright.testing import compile_and_capture
from fusewright.tools.model_zoo import fp8_rowwise_quantize

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
TRITON = {"lowering": {"act_quant": "triton"}}
TOKEN = QuantSpec(kind="fp8_per_token", apply="div", floor=1e-12, floor_on="scale")


def deepseek_act_quant(x, block=128, col_major=False):
    """DeepSeek-V3's act_quant math in torch: f32 amax per block floored at 1e-4, /448, divide."""
    xs = x.float().unflatten(-1, (-1, block))
    amax = xs.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = amax / 448.0
    q = (xs / s).clamp(-448.0, 448.0).to(FP8).flatten(-2)
    s = s.reshape(x.shape[:-1] + (x.shape[-1] // block,))
    if col_major:  # the layout DeepGEMM reads
        s = s.t().contiguous().t()
    return q, s


def int8_rowwise(x):
    s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127.0
    return torch.round(x.float() / s).clamp(-128, 127).to(torch.int8), s


def bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(bits(a), bits(b))


def data(*shape, dtype=BF16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


# ------------------------------------------------------------------------ spec
def test_spec_round_trip_and_describe():
    spec = ActQuantSpec("silu_mul", BF16, TOKEN, act_dtype=BF16, h_dtype=BF16)
    assert ActQuantSpec.from_str(spec.to_str()) == spec
    assert spec.describe() == "silu_mul->fp8_per_token"
    assert family(spec) == "silu_mul_token"
    group = ActQuantSpec("identity", BF16, QuantSpec(kind="fp8_per_group", group_size=128, col_major=True,
                                                     apply="div"), h_dtype=BF16)
    assert family(group) == "identity_group128_col"
    assert group.scale_shape((4, 7, 256)) == (4, 7, 2)


@pytest.mark.parametrize("bad, message", [
    ('{"prologue": "gelu_mul", "input_dtype": "bfloat16"}', "prologue 'gelu_mul'"),
    ('{"prologue": "identity", "input_dtype": "int4"}', "unknown dtype"),
    ('{"prologue": "identity", "input_dtype": "bfloat16", "colour": 1}', "unknown ActQuantSpec fields"),
    ('{"prologue": "identity", "input_dtype": "bfloat16", "h_dtype": "bfloat16", "quant": {"kind": "fp8_static", '
     '"apply": "div"}}', "dynamic quantization only"),
    ('{"prologue": "identity", "input_dtype": "bfloat16", "h_dtype": "float32"}', "h_dtype must equal"),
    ("not json", "not an ActQuantSpec string"),
])
def test_spec_errors(bad, message):
    with pytest.raises(SpecError, match=message):
        ActQuantSpec.from_str(bad)


def test_reference_input_errors():
    spec = ActQuantSpec("silu_mul", BF16, TOKEN, act_dtype=BF16, h_dtype=BF16)
    g = data(4, 64)
    with pytest.raises(SpecError, match="needs `up`"):
        reference(spec, g)
    with pytest.raises(SpecError, match="up must match x"):
        reference(spec, g, data(4, 32))
    with pytest.raises(SpecError, match="expects torch.bfloat16"):
        reference(spec, g.float(), g.float())
    group = ActQuantSpec("identity", BF16, QuantSpec(kind="fp8_per_group", group_size=128, apply="div"), h_dtype=BF16)
    with pytest.raises(SpecError, match="not divisible by the group size 128"):
        reference(group, data(4, 192))


# ------------------------------------------------------------ reference = spellings
def test_reference_is_the_torchao_rowwise_spelling():
    g, u = data(16, 320), data(16, 320, seed=1)
    g[3] = 0
    u[3] = 0  # an all-zero row: the scale floor
    spec = ActQuantSpec("silu_mul", BF16, TOKEN, act_dtype=BF16, h_dtype=BF16)
    assert_same(reference(spec, g, u), fp8_rowwise_quantize(F.silu(g) * u))
    ident = ActQuantSpec("identity", BF16, TOKEN, h_dtype=BF16)
    assert_same(reference(ident, g), fp8_rowwise_quantize(g))


# ---------------------------------------------------------------- the pass fires
def llama_mlp_quant(g, u):
    return fp8_rowwise_quantize(F.silu(g) * u)


def merged_gate_up(gu):
    g, u = gu.chunk(2, dim=-1)
    return fp8_rowwise_quantize(F.silu(g) * u)


def f32_spelling(g, u):
    return fp8_rowwise_quantize(F.silu(g.float()) * u.float())


def deepseek_mlp(g, u):
    return deepseek_act_quant(F.silu(g) * u)


def deepseek_mlp_col(g, u):
    return deepseek_act_quant(F.silu(g) * u, col_major=True)


def int8_mlp(g, u):
    return int8_rowwise(F.silu(g) * u)


def after_matmul(x, w):
    return fp8_rowwise_quantize(x @ w)


def three_d(g, u):
    return fp8_rowwise_quantize(F.silu(g) * u)


CASES = {
    # name: (fn, inputs, details of the rewrite)
    "llama_token": (llama_mlp_quant, (data(8, 256), data(8, 256, seed=1)), "silu_mul->fp8_per_token"),
    "merged_gate_up": (merged_gate_up, (data(8, 512),), "silu_mul->fp8_per_token"),
    "f32_spelling": (f32_spelling, (data(8, 256), data(8, 256, seed=1)), "silu_mul->fp8_per_token"),
    "deepseek_group128": (deepseek_mlp, (data(8, 256), data(8, 256, seed=1)), "silu_mul->fp8_per_group128"),
    "deepseek_group128_col": (deepseek_mlp_col, (data(8, 256), data(8, 256, seed=1)),
                              "silu_mul->fp8_per_group128_col"),
    "int8_token": (int8_mlp, (data(8, 256), data(8, 256, seed=1)), "silu_mul->int8_per_token"),
    "identity_after_matmul": (after_matmul, (data(8, 64), data(64, 256, seed=1)), "identity->fp8_per_token"),
    "three_d": (three_d, (data(2, 5, 256), data(2, 5, 256, seed=1)), "silu_mul->fp8_per_token"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pass_fires_and_is_bitwise_eager(name):
    fn, inputs, detail = CASES[name]
    run = compile_and_capture(fn, inputs, TRITON)
    stats = run.report["fuse_act_quant"]
    assert (stats.matched, stats.rewritten, stats.skipped) == (1, 1, []), stats
    assert list(stats.details) == [f"{detail} -> triton (priority triton)"]
    graph = run.graphs_after[-1]
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fusewright.act_quant.default) == 1
    # nothing of the activation or the quantization is left for Inductor
    for op in (torch.ops.aten.amax.default, torch.ops.aten.exp.default, torch.ops.aten.abs.default):
        assert op not in targets, graph
    # the CPU op is the reference, which follows eager's roundings: bitwise
    with torch.no_grad():
        assert_same(run.outputs, fn(*inputs))


def test_one_op_serves_two_identical_tails():
    def fn(g, u):
        h = F.silu(g) * u
        q1, s1 = fp8_rowwise_quantize(h)
        q2, s2 = fp8_rowwise_quantize(h)
        return q1, s1, q2, s2

    inputs = (data(8, 256), data(8, 256, seed=1))
    run = compile_and_capture(fn, inputs, TRITON)
    stats = run.report["fuse_act_quant"]
    assert stats.rewritten == 1, stats
    assert [n.target for n in run.graphs_after[-1].nodes].count(torch.ops.fusewright.act_quant.default) == 1
    assert_same(run.outputs, fn(*inputs))


def test_default_on_cpu_keeps_the_graph_and_says_why():
    run = compile_and_capture(llama_mlp_quant, CASES["llama_token"][1])
    stats = run.report["fuse_act_quant"]
    assert (stats.matched, stats.rewritten) == (1, 0)
    assert "kept as Inductor compiles it (lowering none: auto: rule for cpu" in stats.skipped[0].reason
    assert torch.ops.fusewright.act_quant.default not in [n.target for n in run.graphs_after[-1].nodes]


def test_disabled_by_its_flag():
    run = compile_and_capture(llama_mlp_quant, CASES["llama_token"][1], {**TRITON, "fuse_act_quant": False})
    assert "fuse_act_quant" not in run.report or run.report["fuse_act_quant"].matched == 0


# ------------------------------------------------------------ look-alikes decline
def gelu_quant(x):
    return fp8_rowwise_quantize(F.gelu(x))


def silu_read_elsewhere(g, u):
    a = F.silu(g)
    q, s = fp8_rowwise_quantize(a * u)
    return q, s, a


def activation_read_elsewhere(g, u):
    h = F.silu(g) * u
    q, s = fp8_rowwise_quantize(h)
    return q, s, h.sum()


def broadcast_up(g, u):
    return fp8_rowwise_quantize(F.silu(g) * u)


def transposed(x, w):
    return fp8_rowwise_quantize((x @ w).t())


def norm_output(x, w):
    return fp8_rowwise_quantize(F.rms_norm(x, (x.shape[-1],), w, 1e-6))


DECLINES = {
    "gelu": (gelu_quant, (data(8, 256),), "which Inductor fuses with the quantization"),
    "silu_read_elsewhere": (silu_read_elsewhere, (data(8, 256), data(8, 256, seed=1)), "is also read by"),
    "activation_read_elsewhere": (activation_read_elsewhere, (data(8, 256), data(8, 256, seed=1)),
                                  "fusing would compute it twice"),
    "broadcast_up": (broadcast_up, (data(8, 256), data(1, 256, seed=1)), "another shape (broadcast)"),
    "transposed": (transposed, (data(64, 8), data(8, 256, seed=1)), "not contiguous in memory"),
}


@pytest.mark.parametrize("name", list(DECLINES))
def test_look_alikes_decline_with_a_reason(name):
    fn, inputs, reason = DECLINES[name]
    run = compile_and_capture(fn, inputs, TRITON)
    stats = run.report["fuse_act_quant"]
    assert stats.rewritten == 0, stats
    assert any(reason in s.reason for s in stats.skipped), stats.skipped
    assert torch.ops.fusewright.act_quant.default not in [n.target for n in run.graphs_after[-1].nodes]


@pytest.mark.parametrize("norm_quant", ["triton", "aten", "off"])
def test_norm_output_belongs_to_the_norm_quant_pass(norm_quant):
    inputs = (data(8, 256), data(256, seed=1))
    cfg = {"lowering": {"act_quant": "triton", "rms_norm_quant": norm_quant if norm_quant != "off" else "auto"},
           "fuse_norm_quant": norm_quant != "off"}
    run = compile_and_capture(norm_output, inputs, cfg)
    stats = run.report["fuse_act_quant"]
    assert stats.rewritten == 0
    if norm_quant == "triton":
        assert run.report["fuse_norm_quant"].rewritten == 1
        assert stats.matched == 0  # the amax is gone before this pass runs
    else:
        # the norm (the model's, or the norm-quant pass's aten sequence) is a fusible producer
        assert "which Inductor fuses with the quantization" in stats.skipped[0].reason


def test_amax_without_abs_or_static_scale_is_not_a_match():
    def fn(x, s):
        m = x.amax(-1, keepdim=True)  # a max, not a quantization's amax
        q = (x.float() / s).clamp(-448, 448).to(FP8)  # static scale: nothing to fuse
        return m, q

    run = compile_and_capture(fn, (data(8, 256), torch.tensor(0.5)), TRITON)
    assert run.report["fuse_act_quant"].matched == 0


# ------------------------------------------------------------------ lowering choice
def test_config_accepts_the_act_quant_lowering_key():
    cfg = fusewright.PassConfig.from_dict({"lowering": {"act_quant": "triton"}})
    assert cfg.lowering.priority("act_quant") == ("triton",)
    with pytest.raises(fusewright.ConfigError, match="accepted"):
        fusewright.PassConfig.from_dict({"lowering": {"act_quant": "cuda"}})


def test_shipped_table_answers_from_the_nearest_row():
    spec = ActQuantSpec("silu_mul", BF16, TOKEN, act_dtype=BF16, h_dtype=BF16)
    table = {"measured": {"GPU X": [
        {"family": "silu_mul_token", "T": 4096, "H": 14336, "us": {"triton": 100.0, "none": 160.0}},
        {"family": "silu_mul_token", "T": 16, "H": 14336, "us": {"triton": 5.0, "none": 5.05}},
    ]}, "rules": {"cuda": {"pick": "triton", "why": "measured"}}}
    fake = torch.empty(4096, 14336, dtype=BF16, device="meta")
    call = act_quant_ops.op_call(spec, fake, fake)
    pick, why = shipped_choice_for_call(call, "GPU X", ("triton", "none"), table=table)
    assert pick == "triton" and "T=4096" in why
    small = act_quant_ops.op_call(spec, fake[:16], fake[:16])
    # within 3%: the rule order for the device type decides (a meta tensor: the default rule, none first)
    assert shipped_choice_for_call(small, "GPU X", ("triton", "none"), table=table)[0] == "none"
    # another device: the rule for the device type, if the table has one
    assert shipped_choice_for_call(call, "GPU Y", ("triton", "none"), table=table) is None
    # a user's implementation among the candidates: no answer, auto measures
    assert shipped_choice_for_call(call, "GPU X", ("triton", "mine"), table=table) is None


def test_aten_lowering_means_the_models_own_nodes():
    run = compile_and_capture(llama_mlp_quant, CASES["llama_token"][1], {"lowering": {"default": "aten"}})
    stats = run.report["fuse_act_quant"]
    assert stats.rewritten == 0 and "kept as Inductor compiles it (lowering none" in stats.skipped[0].reason
    none = fusewright.PassConfig.from_dict({"lowering": {"act_quant": "none"}})
    assert none.lowering.priority("act_quant") == ("none",)

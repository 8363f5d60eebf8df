"""De-opaquing: stand-in custom ops with vLLM's RMSNorm schemas, replaced by the aten lowering.

Tolerances: the de-opaqued graph is compared bitwise with stock Inductor compiling the
same math spelled in Python (both are the same aten graph), and with the opaque op run
eagerly to within two bf16 ulps (rtol 2**-6): Inductor's compiled reduction and rsqrt
may differ from eager's in the last f32 bit, which can flip the rounding of the
normalised value to bf16, and the weight multiply rounds once more.
"""

import pytest
import torch
from torch._inductor import config as inductor_config

import fusewright
from fusewright import FusewrightPassManager, PassConfig
from fusewright.lowering import registry
from fusewright.passes import deopaque
from fusewright.passes.graph_utils import snapshot
from fusewright.passes.registry import BUILTIN_PASS_MODULES
from fusewright.testing import compile_and_capture, count_targets

pytestmark = pytest.mark.usefixtures("no_env_config")
aten = torch.ops.aten
AF = torch.ops.higher_order.auto_functionalized
AF2 = torch.ops.higher_order.auto_functionalized_v2
EPS = 1e-6
BF16_TOL = dict(rtol=2**-6, atol=1e-5)


def _norm(x, weight, eps):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


# ---------------------------------------------------------------- stand-in opaque ops
@torch.library.custom_op("fwtest9::rms_norm", mutates_args=("result",))
def opaque_rms_norm(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    result.copy_(_norm(input, weight, epsilon))


@torch.library.custom_op("fwtest9::fused_add_rms_norm", mutates_args=("input", "residual"))
def opaque_fused_add(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    total = input + residual
    residual.copy_(total)
    input.copy_(_norm(total, weight, epsilon))


@torch.library.custom_op("fwtest9::rms_norm_fn", mutates_args=())
def opaque_rms_norm_fn(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, weight, eps)


@opaque_rms_norm_fn.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


# Look-alikes: a layer norm with a bias (five arguments), and an op returning its output.
@torch.library.custom_op("fwtest9::layer_norm", mutates_args=("out",))
def opaque_layer_norm(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> None:
    out.copy_(torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps))


CONFIG = {"deopaque": {"fwtest9::rms_norm": "rms_norm", "fwtest9::fused_add_rms_norm": "fused_add_rms_norm",
                       "fwtest9::rms_norm_fn": "rms_norm"},
          "fuse_norm_quant": False, "eliminate_noop_casts": False, "rewrite_rope": False}


def inputs(t=16, h=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, generator=g).to(dtype), torch.randn(t, h, generator=g).to(dtype),
            (1 + 0.1 * torch.randn(h, generator=g)).to(dtype))


# ---------------------------------------------------------------- models
def out_form(x, w):
    out = torch.empty_like(x)
    torch.ops.fwtest9.rms_norm(out, x * 2, w, EPS)
    return out.float() * 2  # exact: compared outputs differ only where the norm's do


def out_form_native(x, w):
    return _norm(x * 2, w, EPS).float() * 2


def fused_form(x, r, w):
    # r is a graph input mutated in place: the write must survive the rewrite. (A graph
    # whose two inputs are both mutated trips an Inductor CPU codegen bug in torch 2.13,
    # KeyError 'buf7', with or without fusewright, hence the intermediate x.)
    x = x * 2
    torch.ops.fwtest9.fused_add_rms_norm(x, r, w, EPS)
    return x * 1


def fused_form_native(x, r, w):
    x = x * 2
    total = x + r
    r.copy_(total)
    x.copy_(_norm(total, w, EPS))
    return x * 1


def functional_form(x, w):
    return torch.ops.fwtest9.rms_norm_fn(x - 1, w, EPS).float()


def functional_form_native(x, w):
    return _norm(x - 1, w, EPS).float()


def rms_norm_anchor_count(graph):
    return count_targets(graph, aten.rsqrt.default), count_targets(graph, aten.mean.dim)


@pytest.fixture(params=[False, True], ids=["auto_functionalized", "auto_functionalized_v2"])
def af_version(request):
    with inductor_config.patch(enable_auto_functionalized_v2=request.param):
        yield AF2 if request.param else AF


def test_out_form_is_replaced_and_matches(af_version):
    x, _, w = inputs()
    run = compile_and_capture(out_form, (x, w), CONFIG)
    before, after = run.graphs_before[0], run.graphs_after[0]
    assert count_targets(before, af_version) == 1 and count_targets(after, af_version) == 0
    assert count_targets(after, aten.empty.memory_format) == 0  # the buffer it wrote into is gone
    assert rms_norm_anchor_count(after) == (1, 1)
    stats = run.report["deopaque"]
    assert (stats.matched, stats.rewritten, stats.skipped) == (1, 1, [])
    wrapper = "auto_functionalized_v2" if af_version is AF2 else "auto_functionalized"
    assert stats.details == {f"fwtest9::rms_norm.default in {wrapper}: rms_norm -> aten "
                             "(auto: the only supported implementation)": 1}
    native = compile_and_capture(out_form_native, (x, w), enable=False)
    assert torch.equal(run.outputs, native.outputs)  # bitwise: the same aten graph
    torch.testing.assert_close(run.outputs, out_form(x, w), **BF16_TOL)


def test_fused_add_form_keeps_the_in_place_writes(af_version):
    x, r, w = inputs(seed=1)
    rs = r.clone()
    run = compile_and_capture(fused_form, (x, rs, w), CONFIG)
    after = run.graphs_after[0]
    assert count_targets(after, af_version) == 0 and count_targets(after, aten.copy_.default) == 1
    assert run.report["deopaque"].rewritten == 1
    # The residual written back in place is the rounded sum: exact in any order.
    assert torch.equal(rs, r + x * 2)
    rn = r.clone()
    native = compile_and_capture(fused_form_native, (x, rn, w), enable=False)
    assert torch.equal(rs, rn) and torch.equal(run.outputs, native.outputs)  # bitwise
    re = r.clone()
    torch.testing.assert_close(run.outputs, fused_form(x, re, w), **BF16_TOL)
    assert torch.equal(rs, re)


def test_functional_form_float32_and_dynamic_shapes():
    x, _, w = inputs(t=24, dtype=torch.float32, seed=2)
    run = compile_and_capture(functional_form, (x, w), CONFIG, dynamic=True)
    assert count_targets(run.graphs_after[0], torch.ops.fwtest9.rms_norm_fn.default) == 0
    assert run.report["deopaque"].rewritten == 1
    torch.testing.assert_close(run.outputs, functional_form(x, w), rtol=1e-5, atol=1e-6)


def test_a_chain_of_opaque_ops_feeding_each_other_is_replaced(af_version):
    """The second op reads the first op's result: its argument is a node the first
    replacement erased, and must be read from the replacement instead."""
    def chained(x, r, w):
        y = torch.ops.fwtest9.rms_norm_fn(x * 2, w, EPS)
        h, res = y.clone(), r.clone()
        torch.ops.fwtest9.fused_add_rms_norm(h, res, w, EPS)
        return h, res

    def chained_native(x, r, w):
        y = _norm(x * 2, w, EPS)
        res = r + y
        return _norm(res, w, EPS), res

    x, r, w = inputs(seed=5)
    run = compile_and_capture(chained, (x, r, w), dict(CONFIG, strict=True))
    assert run.report["deopaque"].rewritten == 2 and not run.report["deopaque"].errors
    after = run.graphs_after[0]
    assert count_targets(after, torch.ops.fwtest9.rms_norm_fn.default) == 0 and count_targets(after, af_version) == 0
    native = compile_and_capture(chained_native, (x, r, w), enable=False)
    for got, want in zip(run.outputs, native.outputs):
        assert torch.equal(got, want)  # bitwise: the same aten math, compiled


def test_out_buffer_given_by_the_caller_is_written():
    def fill(out, x, w):
        torch.ops.fwtest9.rms_norm(out, x, w, EPS)

    x, _, w = inputs(seed=3)
    out = torch.full_like(x, 7.0)
    run = compile_and_capture(fill, (out, x, w), CONFIG)
    assert run.report["deopaque"].rewritten == 1
    assert count_targets(run.graphs_after[0], aten.copy_.default) == 1  # the write back into `out` stays
    torch.testing.assert_close(out, _norm(x, w, EPS), **BF16_TOL)


# ---------------------------------------------------------------- the norm->quant pass sees through it
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def norm_then_fp8(x, w, native=False):
    if native:
        out = _norm(x, w, EPS)
    else:
        out = torch.empty_like(x)
        torch.ops.fwtest9.rms_norm(out, x, w, EPS)
    amax = out.abs().amax(-1, keepdim=True).to(torch.float32)
    scale = (amax / FP8_MAX).clamp(min=1.0 / (FP8_MAX * 512.0))
    q = (out.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def test_norm_quant_fires_across_the_de_opaqued_op():
    x, _, w = inputs(t=32, h=128, seed=4)
    config = dict(CONFIG, fuse_norm_quant=True)
    run = compile_and_capture(norm_then_fp8, (x, w), config)
    assert run.report["deopaque"].rewritten == 1
    eager_q, eager_scale = norm_then_fp8(x, w)
    torch.testing.assert_close(run.outputs[1], eager_scale, rtol=2**-7, atol=0)
    deq = run.outputs[0].float() * run.outputs[1]
    torch.testing.assert_close(deq, eager_q.float() * eager_scale, rtol=0.13, atol=0)  # one fp8 step (2**-3)
    # Bitwise the same as the model that spells the norm in Python, compiled the same way.
    native = compile_and_capture(lambda x, w: norm_then_fp8(x, w, native=True), (x, w), config)
    assert torch.equal(run.outputs[0].view(torch.uint8), native.outputs[0].view(torch.uint8))
    assert torch.equal(run.outputs[1], native.outputs[1])
    assert run.report["fuse_norm_quant"].rewritten == native.report["fuse_norm_quant"].rewritten
    if "fusewright.passes.norm_quant" in BUILTIN_PASS_MODULES:
        assert run.report["fuse_norm_quant"].rewritten == 1
    else:  # until that pass lands: the reduction it anchors on is in the graph it will see
        assert rms_norm_anchor_count(run.graphs_after[0]) == (1, 1)


# ---------------------------------------------------------------- graph-level cases (one capture each)
_graphs = {}


def captured(fn, *args):
    if fn not in _graphs:
        _graphs[fn] = compile_and_capture(fn, args, enable=False).graphs_before[0]
    return snapshot(_graphs[fn])


def run_pass(graph, config):
    fusewright.reset_report()
    FusewrightPassManager(PassConfig.from_dict(config), passes=[deopaque.PASS])(graph)
    return fusewright.last_report()["deopaque"]


def look_alikes(x, r, w):
    a = torch.empty_like(x)
    torch.ops.fwtest9.layer_norm(a, x, w, w, EPS)  # configured as rms_norm, but 5 arguments
    t = x.t()
    b = torch.ops.fwtest9.rms_norm_fn(t, w[:16], EPS)  # transposed: strides would change
    c = torch.ops.fwtest9.rms_norm_fn(x, w, EPS)  # the same op on a contiguous x: replaced
    torch.ops.fwtest9.fused_add_rms_norm(x, r, w, EPS)  # configured as the wrong semantic op
    return a, b, c


def test_look_alikes_are_left_alone_with_reasons():
    x, r, w = inputs()
    graph = captured(look_alikes, x, r, w)
    config = {"deopaque": {"fwtest9::layer_norm": "rms_norm", "fwtest9::rms_norm_fn.default": "rms_norm",
                           "fwtest9::fused_add_rms_norm": "rms_norm"}}
    stats = run_pass(graph, config)
    reasons = sorted(s.reason for s in stats.skipped)
    assert stats.matched == 2 and stats.rewritten == 1  # c only
    assert count_targets(graph, torch.ops.fwtest9.rms_norm_fn.default) == 1  # b stays
    assert count_targets(graph, torch.ops.fwtest9.layer_norm.default) + count_targets(graph, AF) \
        + count_targets(graph, AF2) == 2  # the layer norm and the fused add stay
    assert len(reasons) == 3, reasons
    assert reasons[0] == "fwtest9::rms_norm_fn.default not replaced: x is not contiguous (the replacement " \
                         "would change output strides)"
    assert reasons[1].startswith("opaque op not replaced: fwtest9::fused_add_rms_norm.default is configured as "
                                 "rms_norm, but its schema is the fused_add_rms_norm one")
    assert reasons[2].startswith("opaque op not replaced: fwtest9::layer_norm.default: schema")
    assert "is none of the de-opaquable schemas" in reasons[2]
    assert all(s.source and "test_deopaque.py" in s.source for s in stats.skipped)


def test_no_config_means_no_pass():
    assert not PassConfig().pass_enabled("deopaque")
    assert "deopaque" not in [p.name for p in FusewrightPassManager(PassConfig()).passes]
    assert [p.name for p in FusewrightPassManager(PassConfig.from_dict(CONFIG)).passes][0] == "deopaque"


def test_priority_without_an_applicable_implementation_keeps_the_op():
    x, _, w = inputs()
    graph = captured(out_form, x, w)
    before = str(graph)
    stats = run_pass(graph, {**CONFIG, "lowering": {"rms_norm": "triton"}})
    assert stats.rewritten == 0 and str(graph) == before
    # the fused rms_norm kernel runs on CUDA (tests/test_rms_norm_triton.py lowers to it)
    assert "not replaced: no rms_norm implementation applies (triton: the Triton kernel runs on CUDA" in \
        stats.skipped[0].reason


def test_a_user_registered_implementation_is_chosen_by_priority():
    def vendor(emit, t, p):
        return emit(torch.ops.fwtest9.rms_norm_fn.default, t["x"], t["weight"], p["eps"])

    registry.register("rms_norm", "vendor_fn", vendor, supports=lambda call: call.tensor("weight") is not None)
    try:
        x, _, w = inputs()
        graph = captured(out_form, x, w)
        stats = run_pass(graph, {"deopaque": {"fwtest9::rms_norm": "rms_norm"},
                                 "lowering": {"rms_norm": "vendor_fn,aten"}})
        assert stats.rewritten == 1
        assert count_targets(graph, torch.ops.fwtest9.rms_norm_fn.default) == 1
        assert count_targets(graph, AF) + count_targets(graph, AF2) == 0
        assert list(stats.details) == ["fwtest9::rms_norm.default in auto_functionalized_v2: "
                                       "rms_norm -> vendor_fn (priority vendor_fn,aten)"]
    finally:
        registry.unregister("rms_norm", "vendor_fn")


def test_verify_accepts_the_rewrite():
    x, _, w = inputs()
    graph = captured(out_form, x, w)
    stats = run_pass(graph, {**CONFIG, "verify": True, "strict": True, "numerics": "fast"})
    assert stats.rewritten == 1 and not stats.errors


# ---------------------------------------------------------------- a real model with vLLM-style opaque norms
@pytest.mark.models
def test_tiny_llama_with_opaque_norms_compiles_to_the_same_logits():
    transformers = pytest.importorskip("transformers")
    import types

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 12))

    def logits(m):
        return lambda ids: m(input_ids=ids).logits

    native = compile_and_capture(logits(model), (ids,), enable=False)

    def opaque_forward(self, x):  # what a serving stack does: the norm becomes its kernel
        out = torch.empty_like(x)
        torch.ops.fwtest9.rms_norm(out, x, self.weight, self.variance_epsilon)
        return out

    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    for m in norms:
        m.forward = types.MethodType(opaque_forward, m)
    run = compile_and_capture(logits(model), (ids,), {"deopaque": {"fwtest9::rms_norm": "rms_norm"}})
    assert len(norms) == 3 and run.report["deopaque"].rewritten == 3
    assert sum(count_targets(g, AF) + count_targets(g, AF2) for g in run.graphs_after) == 0
    assert torch.equal(run.outputs, native.outputs)  # Llama spells its norm as the aten lowering does


@pytest.mark.gpu
def test_norm_quant_fires_across_the_de_opaqued_op_on_cuda():
    x, _, w = (t.cuda() for t in inputs(t=256, h=512, seed=5))
    run = compile_and_capture(norm_then_fp8, (x, w), dict(CONFIG, fuse_norm_quant=True))
    assert run.report["deopaque"].rewritten == 1
    if "fusewright.passes.norm_quant" in BUILTIN_PASS_MODULES:
        assert run.report["fuse_norm_quant"].rewritten == 1
    eager_q, eager_scale = norm_then_fp8(x, w)
    torch.testing.assert_close(run.outputs[1], eager_scale, rtol=2**-7, atol=0)
    deq = run.outputs[0].float() * run.outputs[1]
    torch.testing.assert_close(deq, eager_q.float() * eager_scale, rtol=0.13, atol=0)

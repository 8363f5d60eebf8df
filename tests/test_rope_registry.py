"""RoPE through the lowering registry: user-registered implementations, fall-through, auto, uuid.

A stand-in "vendor" RoPE implementation is built from torch ops (what a vendor CUDA op
would compute: the f32 rotation of x with cos/sin, rounded once, interleaved back).
Compiles are real Inductor CPU compiles; the outputs are compared with the function
compiled with fusewright off.
"""

import io

import pytest
import torch

from fusewright import FusewrightPassManager, PassConfig
from fusewright.lowering import auto, registry, rope_lowering
from fusewright.passes.verify import _bitwise_equal
from fusewright.testing import compile_and_capture, count_targets

aten = torch.ops.aten
prims = torch.ops.prims
BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("no_env_config")


def wan_rope(x, freqs_cos, freqs_sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _same(a, b):
    return len(a) == len(b) and all(_bitwise_equal(x, y) for x, y in zip(a, b))


def qk(q, k, c, s):
    return wan_rope(q, c, s), wan_rope(k, c, s)


def _inputs(s=8, h=2, d=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, h, d, generator=g).to(BF16)
    k = torch.randn(1, s, h, d, generator=g).to(BF16)
    ang = torch.rand(1, s, 1, d // 2, generator=g) * 6.28
    return q, k, ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


def vendor_build(emit, t, p):
    """The stand-in vendor op: rotate x (interleaved pairs) in f32, interleave, round once."""
    x, d = t["x"], int(p["head_dim"])
    f32 = torch.float32
    x1 = emit(prims.convert_element_type.default, emit(aten.slice.Tensor, x, -1, 0, d, 2), f32)
    x2 = emit(prims.convert_element_type.default, emit(aten.slice.Tensor, x, -1, 1, d, 2), f32)
    c = emit(prims.convert_element_type.default, t["cos"], f32)
    s = emit(prims.convert_element_type.default, t["sin"], f32)
    o1 = emit(aten.sub.Tensor, emit(aten.mul.Tensor, x1, c), emit(aten.mul.Tensor, x2, s))
    o2 = emit(aten.add.Tensor, emit(aten.mul.Tensor, x1, s), emit(aten.mul.Tensor, x2, c))
    # stack/flatten spelled in ops that exist after decomposition (a post-grad graph
    # must not contain ops Inductor decomposes, such as aten.stack)
    pairs = emit(aten.cat.default, [emit(aten.unsqueeze.default, o1, -1), emit(aten.unsqueeze.default, o2, -1)], -1)
    # the pass gives the buffer dtype and shape; measuring (real tensors) has neither
    dtype = p["dtype"] if "dtype" in p else x.dtype
    shape = list(p["shape"]) if "shape" in p else list(x.shape)
    return emit(prims.convert_element_type.default, emit(aten.reshape.default, pairs, shape), dtype)


def vendor_supports(call):
    if dict(call.params).get("rotation") != "f32":
        return "vendor rope needs x, cos and sin with f32 math"
    return call.variant == "interleaved" or "vendor rope handles interleaved pairs only"


@pytest.fixture
def vendor():
    impl = registry.register("rope", "vendor", vendor_build, supports=vendor_supports, version="stand-in-1")
    yield impl
    registry.unregister("rope", "vendor")


@pytest.fixture(scope="module")
def wan_off():
    inputs = _inputs()
    return inputs, compile_and_capture(qk, inputs, enable=False)


def test_vendor_first_in_priority_is_used_and_graph_diff_shows_it(vendor, wan_off):
    from rich.console import Console

    from fusewright.tools.graph_diff import live_diff
    from fusewright.tools.render import print_report

    inputs, off = wan_off
    # the config parser accepts the name once it is registered for rope
    config = PassConfig.from_cli(["-cc.lowering.rope=vendor,aten", "-cc.strict=true"])
    assert config.lowering.priority("rope") == ("vendor", "aten")
    run = compile_and_capture(qk, inputs, config=config)
    stats = run.report["rewrite_rope"]
    assert (stats.matched, stats.rewritten, stats.skipped) == (2, 2, [])
    assert stats.details == {"strided writeback: rope[interleaved] -> vendor (priority vendor,aten)": 2}
    after = run.graphs_after[0]
    for target in (aten.slice_scatter.default, aten.copy.default, aten.unbind.int):
        assert count_targets(after, target) == 0, target
    assert _same(run.outputs, off.outputs)

    report = live_diff(qk, inputs, config)
    as_dict = report.to_dict()
    details = as_dict["passes"]["passes"]["rewrite_rope"]["details"]
    parsed = [registry.parse_detail(d) for d in details]
    assert [(p["impl"], p["reason"]) for p in parsed] == [("vendor", "priority vendor,aten")]
    assert as_dict["numerics"]["bitwise"] is True
    out = io.StringIO()
    print_report(report, Console(file=out, width=250, color_system=None))
    # the table's cell, brackets kept (the renderer escapes pass text for rich markup)
    assert "rope[interleaved] -> vendor (priority vendor,aten) x2" in out.getvalue()


def test_vendor_that_does_not_support_the_call_falls_through_with_its_reason(vendor):
    def neox(x, cos, sin):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        out = torch.empty_like(x)
        out[..., :h] = x1 * cos - x2 * sin
        out[..., h:] = x2 * cos + x1 * sin
        return out

    q, _, c, s = _inputs(s=5)
    c, s = c[..., :8], s[..., :8]
    off = compile_and_capture(neox, (q, c, s), enable=False)
    run = compile_and_capture(neox, (q, c, s), config={"lowering": {"rope": "vendor,aten"}, "strict": True})
    stats = run.report["rewrite_rope"]
    assert stats.rewritten == 1
    assert stats.details == {"halves writeback: rope[neox] -> aten "
                             "(vendor: vendor rope handles interleaved pairs only; priority vendor,aten)": 1}
    assert count_targets(run.graphs_after[0], aten.cat.default) == 1
    assert _same(run.outputs, off.outputs)


def test_vendor_breaking_the_output_contract_leaves_the_graph_unchanged(wan_off):
    registry.register("rope", "broken", lambda emit, t, p: emit(aten.slice.Tensor, t["x"], -1, 0, 2))
    try:
        inputs, off = wan_off
        with pytest.warns(Warning, match="'rewrite_rope' failed and was undone"):
            run = compile_and_capture(qk, inputs, config={"lowering": {"rope": "broken"}})
        stats = run.report["rewrite_rope"]
        assert stats.errors and "rope implementation 'broken' returned" in str(stats.errors[0])
        assert count_targets(run.graphs_after[0], aten.slice_scatter.default) == 4
        assert _same(run.outputs, off.outputs)
    finally:
        registry.unregister("rope", "broken")


def test_rope_implementations_are_in_the_pass_manager_uuid():
    before = FusewrightPassManager(PassConfig()).uuid()
    registry.register("rope", "vendor_uuid", vendor_build)
    try:
        assert FusewrightPassManager(PassConfig()).uuid() != before
    finally:
        registry.unregister("rope", "vendor_uuid")
    assert FusewrightPassManager(PassConfig()).uuid() == before


def _cuda_call(rotation="f32", seq=4096, producer="materialized"):
    x = registry.TensorInfo((1, seq, 40, 128), BF16, "cuda", (seq * 40 * 128, 40 * 128, 128, 1))
    t = registry.TensorInfo((1, seq, 1, 64), torch.float32, "cuda", (seq * 128, 128, 128, 2))
    return rope_lowering.op_call(x, t, t, interleaved=True, rotation=rotation, producer=producer)


class FakeTimer:
    def __init__(self, times):
        self.times, self.calls = times, 0

    def __call__(self, call, impls):
        self.calls += 1
        return {i.name: self.times[i.name] for i in impls}


def test_auto_measures_when_a_user_implementation_is_a_candidate(vendor, tmp_path):
    timer = FakeTimer({"none": 9e-5, "aten": 8e-5, "triton": 8.5e-5, "vendor": 5e-5})
    tuner = auto.Tuner(measure=timer, directory=tmp_path)
    choice = registry.choose(_cuda_call(), ("auto",), tuner=tuner)
    assert choice.name == "vendor" and timer.calls == 1 and "measured for rope;interleaved" in choice.reason
    # vendor does not support it: the shipped table decides among the built-ins, nothing measured
    choice = registry.choose(_cuda_call("rounds_between_steps"), ("auto",), tuner=tuner)
    assert timer.calls == 1 and choice.name in ("aten", "none")


def test_auto_on_the_h100_follows_the_shipped_rows():
    """Without a user implementation, the shipped H100 rows decide (nothing is measured)."""
    def never(call, impls):
        raise AssertionError("measured")

    h100, all3 = "NVIDIA H100 80GB HBM3", ("none", "aten", "triton")
    # S=4096: the kernel 63.39 us, aten 65.22 us: within 3%, the rule order (aten first) decides
    pick, why = rope_lowering.shipped_choice_for_call(_cuda_call(), h100, all3)
    assert pick == "aten" and "triton 63.39us" in why and "aten 65.22us" in why
    # S=75600: the kernel clearly ahead
    pick, why = rope_lowering.shipped_choice_for_call(_cuda_call(seq=75600), h100, all3)
    assert pick == "triton" and "triton 1057.98us" in why
    # ... unless the triton lowering cannot take the call
    assert rope_lowering.shipped_choice_for_call(_cuda_call(seq=75600), h100, ("none", "aten"))[0] == "aten"
    tuner = auto.Tuner(measure=never, enabled=True)
    choice = registry.choose(_cuda_call(), ("auto",), tuner=tuner)
    if auto.plain_device_name("cuda") == h100:
        assert choice.name == "aten" and "shipped measurement" in choice.reason
    else:  # another machine: the cuda rule of the table (it cites the H100 rows)
        assert choice.name == "aten" and "rule for cuda (rope_auto.json)" in choice.reason


def test_auto_gives_aten_when_x_is_still_being_computed():
    """x produced by fusible ops (an RMSNorm): aten, whatever the table says for x in memory."""
    call = _cuda_call(seq=75600, producer="fusible")
    for device in ("NVIDIA H100 80GB HBM3", "some other GPU"):
        pick, why = rope_lowering.shipped_choice_for_call(call, device, ("none", "aten", "triton"))
        assert pick == "aten" and "fuses into the aten lowering" in why
    # aten not a candidate: the producer rule does not apply, the table does
    pick, _ = rope_lowering.shipped_choice_for_call(call, "NVIDIA H100 80GB HBM3", ("none", "triton"))
    assert pick == "triton"
    # an explicit priority is never overridden
    choice = registry.choose(call, ("triton",), tuner=auto.Tuner(measure=None, enabled=False))
    assert choice.name == "triton"

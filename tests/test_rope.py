"""RoPE writeback rewrite: matching, both lowerings, near misses, the example block.

Every compile here is a real Inductor CPU compile; outputs are compared with the same
function compiled with fusewright off (bitwise for the aten lowering, and for the fused
op, whose CPU implementation is the reference math).
"""

import pytest
import torch

from fusewright.lowering import registry
from fusewright.passes.verify import _bitwise_equal
from fusewright.patterns.rope import find_rope_writebacks
from fusewright.testing import compile_and_capture, count_targets

aten = torch.ops.aten
BF16 = torch.bfloat16


# ----------------------------------------------------------------- spellings
def wan_rope(x, freqs_cos, freqs_sin):
    """diffusers Wan: full-width f32 tables sliced inline, unflatten/unbind halves."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def gptj_rope(x, cos, sin):
    """GPT-J-style interleaved pairs via x[..., ::2], half-width tables, zeros_like buffer."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    out = torch.zeros_like(x)
    out[..., ::2] = cos * x1 - sin * x2
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def neox_halves(x, cos, sin):
    """Step-1 writeback of two contiguous halves (CogVideoX-like)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    out[..., :h] = x1 * cos - x2 * sin
    out[..., h:] = x2 * cos + x1 * sin
    return out


def qk(spelling):
    def fn(q, k, c, s):
        return spelling(q, c, s), spelling(k, c, s)
    return fn


def _inputs(s=8, hq=2, hk=2, d=16, full_tables=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, s, hq, d, generator=g).to(BF16)
    k = torch.randn(1, s, hk, d, generator=g).to(BF16)
    ang = torch.rand(1, s, 1, d // 2, generator=g) * 6.28
    if full_tables:
        return q, k, ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    return q, k, ang.cos(), ang.sin()


def _same(a, b):
    return all(_bitwise_equal(x, y) for x, y in zip(a, b))


def _rope_stats(run):
    return run.report["rewrite_rope"]


def _lowered(stats):
    """Report details as `<implementation>:<writeback kind>` counts (other details as they are).

    The pass writes `strided writeback: rope[interleaved] -> aten (why)`; the why is
    checked where it matters."""
    out = {}
    for detail, n in stats.details.items():
        parsed = registry.parse_detail(detail)
        key = f"{parsed['impl']}:{parsed['source'].split()[0]}" if parsed else detail
        out[key] = out.get(key, 0) + n
    return out


# ---------------------------------------------------------- rewrites that fire
@pytest.fixture(scope="module")
def wan_case():
    inputs = _inputs()
    off = compile_and_capture(qk(wan_rope), inputs, enable=False)
    return inputs, off


def test_wan_spelling_aten_lowering_is_bitwise(wan_case):
    inputs, off = wan_case
    assert count_targets(off.graphs_before[0], aten.slice_scatter.default) == 4
    run = compile_and_capture(qk(wan_rope), inputs, config={"lowering": {"rope": "aten"}, "strict": True})
    stats = _rope_stats(run)
    assert (stats.matched, stats.rewritten, stats.skipped) == (2, 2, [])
    assert _lowered(stats) == {"aten:strided": 2}
    after = run.graphs_after[0]
    assert count_targets(after, aten.slice_scatter.default) == 0
    assert count_targets(after, aten.copy.default) == 0
    assert count_targets(after, aten.empty.memory_format) == 0
    assert count_targets(after, aten.cat.default) == 2
    assert count_targets(after, torch.ops.prims.convert_element_type.default) == 4  # the copies' implicit casts
    assert _same(run.outputs, off.outputs)


def test_wan_spelling_fused_op_one_launch_for_q_and_k(wan_case):
    inputs, off = wan_case
    run = compile_and_capture(qk(wan_rope), inputs,
                              config={"lowering": {"rope": "triton"}, "strict": True, "verify": True})
    stats = _rope_stats(run)
    assert stats.rewritten == 2 and _lowered(stats) == {"triton:strided": 2, "triton:launches": 1}
    after = run.graphs_after[0]
    assert count_targets(after, torch.ops.fusewright.rope_qk.default) == 1
    for target in (aten.slice_scatter.default, aten.copy.default, aten.mul.Tensor, aten.unbind.int):
        assert count_targets(after, target) == 0, target
    # CPU runs the op's reference implementation: the eager math, bitwise
    assert _same(run.outputs, off.outputs)


def test_gptj_interleaved_spelling_graph_diff_and_both_lowerings():
    from fusewright.passes.config import PassConfig
    from fusewright.tools.graph_diff import live_diff

    inputs = _inputs(s=6, hq=4, hk=2, d=32, full_tables=False)
    diff = live_diff(qk(gptj_rope), inputs, PassConfig.from_dict({"lowering": {"rope": "aten"}, "strict": True}))
    report = diff.to_dict()
    assert report["rewrites"]["rewrite_rope"] == 2
    assert report["numerics"]["bitwise"] is True
    (fx,) = report["fx_diff"]
    removed = fx["nodes"]["removed"]
    assert sum(n.startswith("slice_scatter") for n in removed) == 4
    assert sum(n.startswith("copy") for n in removed) == 4
    assert sum(n.startswith("full") for n in removed) == 2  # the zeros_like buffers
    off_outputs = diff.before.outputs
    run = compile_and_capture(qk(gptj_rope), inputs, config={"lowering": {"rope": "triton"}, "strict": True})
    assert _lowered(_rope_stats(run)) == {"triton:strided": 2, "triton:launches": 1}
    assert count_targets(run.graphs_after[0], aten.slice_scatter.default) == 0
    assert _same(run.outputs, off_outputs)


def test_auto_follows_the_table_and_can_keep_the_writeback(wan_case, monkeypatch):
    from fusewright.lowering import rope_lowering

    inputs, off = wan_case
    # CPU rule (measured, lowering/rope_auto.json): aten
    run = compile_and_capture(qk(wan_rope), inputs, config={"lowering": "auto", "strict": True})
    stats = _rope_stats(run)
    assert _lowered(stats) == {"aten:strided": 2}
    (detail,) = stats.details
    assert "rope[interleaved] -> aten (auto: rule for cpu (rope_auto.json)" in detail
    assert _same(run.outputs, off.outputs)
    keep = {"measured": {}, "rules": {"cpu": {"with_kernel": "none", "without_kernel": "none", "why": "test"}}}
    monkeypatch.setattr(rope_lowering, "load_table", lambda: keep)
    run = compile_and_capture(qk(wan_rope), inputs, config={"lowering": "auto", "strict": True})
    stats = _rope_stats(run)
    assert (stats.matched, stats.rewritten) == (2, 0)
    assert all("kept as is" in s.reason and "rope[interleaved] -> none" in s.reason and "rule for cpu" in s.reason
               for s in stats.skipped)
    assert count_targets(run.graphs_after[0], aten.slice_scatter.default) == 4
    # the same choice by name
    run = compile_and_capture(qk(wan_rope), inputs, config={"lowering": {"rope": "none"}, "strict": True})
    assert _rope_stats(run).rewritten == 0 and count_targets(run.graphs_after[0], aten.slice_scatter.default) == 4


def test_bf16_math_is_not_fused_in_exact_numerics():
    q, _, c, s = _inputs(s=4, d=16, full_tables=False)
    c, s = c.to(BF16), s.to(BF16)  # every product rounds to bf16: not the kernel's f32 math
    run = compile_and_capture(gptj_rope, (q, c, s), config={"lowering": {"rope": "triton,aten"}, "strict": True})
    assert _lowered(_rope_stats(run)) == {"aten:strided": 1}
    found, _ = find_rope_writebacks(run.graphs_before[0])
    assert found[0].rotation is not None and not found[0].rotation.f32_math


def test_dynamic_shapes_are_declined():
    q, _, c, s = _inputs(s=6, d=16, full_tables=False)
    run = compile_and_capture(gptj_rope, (q, c, s), config={"lowering": {"rope": "aten"}, "strict": True},
                              dynamic=True)
    stats = _rope_stats(run)
    assert stats.rewritten == 0 and any("symbolic" in s.reason for s in stats.skipped)


def test_step1_halves_become_cat_or_neox_kernel():
    q, _, c, s = _inputs(s=5, d=16, full_tables=False)
    off = compile_and_capture(neox_halves, (q, c, s), enable=False)
    run = compile_and_capture(neox_halves, (q, c, s), config={"lowering": {"rope": "aten"}, "strict": True})
    assert _lowered(_rope_stats(run)) == {"aten:halves": 1}
    after = run.graphs_after[0]
    assert count_targets(after, aten.slice_scatter.default) == 0 and count_targets(after, aten.cat.default) == 1
    assert _same(run.outputs, off.outputs)
    run = compile_and_capture(neox_halves, (q, c, s), config={"lowering": {"rope": "triton"}, "strict": True})
    assert _lowered(_rope_stats(run)) == {"triton:halves": 1, "triton:launches": 1}
    assert count_targets(run.graphs_after[0], torch.ops.fusewright.rope.default) == 1
    assert _same(run.outputs, off.outputs)


def test_unidentified_rotation_falls_back_along_the_priority_list():
    def writeback(a, b):
        out = torch.empty(a.shape[:-1] + (2 * a.shape[-1],), dtype=BF16)
        out[..., 0::2] = a.exp()
        out[..., 1::2] = b
        return out

    a, b = torch.randn(3, 4), torch.randn(3, 4)
    off = compile_and_capture(writeback, (a, b), enable=False)
    run = compile_and_capture(writeback, (a, b), config={"lowering": {"rope": "triton,aten"}, "strict": True})
    assert _lowered(_rope_stats(run)) == {"aten:strided": 1}
    assert _same(run.outputs, off.outputs)
    run = compile_and_capture(writeback, (a, b), config={"lowering": {"rope": "triton"}, "strict": True})
    stats = _rope_stats(run)
    assert stats.rewritten == 0 and "not identified" in stats.skipped[0].reason
    assert count_targets(run.graphs_after[0], aten.slice_scatter.default) == 2


def test_example_block_writeback_is_rewritten():
    from fusewright.tools.example import example

    model, inputs = example("cpu")
    off = compile_and_capture(model, inputs, enable=False)
    # only this pass: the others rewrite the norm/quant and the round trip of the block
    config = {"lowering": {"rope": "aten"}, "strict": True, "fuse_norm_quant": False, "eliminate_noop_casts": False}
    run = compile_and_capture(model, inputs, config=config)
    stats = _rope_stats(run)
    assert (stats.matched, stats.rewritten) == (1, 1)
    assert sum(count_targets(g, aten.slice_scatter.default) for g in run.graphs_after) == 0
    assert _bitwise_equal(run.outputs, off.outputs)


# -------------------------------------------------------------- near misses
def partial_cover(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    out = torch.zeros_like(x)
    out[..., ::2] = x1 * cos - x2 * sin
    out[..., 1:-2:2] = (x1 * sin + x2 * cos)[..., :-1]
    return out


def read_in_between(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., ::2] = x1 * cos - x2 * sin
    peek = out.float().sum()  # reads the odd half before it is written
    out[..., 1::2] = x1 * sin + x2 * cos
    return out, peek


def aliased(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    big = torch.empty(x.shape[:-1] + (x.shape[-1] + 2,), dtype=x.dtype)
    out = big[..., 2:]  # the buffer is a view of a larger allocation
    out[..., ::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return big


def step3(x, cos, sin):
    out = torch.empty_like(x)
    out[..., 0::3] = x[..., 0::3] * cos
    out[..., 1::3] = x[..., 1::3] * sin
    out[..., 2::3] = x[..., 2::3]
    return out


@pytest.mark.parametrize("fn,d,reason", [
    (partial_cover, 16, "partly covered"),
    (read_in_between, 16, "read by"),
    (aliased, 16, "aliased"),
    (step3, 18, "3 writebacks"),
])
def test_near_misses_are_declined_with_a_reason(fn, d, reason):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, d).to(BF16)
    w = d // 2 if fn is not step3 else d // 3
    cos, sin = torch.randn(1, 4, 1, w), torch.randn(1, 4, 1, w)
    off = compile_and_capture(fn, (x, cos, sin), enable=False)
    run = compile_and_capture(fn, (x, cos, sin), config={"lowering": {"rope": "aten"}, "strict": True})
    stats = _rope_stats(run)
    assert stats.rewritten == 0
    assert any(reason in s.reason for s in stats.skipped), [s.reason for s in stats.skipped]
    before = count_targets(run.graphs_before[0], aten.slice_scatter.default)
    assert before >= 2 and count_targets(run.graphs_after[0], aten.slice_scatter.default) == before
    assert _same(torch.utils._pytree.tree_leaves(run.outputs), torch.utils._pytree.tree_leaves(off.outputs))


def test_matcher_reports_kind_split_and_rotation(wan_case):
    _, off = wan_case
    found, declined = find_rope_writebacks(off.graphs_before[0])
    assert declined == [] and len(found) == 2
    for wb in found:
        assert (wb.kind, wb.dim, wb.dtype, wb.shape) == ("strided", 3, BF16, (1, 8, 2, 16))
        rot = wb.rotation
        assert rot is not None and rot.layout == "interleaved" and rot.f32_math
        assert rot.x.op == "placeholder"
        # the inline slices of the full-width tables: cos takes even, sin odd entries
        assert rot.cos.target is aten.slice.Tensor and rot.cos.args[2] == 0
        assert rot.sin.target is aten.slice.Tensor and rot.sin.args[2] == 1


# ---------------------------------------------------------- what produces x
def _normed_qk(q, k, c, s):
    """Wan's order: RMSNorm over the heads' features, then RoPE (x is still being computed)."""
    def norm(x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    return wan_rope(norm(q), c, s), wan_rope(norm(k), c, s)


def _projected_qk(h, w, c, s):
    """q straight from a linear: x is a GEMM output, in memory whatever reads it."""
    q = (h @ w).unflatten(-1, (2, 16))
    return (wan_rope(q, c, s),)


def test_x_producer_tells_fusible_from_materialized():
    from fusewright.patterns.rope import x_producer

    q, k, c, s = _inputs()
    cases = {
        "fusible": (_normed_qk, (q, k, c, s)),
        "materialized": (qk(wan_rope), (q, k, c, s)),  # graph inputs
    }
    h, w = torch.randn(1, 8, 24).to(BF16), torch.randn(24, 32).to(BF16)
    for want, (fn, inputs) in dict(cases, gemm=(_projected_qk, (h, w, c, s))).items():
        graph = compile_and_capture(fn, inputs, enable=False).graphs_before[0]
        found, _ = find_rope_writebacks(graph)
        assert found and all(wb.rotation is not None for wb in found)
        expect = "fusible" if want == "fusible" else "materialized"
        assert [x_producer(wb.rotation.x) for wb in found] == [expect] * len(found), want


def test_auto_gives_aten_when_the_norm_would_fuse_into_it():
    q, k, c, s = _inputs()
    off = compile_and_capture(_normed_qk, (q, k, c, s), enable=False)
    run = compile_and_capture(_normed_qk, (q, k, c, s), config={"lowering": "auto", "strict": True})
    stats = _rope_stats(run)
    assert _lowered(stats) == {"aten:strided": 2}
    assert all("fuses into the aten lowering" in d for d in stats.details)
    assert _same(run.outputs, off.outputs)
    # asked for by name, the kernel is still used (the rule is auto's, not a veto)
    run = compile_and_capture(_normed_qk, (q, k, c, s), config={"lowering": {"rope": "triton"}, "strict": True})
    assert _lowered(_rope_stats(run)) == {"triton:strided": 2, "triton:launches": 1}


def test_x_producer_looks_through_getitem_to_the_tuple_op():
    import operator

    import torch.fx as fx

    from fusewright.lowering import rope_ops  # noqa: F401  (registers torch.ops.fusewright.rope)
    from fusewright.patterns.rope import x_producer

    g = fx.Graph()
    a = g.placeholder("a")
    vm = g.call_function(aten.var_mean.correction, (a, [-1]), {"keepdim": True})
    mean = g.call_function(operator.getitem, (vm, 1))
    sdpa = g.call_function(aten._scaled_dot_product_flash_attention.default, (a, a, a))
    out = g.call_function(operator.getitem, (sdpa, 0))
    view = g.call_function(aten.view.default, (out, [-1]))
    custom = g.call_function(torch.ops.fusewright.rope.default, (a, a, a, True))
    assert x_producer(mean) == "fusible"       # a reduction Inductor generates code for
    assert x_producer(view) == "materialized"  # attention is an extern kernel, views do not change that
    assert x_producer(custom) == "materialized" and x_producer(a) == "materialized"

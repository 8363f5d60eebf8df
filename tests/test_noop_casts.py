"""No-op cast pass on make_fx graphs: each removal case, each refusal, lossy look-alikes.

Fast (no Inductor): graphs come from `make_fx(..., tracing_mode="fake")` with fake
metadata, the pass runs on them directly, and the graph before and after runs on the
same real inputs (outputs compared bitwise, with strides, offsets and aliasing).
Inductor compiles are in test_noop_casts_inductor.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import noop_casts_helpers as H  # tests/, on sys.path by tests/conftest.py

from fusewright.passes.graph_utils import is_op
from fusewright.passes.noop_casts import PASS
from fusewright.passes.registry import builtin_passes
from fusewright.patterns import casts

aten, prims = torch.ops.aten, torch.ops.prims
bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
FP8 = torch.float8_e4m3fn


def n_casts(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if casts.as_cast(n) is not None)


def x_of(dtype, shape=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def reasons(stats) -> str:
    return " | ".join(s.reason for s in stats.skipped)


# ---------------------------------------------------------------- registration


def test_registered_last_with_its_flag():
    names = [p.name for p in builtin_passes()]
    assert "eliminate_noop_casts" in names
    assert PASS.order == 90 and PASS.stage == "post_grad_post"
    assert max(p.order for p in builtin_passes()) == PASS.order
    # patterns/casts.py decides the rewrite: it must be part of the cache key.
    assert any(f.endswith("patterns/casts.py") for f in PASS.source_files())


# ---------------------------------------------------------------- removals


@pytest.mark.parametrize("narrow,wide", [(bf16, f32), (bf16, f64), (f16, f32), (f16, f64), (f32, f64)])
def test_round_trip_in_front_of_opaque_op(narrow, wide):
    def fn(x):
        h = x * 2  # an intermediate: the op may read it directly
        return H.probe(h.to(wide).to(narrow))

    gm, stats = H.check_rewrite(fn, [x_of(narrow)])
    assert n_casts(gm) == 0
    assert (stats.matched, stats.rewritten) == (1, 1)
    assert stats.details == {"round_trip": 1}


def test_round_trip_through_several_wide_dtypes():
    # bf16 -> f32 -> f64 -> f32 -> bf16: every intermediate holds bf16 exactly.
    gm, stats = H.check_rewrite(lambda x: H.probe(x.float().double().float().to(bf16)), [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten >= 1


LAYOUTS = {
    "view": lambda v: v.view(2, 12),
    "reshape": lambda v: v.reshape(24),
    "permute": lambda v: v.permute(1, 0),
    "transpose": lambda v: v.transpose(0, 1),
    "t": lambda v: v.t(),
    "slice": lambda v: v[1:3],
    "slice_step": lambda v: v[:, ::2],
    "select": lambda v: v.select(1, 2),
    "expand": lambda v: v.unsqueeze(0).expand(3, 4, 6),
    "unsqueeze": lambda v: v.unsqueeze(1),
    "squeeze": lambda v: v.unsqueeze(0).squeeze(0),
    "clone": lambda v: v.clone(),
    "contiguous": lambda v: v.t().contiguous(),
    "unsafe_view": lambda v: aten._unsafe_view(v.clone(), [6, 4]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_through_layout_op_moves_it_onto_the_narrow_tensor(layout):
    op = LAYOUTS[layout]

    def fn(x):
        return op(x.float()).to(bf16) * 3

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0, gm.graph
    assert stats.details == {"round_trip_layout": 1}
    # The layout ops now read the bf16 tensor.
    for node in gm.graph.nodes:
        if casts.is_layout_op(node):
            assert node.meta["val"].dtype == bf16


def test_view_that_relied_on_the_wide_copy_being_dense_becomes_a_reshape():
    # `.float()` of an expanded tensor is a dense copy, so `.view(48)` works on it; on the
    # expanded bf16 tensor a view is impossible: the replay uses reshape (same values).
    def fn(x):
        return x.unsqueeze(0).expand(2, 4, 6).float().view(48).to(bf16) * 3

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 1
    assert any(is_op(n, aten.reshape.default) for n in gm.graph.nodes)


def test_layout_op_in_front_of_opaque_op_when_layout_is_unchanged():
    # A dense permuted view: the copy keeps the view's strides, so the op can take the view.
    def fn(x):
        h = x + 1
        return H.probe(h.float().permute(1, 0).unsqueeze(0).to(bf16))

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 1


def test_wide_value_with_other_consumers_stays_for_them():
    def fn(x):
        w = x.float()
        return H.probe(w.t().to(bf16)), H.probe(w), w.sum()

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    cast_nodes = [n for n in gm.graph.nodes if casts.as_cast(n)]
    assert len(cast_nodes) == 1 and cast_nodes[0].meta["val"].dtype == f32  # the upcast only
    assert stats.details == {"round_trip_layout": 1, "wide_value_kept": 1}
    assert len(cast_nodes[0].users) == 2


def test_cast_back_with_several_readers():
    def fn(x):
        b = (x * 2).float().to(bf16)
        return H.probe(b), b + 1, b.sum()

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 1


@pytest.mark.parametrize("spelling", ["_to_copy", "to_copy_true", "convert_element_type", "to_dtype"])
def test_conversion_to_the_same_dtype(spelling):
    def fn(x):
        h = x * 2
        if spelling == "_to_copy":
            c = aten._to_copy(h, dtype=bf16)
        elif spelling == "to_copy_true":
            c = h.to(bf16, copy=True)
        elif spelling == "convert_element_type":
            c = prims.convert_element_type(h, bf16)
        else:
            c = aten.to.dtype(h, bf16, copy=True)
        return H.probe(c), c * 3

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0
    assert stats.details == {"same_dtype": 1}


def test_chained_round_trips_all_go():
    def fn(x):
        v = (x * 2).float().to(bf16).float().t().to(bf16).double().to(bf16)
        return H.probe(v)

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 3


def test_symbolic_shapes():
    def fn(x):
        h = x * 2
        return H.probe(h.float().reshape(-1).to(bf16)), h.float().t()[1:].to(bf16) * 2

    gm, stats = H.check_rewrite(fn, [x_of(bf16, (6, 8))], mode="symbolic")
    assert n_casts(gm) == 0 and stats.rewritten == 2


def test_output_can_become_a_view_of_an_intermediate():
    # The graph returns a permuted view of `h` instead of a copy: same strides, no input aliased.
    gm, stats = H.check_rewrite(lambda x: (x * 2).float().t().to(bf16), [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 1


# ---------------------------------------------------------------- refusals


LOSSY = {
    "f32->bf16->f32": (f32, lambda x: x.to(bf16).to(f32)),
    "f32->f16->f32": (f32, lambda x: x.to(f16).to(f32)),
    "f64->f32->f64": (f64, lambda x: x.to(f32).to(f64)),
    "bf16->f16->bf16": (bf16, lambda x: x.to(f16).to(bf16)),
    "f16->bf16->f16": (f16, lambda x: x.to(bf16).to(f16)),
    "bf16->fp8->bf16": (bf16, lambda x: x.to(FP8).to(bf16)),
    "bf16->f32->fp8->f32->bf16": (bf16, lambda x: x.float().to(FP8).float().to(bf16)),
    "bf16->int32->bf16": (bf16, lambda x: x.to(torch.int32).to(bf16)),
    "bf16->f32->int64->f32->bf16": (bf16, lambda x: x.float().long().float().to(bf16)),
    "f32->bf16->permute->f32": (f32, lambda x: x.to(bf16).t().to(f32)),
    "bf16->f32->f16->f32->bf16": (bf16, lambda x: x.float().half().float().to(bf16)),
    "bf16->f32->math->bf16": (bf16, lambda x: (x.float() * 1.0001).to(bf16)),
    "bf16->f32->add0->bf16": (bf16, lambda x: (x.float() + 0).to(bf16)),
    "f16->f32->bf16": (f16, lambda x: x.float().to(bf16)),
}


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_look_alikes_are_untouched(name):
    dtype, chain = LOSSY[name]

    def fn(x):
        return H.probe(chain(x * 2)), chain(x * 2) * 3

    gm = H.trace(fn, [x_of(dtype)])
    before = str(gm.graph)
    stats = H.run_pass(gm)
    assert str(gm.graph) == before
    assert (stats.matched, stats.rewritten, stats.skipped) == (0, 0, [])


def test_output_would_alias_an_input():
    gm, stats = H.check_rewrite(lambda x: x.float().to(bf16), [x_of(bf16)])
    assert n_casts(gm) == 2 and stats.rewritten == 0
    assert "alias a graph input" in reasons(stats)


def test_output_would_alias_an_input_written_in_place():
    # `x.add_(1)` returns x itself: the copy's source is still the input.
    def fn(x):
        v = x.add_(1)
        return v.float().to(bf16)

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and stats.rewritten == 0


def test_output_would_alias_another_output():
    def fn(x):
        h = x * 2
        return h, h.float().t().to(bf16)

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "alias another output" in reasons(stats)


def test_output_view_of_the_copy_would_alias_an_input():
    # The copy is not returned itself, a view of it is: still an alias of x after a rewrite.
    gm, stats = H.check_rewrite(lambda x: x.float().to(bf16).view(24), [x_of(bf16)])
    assert n_casts(gm) == 2 and "alias a graph input" in reasons(stats)


def test_copy_written_by_an_opaque_op_stays():
    def fn(x):
        c = (x * 2).float().to(bf16)
        H.scale_(c)
        return c

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "written to by scale_" in reasons(stats)


def test_copy_written_in_place_through_a_view_stays():
    def fn(x):
        h = x * 2
        c = h.float().to(bf16)
        c.view(24).add_(1)
        return h + c

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "written to by add_" in reasons(stats)


def test_source_written_after_the_copy_stays():
    def fn(x):
        h = x * 2
        c = h.float().t().to(bf16)
        H.scale_(h)  # the copy holds the values from before this write
        return H.probe(c), h

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "written to after the copy" in reasons(stats)


def test_source_written_before_the_copy_is_fine():
    def fn(x):
        h = x * 2
        H.scale_(h)
        return H.probe(h.float().t().to(bf16)), h

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 1


def test_wide_value_written_before_the_cast_back_stays():
    def fn(x):
        w = (x * 2).float()
        H.scale_(w)  # the cast back reads this write: it is not a round trip any more
        return H.probe(w.to(bf16))

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "wide value is written" in reasons(stats)


def test_opaque_op_would_see_another_layout():
    # After a slice the copy is dense; the view is not: the op would see other strides.
    def fn(x):
        return H.probe((x * 2).float()[:, 1:5].to(bf16))

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "sees the copy's layout" in reasons(stats)


def test_layout_change_that_would_reach_an_output_stays():
    # The copy is made contiguous; `c * 3` on the transposed view would be transposed too,
    # and the graph output's strides would change.
    def fn(x):
        c = (x * 2).float().t().to(bf16, memory_format=torch.contiguous_format)
        return c * 3

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 2 and "would see a layout changed" in reasons(stats)


def test_layout_change_absorbed_by_a_reduction_is_fine():
    def fn(x):
        c = (x * 2).float().t().to(bf16, memory_format=torch.contiguous_format)
        return (c * 3).sum(0)

    gm, stats = H.check_rewrite(fn, [x_of(bf16)])
    assert n_casts(gm) == 0 and stats.rewritten == 1


def test_graph_without_fake_metadata_is_left_alone():
    gm = fx.symbolic_trace(lambda x: x.float().to(bf16) * 2)
    before = str(gm.graph)
    stats = H.run_pass(gm)
    assert str(gm.graph) == before and stats.matched == 0


def test_same_dtype_copy_that_changes_memory_format_stays_for_an_opaque_op():
    def fn(x):
        c = aten._to_copy(x * 2, dtype=bf16, memory_format=torch.channels_last)
        return H.probe(c)

    gm, stats = H.check_rewrite(fn, [x_of(bf16, (2, 3, 4, 5))])
    assert n_casts(gm) == 1 and "sees the copy's layout" in reasons(stats)


def test_every_new_node_carries_fake_metadata():
    def fn(x):
        w = x.float()
        return H.probe(w.t().reshape(24).to(bf16)), w[1:].unsqueeze(0).to(bf16) * 2

    gm = H.trace(fn, [x_of(bf16)])
    H.run_pass(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert isinstance(node.meta.get("val"), (torch.Tensor, tuple)), node.name


def test_auto_functionalized_arguments_read_versus_written():
    """auto_functionalized (v1) names mutable arguments as kwargs; v2 passes them as bases."""
    from fusewright.patterns.casts import AUTO_FUNCTIONALIZED, UseKind, classify_use

    graph = fx.Graph()
    x, out = graph.placeholder("x"), graph.placeholder("out")
    op = torch.ops.fw_noop_test.write_into.default
    by_name = {getattr(t, "__name__", str(t)): t for t in AUTO_FUNCTIONALIZED}
    v1 = by_name.get("auto_functionalized")
    v2 = by_name.get("auto_functionalized_v2")
    if v1 is not None:
        node = graph.call_function(v1, (op,), {"x": x, "out": out})
        assert classify_use(node, x) is UseKind.OPAQUE
        assert classify_use(node, out) is UseKind.MUTATES
    if v2 is not None:
        node = graph.call_function(v2, (op,), {"x": x, "_out_base_index": 0, "_all_bases": [out]})
        assert classify_use(node, x) is UseKind.OPAQUE
        assert classify_use(node, out) is UseKind.MUTATES
    assert v1 is not None or v2 is not None

"""No-op cast pass under real Inductor compiles (CPU): kernels gone, outputs bitwise identical.

Every case compiles the same function with fusewright off and on (`compile_and_capture`)
and compares: the post-grad graph after the pass, the kernels in Inductor's output code,
and the outputs bit for bit. Twelve compiles in all; the many small variations are
covered on make_fx graphs in test_noop_casts.py and test_noop_casts_property.py.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.fx as fx

from fusewright.passes.graph_utils import insert_call, is_op
from fusewright.patterns.casts import as_cast, match_round_trip
from fusewright.testing import compile_and_capture
from fusewright.tools import output_code
from fusewright.tools.example import example, opaque_gate

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
aten, prims = torch.ops.aten, torch.ops.prims


@torch.library.custom_op("fw_noop_inductor::write_twice", mutates_args=("out",))
def write_twice(x: torch.Tensor, out: torch.Tensor) -> None:
    """Opaque op with a mutable argument: post-grad graphs hold it as auto_functionalized."""
    out.copy_(x * 2)


@write_twice.register_fake
def _(x, out):
    return None


def kernels(run):
    return [k for code in run.codes for k in output_code.parse_kernels(code)]


def computed_kernels(run):
    """Kernels Inductor generated (Triton or C++), i.e. not extern calls or custom ops."""
    return [k for k in kernels(run) if k.kind.startswith("triton") or k.kind == "cpp"]


# graph-diff's no-op kernel detection (tools/output_code.py + tools/kernels.py) marks
# kernels that store what they loaded through lossless casts. Older trees lack it.
HAS_NOOP_DETECTION = "noop_reason" in {f.name for f in dataclasses.fields(output_code.Kernel)}


def noop_kernels(run):
    return [k for k in kernels(run) if k.is_noop]


def allocations(run, dtype: torch.dtype) -> int:
    name = str(dtype)
    return sum(len(re.findall(rf"empty_strided_\w+\([^\n]*{re.escape(name)}\)", code)) for code in run.codes)


def round_trips(graph: fx.Graph) -> int:
    return sum(1 for n in graph.nodes if as_cast(n) is not None and match_round_trip(n) is not None)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a, b):
    flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
        assert torch.equal(bits(x), bits(y))


def off_and_on(fn, inputs, removes: bool = True):
    """Compile with fusewright off and on; outputs must agree bitwise.

    With `removes`, the plugin-on compile must have no no-op kernel left and the
    plugin-off compile (where graph-diff's detection exists) at least one.
    """
    off = compile_and_capture(fn, inputs, enable=False)
    # verify: the manager also runs the graph before and after the pass on random inputs.
    on = compile_and_capture(fn, inputs, config={"strict": True, "verify": True})
    assert_bitwise(off.outputs, on.outputs)
    if removes:
        assert not noop_kernels(on), noop_kernels(on)
        if HAS_NOOP_DETECTION:
            assert noop_kernels(off)
    return off, on


# ---------------------------------------------------------------- removals


def test_round_trips_in_front_of_opaque_ops_lose_their_kernels():
    def fn(x, h, s):
        return (
            opaque_gate(x.float().view(-1, 8).to(bf16)),  # bf16 -> f32 -> view -> bf16
            opaque_gate(h.double().t().to(f16)),  # f16 -> f64 -> permute -> f16
            opaque_gate(s.double().reshape(-1).float()),  # f32 -> f64 -> reshape -> f32
        )

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(8, 16, generator=g).to(bf16), torch.randn(8, 16, generator=g).to(f16),
              torch.randn(8, 16, generator=g))
    off, on = off_and_on(fn, inputs)
    assert len(computed_kernels(off)) == 3  # one copy kernel per round trip
    assert computed_kernels(on) == []
    stats = on.report["eliminate_noop_casts"]
    assert (stats.matched, stats.rewritten) == (3, 3) and stats.details == {"round_trip_layout": 3}
    assert round_trips(on.graphs_after[0]) == 0
    assert sum(1 for n in on.graphs_after[0].nodes if as_cast(n)) == 0


def test_wide_value_with_other_readers_keeps_only_the_upcast():
    def fn(x):
        w = x.float()
        return opaque_gate(w.view(-1, 8).to(bf16)), opaque_gate(w)

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(bf16)
    off, on = off_and_on(fn, (x,), removes=False)
    # Before: one kernel writes the f32 value and the bf16 copy; after: the f32 value only.
    assert allocations(off, bf16) == 1 and allocations(on, bf16) == 0
    if HAS_NOOP_DETECTION:  # the copy is one no-op store of a kernel that also computes
        assert sum(k.noop_stores for k in kernels(off)) == 1
        assert sum(k.noop_stores for k in kernels(on)) == 0
    assert allocations(off, f32) == allocations(on, f32) == 1
    stats = on.report["eliminate_noop_casts"]
    assert stats.rewritten == 1 and stats.details == {"round_trip_layout": 1, "wide_value_kept": 1}
    casts_left = [n for n in on.graphs_after[0].nodes if as_cast(n)]
    assert [n.meta["val"].dtype for n in casts_left] == [f32]


def _inject_same_dtype_conversion(graph: fx.Graph) -> None:
    """Stands for an earlier rewrite that leaves a same-dtype conversion in front of an op.

    (`prims.convert_element_type` to the same dtype lowers to a copy; a post-grad
    `aten._to_copy` cannot occur: Inductor has a decomposition for it and no lowering.)
    """
    for node in list(graph.nodes):
        if is_op(node, torch.ops.fusewright_example.opaque_gate.default):
            x = node.args[0]
            with graph.inserting_before(node):
                converted = insert_call(graph, prims.convert_element_type.default, (x, x.meta["val"].dtype),
                                        like=node)
            node.replace_input_with(x, converted)


def test_same_dtype_conversion_in_front_of_an_opaque_op():
    from torch._inductor import config as inductor_config

    def fn(x):
        return opaque_gate(x)

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).to(bf16)
    # fusewright chains the pass already installed on the hook and runs it first.
    with inductor_config.patch(post_grad_custom_post_pass=_inject_same_dtype_conversion):
        off = compile_and_capture(fn, (x,), config={"eliminate_noop_casts": False})
        on = compile_and_capture(fn, (x,), config={"strict": True})
    assert_bitwise(off.outputs, on.outputs)
    assert len(computed_kernels(off)) == 1  # the copy
    assert computed_kernels(on) == [] and not noop_kernels(on)
    stats = on.report["eliminate_noop_casts"]
    assert stats.rewritten == 1 and stats.details == {"same_dtype": 1}
    assert not any(as_cast(n) for n in on.graphs_after[0].nodes)


def test_round_trip_into_an_auto_functionalized_op():
    def fn(x):
        out = torch.empty_like(x)
        write_twice(x.float().t().contiguous().t().to(bf16), out)
        return out

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)).to(bf16)
    off, on = off_and_on(fn, (x,), removes=False)  # the layout copy is real and stays
    after = on.graphs_after[0]
    (af,) = [n for n in after.nodes if n.op == "call_function" and "auto_functionalized" in str(n.target)]
    assert af.kwargs["x"].meta["val"].dtype == bf16 and not any(as_cast(n) for n in after.nodes)
    # The transposed contiguous copy stays (it is a real layout change), now in bf16 from x directly.
    before_names = [k.name for k in computed_kernels(off)]
    after_names = [k.name for k in computed_kernels(on)]
    assert len(before_names) == len(after_names) == 1
    assert "_to_copy" in before_names[0] and "_to_copy" not in after_names[0]


def test_builtin_example_round_trip_through_a_layout_op():
    model, inputs = example("cpu")
    off, on = off_and_on(model, inputs, removes=False)  # fused into the RoPE kernel: no kernel of its own
    stats = on.report["eliminate_noop_casts"]
    assert stats.rewritten == 1 and stats.details == {"round_trip_layout": 1}
    after = on.graphs_after[0]
    (gate,) = [n for n in after.nodes if is_op(n, torch.ops.fusewright_example.opaque_gate.default)]
    # The op reads a reshape of the bf16 RoPE output, no longer a bf16 copy of an f32 copy.
    assert gate.args[0].meta["val"].dtype == bf16 and as_cast(gate.args[0]) is None
    assert round_trips(after) == 0
    # The round trip had been fused into the RoPE writeback kernel: it leaves that kernel.
    assert len(computed_kernels(off)) == len(computed_kernels(on))
    assert any("_to_copy" in k.name and "slice" in k.name for k in computed_kernels(off))
    assert not any("_to_copy" in k.name and "slice" in k.name for k in computed_kernels(on))


# ---------------------------------------------------------------- refusals


def test_lossy_look_alikes_compile_exactly_as_without_the_plugin():
    def fn(a, b, c, d):
        return (
            opaque_gate(a.to(bf16).view(-1, 8).to(f32)),  # f32 -> bf16 -> f32
            opaque_gate(a.to(f16).t().to(f32)),  # f32 -> f16 -> f32
            opaque_gate(b.to(f16).view(-1, 8).to(bf16)),  # bf16 -> f16 -> bf16
            opaque_gate(c.to(bf16).t().to(f16)),  # f16 -> bf16 -> f16
            opaque_gate(b.float().to(torch.float8_e4m3fn).float().view(-1, 8).to(bf16)),  # through fp8
            opaque_gate(b.float().to(torch.int32).t().float().to(bf16)),  # through an integer
            opaque_gate(d.float().view(-1, 8).to(f16)),  # f64 -> f32 -> f16
            b.float().to(bf16),  # lossless, but the output would alias the input b
        )

    g = torch.Generator().manual_seed(4)
    inputs = (torch.randn(8, 16, generator=g) * 3, (torch.randn(8, 16, generator=g) * 3).to(bf16),
              torch.randn(8, 16, generator=g).to(f16), torch.randn(8, 16, generator=g, dtype=f64))
    off, on = off_and_on(fn, inputs, removes=False)
    stats = on.report["eliminate_noop_casts"]
    assert stats.rewritten == 0
    assert len(noop_kernels(off)) == len(noop_kernels(on))  # the returned copy of b stays
    assert [s.reason for s in stats.skipped] == [] or all("alias a graph input" in s.reason for s in stats.skipped)
    assert str(on.graphs_before[0]) == str(on.graphs_after[0])
    assert [k.name for k in kernels(off)] == [k.name for k in kernels(on)]


# ---------------------------------------------------------------- real models, GPU


@pytest.mark.models
@pytest.mark.parametrize("name", ["llama"])
def test_real_model_compiles_bitwise_identically(name):
    """A tiny transformers model (random weights): no lossless round trip survives Inductor's
    own passes here, so the pass must find nothing and change nothing."""
    pytest.importorskip("transformers")
    from fusewright.tools import model_zoo

    fn, inputs = getattr(model_zoo, name)()
    off = compile_and_capture(fn, inputs, enable=False)
    on = compile_and_capture(fn, inputs, config={"strict": True, "fuse_norm_quant": False, "rewrite_rope": False})
    stats = on.report["eliminate_noop_casts"]
    assert stats.errors == [] and stats.rewritten == 0
    for a, b in zip(torch.utils._pytree.tree_leaves(off.outputs), torch.utils._pytree.tree_leaves(on.outputs)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(bits(a), bits(b))


@pytest.mark.gpu
def test_round_trip_in_front_of_opaque_op_on_cuda():
    def fn(x):
        return opaque_gate(x.float().view(x.shape[0], -1, 128).to(bf16))

    x = torch.randn(64, 1024, device="cuda").to(bf16)
    off, on = off_and_on(fn, (x,))
    assert [k.kind for k in computed_kernels(off)] == ["triton_pointwise"]
    assert computed_kernels(on) == []
    assert on.report["eliminate_noop_casts"].rewritten == 1

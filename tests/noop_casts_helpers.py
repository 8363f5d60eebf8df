"""Shared pieces of the no-op cast tests: test custom ops, running the pass on make_fx graphs."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from fusewright.passes.base import PassContext
from fusewright.passes.config import PassConfig
from fusewright.passes.noop_casts import PASS
from fusewright.passes.report import PassStats
from fusewright.patterns.casts import as_cast, match_round_trip

LIB = "fw_noop_test"


def _define_ops() -> None:
    if hasattr(torch.ops, LIB) and hasattr(getattr(torch.ops, LIB), "probe"):
        return

    @torch.library.custom_op(f"{LIB}::probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        """Opaque op that reports what it was handed: values (exact in f64), strides, offset."""
        layout = torch.tensor([*x.stride(), x.storage_offset()], dtype=torch.float64)
        return torch.cat([x.reshape(-1).to(torch.float64), layout])

    @probe.register_fake
    def _(x):
        return x.new_empty(x.numel() + x.dim() + 1, dtype=torch.float64)

    @torch.library.custom_op(f"{LIB}::scale_", mutates_args=("x",))
    def scale_(x: torch.Tensor) -> None:
        """Opaque op that writes to its argument."""
        x.mul_(3)

    @scale_.register_fake
    def _(x):
        return None

    @torch.library.custom_op(f"{LIB}::write_into", mutates_args=("out",))
    def write_into(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x)

    @write_into.register_fake
    def _(x, out):
        return None


_define_ops()
probe = getattr(torch.ops, LIB).probe.default
scale_ = getattr(torch.ops, LIB).scale_.default


def trace(fn: Callable, inputs: Sequence[torch.Tensor], mode: str = "fake") -> fx.GraphModule:
    return make_fx(fn, tracing_mode=mode)(*inputs)


def run_pass(gm: fx.GraphModule) -> PassStats:
    stats = PassStats()
    PASS.run(gm.graph, PassContext(PassConfig(), stats))
    gm.graph.lint()
    gm.recompile()
    return stats


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so -0.0 != 0.0 and every NaN payload counts)."""
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def remaining_round_trips(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if as_cast(n) is not None and match_round_trip(n) is not None]


def cast_names(graph: fx.Graph) -> set[str]:
    return {n.name for n in graph.nodes if as_cast(n) is not None}


def check_rewrite(fn: Callable, inputs: Sequence[torch.Tensor], mode: str = "fake") -> tuple[fx.GraphModule, PassStats]:
    """Trace, run before, rewrite, run after; outputs must agree exactly. Returns the graph and stats."""
    gm = trace(fn, inputs, mode)
    owned = [t.clone() for t in inputs]
    expected = gm(*owned)
    stats = run_pass(gm)
    actual_inputs = [t.clone() for t in inputs]
    actual = gm(*actual_inputs)
    # Compare aliasing against the inputs each run was given.
    assert_same_outputs_with_inputs(expected, owned, actual, actual_inputs)
    return gm, stats


def assert_same_outputs_with_inputs(expected: Any, in_b: Sequence[torch.Tensor], actual: Any,
                                    in_a: Sequence[torch.Tensor]) -> None:
    flat_b = torch.utils._pytree.tree_leaves(expected)
    flat_a = torch.utils._pytree.tree_leaves(actual)
    assert len(flat_b) == len(flat_a)
    for i, (b, a) in enumerate(zip(flat_b, flat_a)):
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert a.stride() == b.stride(), (i, a.stride(), b.stride())
        assert a.storage_offset() == b.storage_offset(), (i, a.storage_offset(), b.storage_offset())
        assert torch.equal(bits(a), bits(b)), f"output {i} differs"
    pb = {t.untyped_storage().data_ptr(): i for i, t in enumerate(in_b)}
    pa = {t.untyped_storage().data_ptr(): i for i, t in enumerate(in_a)}
    sb = [t.untyped_storage().data_ptr() for t in flat_b]
    sa = [t.untyped_storage().data_ptr() for t in flat_a]
    assert [pb.get(p) for p in sb] == [pa.get(p) for p in sa], "an output's aliasing of the inputs changed"
    assert [[p == q for q in sb] for p in sb] == [[p == q for q in sa] for p in sa], \
        "aliasing between outputs changed"
    for i, (x, y) in enumerate(zip(in_b, in_a)):
        assert torch.equal(bits(x), bits(y)), f"input {i} was mutated differently"

"""Helpers for tests, in this project and in projects that use fusewright.

    from fusewright.testing import compile_and_capture

    run = compile_and_capture(fn, inputs, config={"numerics": "exact"})
    assert run.report["fuse_norm_quant"].rewritten == 2
    run.graphs_before[0], run.graphs_after[0]   # post-grad FX graphs around fusewright

graph-diff's checks as pytest assertions (each failure message names the kernels or
passes involved, like `fusewright graph-diff --expect-*`):

    from fusewright import testing

    diff = testing.graph_diff(model, inputs)          # compiles twice: fusewright off, on
    testing.assert_no_noop_kernels(diff)              # no kernel only copies or round-trips
    testing.assert_fewer_kernels(diff)
    testing.assert_rewrites(diff, fuse_norm_quant=1)
    testing.assert_outputs_close(diff)

    run = testing.compile_and_capture(model, inputs)  # one compile is enough for these:
    testing.assert_no_noop_kernels(run)
    testing.kernels(run), testing.noop_kernels(run)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .passes.api import inductor_options
from .passes.config import PassConfig
from .passes.graph_utils import snapshot
from .passes.report import Report, last_report


class _Recorder(CustomGraphPass):
    """Wraps the post-grad manager: keeps a copy of each graph before and after it runs."""

    def __init__(self, inner: Any, before: list, after: list) -> None:
        self.inner, self.before, self.after = inner, before, after

    def __call__(self, graph: fx.Graph) -> None:
        self.before.append(snapshot(graph))
        if self.inner is not None:
            self.inner(graph)
        self.after.append(snapshot(graph))

    def uuid(self) -> Any:
        return None  # never serve a captured compile from the cache: the capture would be empty


@dataclasses.dataclass
class CompileRun:
    outputs: Any
    report: Report
    graphs_before: list[fx.Graph]
    graphs_after: list[fx.Graph]
    codes: list[str]


def count_targets(graph: fx.Graph, target: Any) -> int:
    """How many call_function nodes of `graph` call `target` (an overload or a packet)."""
    from .passes.graph_utils import is_op

    return sum(1 for node in graph.nodes if is_op(node, target))


def compile_and_capture(
    fn: Callable,
    inputs: Sequence[Any],
    config: PassConfig | dict | str | None = None,
    *,
    enable: bool = True,
    dynamic: bool | None = None,
) -> CompileRun:
    """Compile `fn` with Inductor (fusewright on unless `enable=False`), run it on `inputs`.

    Dynamo is reset first and Inductor's FX graph cache is off, so every call really
    compiles. Returns the outputs, fusewright's report for this compile, the post-grad
    graphs before and after fusewright, and Inductor's output code.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    options = dict(inductor_options(config)) if enable else {}
    before: list[fx.Graph] = []
    after: list[fx.Graph] = []
    options["post_grad_custom_post_pass"] = _Recorder(options.get("post_grad_custom_post_pass"), before, after)
    torch._dynamo.reset()
    with inductor_config.patch({"fx_graph_cache": False, "fx_graph_remote_cache": False}):
        compiled = torch.compile(fn, options=options, dynamic=dynamic)
        with torch.no_grad():
            outputs, codes = run_and_get_code(compiled, *inputs)
    return CompileRun(outputs, last_report(), before, after, list(codes))


# ----------------------------------------------------------------------------- graph-diff
def graph_diff(fn: Callable, inputs: Sequence[Any], config: PassConfig | dict | str | None = None, *,
               dynamic: bool | None = None, rtol: float | None = None, atol: float | None = None):
    """Compile `fn` with fusewright off, then on; return the `GraphDiffReport` (kernels, FX
    diff, pass counts, numerics) that `fusewright graph-diff` prints."""
    from .tools.graph_diff import live_diff

    return live_diff(fn, inputs, config, dynamic=dynamic, rtol=rtol, atol=atol)


def kernels(source: Any) -> list:
    """The kernels launched by a `CompileRun`, an output-code string or a list of them, or
    the final side of a `GraphDiffReport`; each a `fusewright.tools.output_code.Kernel`."""
    from .tools.graph_diff import GraphDiffReport
    from .tools.output_code import parse_output_code

    if isinstance(source, GraphDiffReport):
        return (source.after or source.before).kernels
    if isinstance(source, CompileRun):
        source = source.codes
    if isinstance(source, str):
        source = [source]
    return [k for i, code in enumerate(source) for k in parse_output_code(code, graph=i).kernels]


def noop_kernels(source: Any) -> list:
    """The kernels that only load, convert dtype losslessly and store back (see `kernels`)."""
    return [k for k in kernels(source) if k.is_noop]


def _describe(ks: list) -> str:
    return "; ".join(f"{k.name} ({k.noop_reason or k.kind})" for k in ks)


def assert_no_noop_kernels(source: Any) -> None:
    """Fail if any launched kernel is a no-op (identity copy, lossless round trip)."""
    found = noop_kernels(source)
    assert not found, f"{len(found)} no-op kernel(s) remain: {_describe(found)}"


def assert_fewer_kernels(diff: Any, by: int = 1) -> None:
    """Fail unless fusewright's compile launches at least `by` fewer kernels than stock Inductor."""
    before, after = len(diff.before.kernels), len(diff.after.kernels)
    assert after <= before - by, (
        f"expected at least {by} fewer kernel(s): {before} -> {after}; "
        f"removed: {[m.before.name for m in diff.kernel_diff if m.status == 'removed']}, "
        f"added: {[m.after.name for m in diff.kernel_diff if m.status == 'added']}")


def assert_rewrites(source: Any, **expected: int) -> None:
    """Fail unless each named pass rewrote exactly that many constructs:
    `assert_rewrites(run_or_diff, fuse_norm_quant=1, eliminate_noop_casts=0)`."""
    rewrites = source.report.rewrites() if isinstance(source, CompileRun) else source.rewrites
    wrong = {name: (want, rewrites.get(name, 0)) for name, want in expected.items()
             if rewrites.get(name, 0) != want}
    assert not wrong, "unexpected rewrite counts: " + ", ".join(
        f"{name} expected {want}, got {got}" for name, (want, got) in wrong.items())


def assert_outputs_close(diff: Any) -> None:
    """Fail if the outputs with fusewright differ from stock Inductor's beyond tolerance."""
    n = diff.numerics
    assert n.ok, f"outputs differ: max abs diff {n.max_abs_diff}; {n.detail}"

"""Helpers for tests, in this project and in projects that use fusewright.

    from fusewright.testing import compile_and_capture

    run = compile_and_capture(fn, inputs, config={"numerics": "exact"})
    assert run.report["fuse_norm_quant"].rewritten == 2
    run.graphs_before[0], run.graphs_after[0]   # post-grad FX graphs around fusewright
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

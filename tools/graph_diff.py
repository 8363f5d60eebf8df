"""Compile a model with fusewright off and on, and compare kernels and outputs."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from ..passes.api import inductor_options
from ..passes.config import PassConfig
from ..passes.report import last_report
from .output_code import Kernel, parse_kernels


@dataclasses.dataclass
class CompileCapture:
    outputs: Any
    codes: list[str]
    kernels: list[Kernel]

    def summary(self) -> dict:
        return {
            "kernel_count": len(self.kernels),
            "noop_kernel_count": sum(k.is_noop for k in self.kernels),
            "kernels": [k.to_dict() for k in self.kernels],
        }


@dataclasses.dataclass
class LiveDiff:
    before: CompileCapture
    after: CompileCapture
    rewrites: dict[str, int]
    max_abs_diff: float
    ok: bool

    def to_dict(self) -> dict:
        return {
            "before": self.before.summary(),
            "after": self.after.summary(),
            "rewrites": self.rewrites,
            "numerics": {"max_abs_diff": self.max_abs_diff, "ok": self.ok},
        }


def compile_and_capture(fn: Callable, inputs: Sequence[Any], options: dict | None, dynamic: bool | None = None) -> CompileCapture:
    """Compile `fn` with fresh Dynamo state and no caches; run it once; keep its output code."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with inductor_config.patch({"fx_graph_cache": False, "fx_graph_remote_cache": False}):
        compiled = torch.compile(fn, options=options or {}, dynamic=dynamic)
        with torch.no_grad():
            outputs, codes = run_and_get_code(compiled, *inputs)
    kernels = [k for code in codes for k in parse_kernels(code)]
    return CompileCapture(outputs, list(codes), kernels)


def max_abs_diff(a: Any, b: Any) -> float:
    worst = 0.0
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            diff = (x.float() - y.float()).abs().nan_to_num(nan=float("inf"))
            worst = max(worst, diff.max().item() if diff.numel() else 0.0)
    return worst


def live_diff(fn: Callable, inputs: Sequence[Any], config: PassConfig, atol: float = 0.0,
              dynamic: bool | None = None) -> LiveDiff:
    before = compile_and_capture(fn, inputs, None, dynamic)
    after = compile_and_capture(fn, inputs, inductor_options(config), dynamic)
    rewrites = last_report().rewrites()
    diff = max_abs_diff(before.outputs, after.outputs)
    return LiveDiff(before, after, rewrites, diff, diff <= atol)

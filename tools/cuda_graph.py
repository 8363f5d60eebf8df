"""CUDA-graph capture shared by the benchmarks that replay a call from a graph."""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], calls: int = 1) -> "torch.cuda.CUDAGraph":
    """`calls` calls of `fn` captured in one CUDA graph, replayed once before returning.

    `fn` is first run three times on a side stream: a graph may only capture work whose
    one-time costs (autotuning, allocations, lazy inits) are already paid."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return g

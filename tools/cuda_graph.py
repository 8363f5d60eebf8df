"""CUDA-graph capture and L2 flushing shared by the benchmarks that replay a call from a graph."""

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


FLUSH_MODES = ("read", "write")


def flush_l2(buf: torch.Tensor, mode: str = "read") -> None:
    """Evict L2 by streaming `buf` (make it several times the L2 size) through it.

    "read" sums it, leaving L2 full of clean lines. "write" zeroes it, as
    `triton.testing.do_bench` does, leaving L2 full of dirty lines that the next kernel
    must write back as it evicts them: on an H100 a 50 MB copy measured 2.32 TB/s after
    a write flush and 3.05 TB/s after a read flush (docs/benchmarks.md)."""
    if mode == "write":
        buf.zero_()
    elif mode == "read":
        buf.view(torch.int32).sum()
    else:
        raise ValueError(f"flush mode must be one of {FLUSH_MODES}, got {mode!r}")

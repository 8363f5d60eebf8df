"""Which ptxas assembles the Triton kernels that a benchmark compiles.

Inductor points `TRITON_PTXAS_PATH` at the ptxas in `torch/bin` (CUDA 13.0 with torch
2.11+cu130, where Triton 3.6 bundles 12.8) when it compiles a Triton kernel, and only then:
a process whose Inductor compiles all hit their caches keeps Triton's own. Seen in session
10: a sweep started on a machine where an earlier process had compiled the same graph ran
with Triton's ptxas. The two can assemble a kernel differently (the act-quant silu kernel:
128 against 168 registers and 11% in time, docs/benchmarks.md), so the benchmarks choose
it themselves instead of leaving it to the state of a cache.
"""

from __future__ import annotations

import os

ENV = "TRITON_PTXAS_PATH"


def use_torch_ptxas() -> str:
    """Point TRITON_PTXAS_PATH at torch's ptxas, as Inductor's first kernel compile does,
    unless it is set already (the user's choice stands). Returns the ptxas in effect:
    a path, or "triton's own" where torch ships none (CPU builds)."""
    if os.environ.get(ENV) is None:
        import torch

        path = os.path.join(os.path.dirname(torch.__file__), "bin", "ptxas")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            os.environ[ENV] = path
    return os.environ.get(ENV, "triton's own")

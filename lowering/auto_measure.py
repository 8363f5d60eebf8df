"""Measuring implementations for `auto`, in a separate process.

Why a subprocess: `auto` decides while Inductor is compiling (inside a post-grad
pass), and torch.compile cannot be entered again from there; an aten implementation is
only worth measuring once Inductor has compiled it. The child imports the module of
each implementation (which registers it), checks that it got the same implementation
(same uuid), builds random inputs of the call's shapes, compiles each implementation
with stock Inductor and times it: on CUDA with events, L2 flushed before every run,
median of 30; elsewhere with a wall clock, median of 10. It prints one JSON object,
{name: seconds or error message}.

    python -m fusewright.lowering.auto_measure < request.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import torch

from .registry import Implementation, OpCall, implementations

TIMEOUT_S = 300


def _request(call: OpCall, impls: Sequence[Implementation]) -> dict[str, Any]:
    return {
        "op": call.op,
        "variant": call.variant,
        "params": dict(call.params),
        "tensors": [
            [role, None if t is None else {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                           "device": t.device}]
            for role, t in call.tensors
        ],
        "impls": [{"name": i.name, "module": i.module, "uuid": i.uuid()} for i in impls],
    }


def measure_in_subprocess(call: OpCall, impls: Sequence[Implementation]) -> dict[str, float | str]:
    """The default `Measurer`: {name: seconds per call or why it could not be measured}."""
    env = dict(os.environ, FUSEWRIGHT_AUTO_MEASURE="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fusewright.lowering.auto_measure"],
        input=json.dumps(_request(call, impls)), capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"measuring subprocess failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(lines[-1])


def _make(info: dict[str, Any] | None) -> torch.Tensor | None:
    if info is None:
        return None
    dtype = getattr(torch, info["dtype"])
    shape = list(info["shape"])
    if any(s < 0 for s in shape):
        # unknown (dynamic) sizes: a mid-sized token count, 1 elsewhere
        shape = [1024 if i == 0 and s < 0 else (1 if s < 0 else s) for i, s in enumerate(shape)]
    device = info["device"]
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=torch.float32, device=device).to(dtype)


def _time(fn, args, device: str) -> float:
    for _ in range(3):
        fn(*args)
    if device == "cuda":
        flush = torch.empty(64 * 1024 * 1024, dtype=torch.int8, device="cuda")
        times = []
        for _ in range(30):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(request: dict[str, Any]) -> dict[str, float | str]:
    import importlib

    roles = [role for role, _ in request["tensors"]]
    tensors = [_make(info) for _, info in request["tensors"]]
    device = next((info["device"] for _, info in request["tensors"] if info), "cpu")
    params = request["params"]
    out: dict[str, float | str] = {}
    for spec in request["impls"]:
        name = spec["name"]
        try:
            if spec["module"] and spec["module"] != "__main__":
                importlib.import_module(spec["module"])
            impl = implementations(request["op"]).get(name)
            if impl is None:
                raise LookupError(f"not registered after importing {spec['module'] or 'nothing'}")
            if impl.uuid() != spec["uuid"]:
                raise LookupError("the implementation in a fresh process differs from the one in the compiler")

            def fn(*ts, impl=impl):
                return impl.run(dict(zip(roles, ts)), params)

            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
            out[name] = _time(compiled, tensors, device)
        except Exception as exc:  # noqa: BLE001 - reported back as "not measurable"
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def main() -> int:
    request = json.loads(sys.stdin.read())
    print(json.dumps(measure(request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""Decomposable aten sequences for `rms_norm` and `fused_add_rms_norm`, registered as `aten`.

The ops are the ones a Llama-style RMSNorm leaves in a post-grad graph, in that order,
so Inductor fuses them with their neighbours and the norm->quant matcher, which
anchors on ``rsqrt(mean(x*x) + eps)``, sees an ordinary RMSNorm::

    x32 = convert_element_type(x, f32)              # only when x is not f32
    var = mean(pow(x32, 2), [-1], keepdim=True)
    n   = mul(x32, rsqrt(add(var, eps)))
    y   = mul(weight, convert_element_type(n, x.dtype))   # cast back, then weight

`fused_add_rms_norm` first forms ``s = add(x, residual)`` in x's dtype (one rounding,
as vLLM's CUDA kernel does) and normalises ``s``; it returns ``(y, s)``.

Run with `eager_emit` the sequence is bitwise what an eager module spelling the same
math computes; that is how tests define the stand-in opaque ops.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .registry import Emit, OpCall, register

aten = torch.ops.aten
prims = torch.ops.prims


def rms_norm(emit: Emit, x: Any, weight: Any, eps: float, dtype: torch.dtype) -> Any:
    """The normalised `x` (of dtype `dtype`) times `weight` (None: no weight)."""
    h = x if dtype == torch.float32 else emit(prims.convert_element_type.default, x, torch.float32)
    var = emit(aten.mean.dim, emit(aten.pow.Tensor_Scalar, h, 2), [-1], True)
    n = emit(aten.mul.Tensor, h, emit(aten.rsqrt.default, emit(aten.add.Tensor, var, eps)))
    if dtype != torch.float32:
        n = emit(prims.convert_element_type.default, n, dtype)
    return n if weight is None else emit(aten.mul.Tensor, weight, n)


def fused_add_rms_norm(emit: Emit, x: Any, residual: Any, weight: Any, eps: float,
                       dtype: torch.dtype) -> tuple[Any, Any]:
    """(rms_norm(x + residual), x + residual), the sum rounded to `dtype` once."""
    s = emit(aten.add.Tensor, x, residual)
    return rms_norm(emit, s, weight, eps, dtype), s


def _floating(call: OpCall) -> str | None:
    x = call.tensor("x")
    if x is None or not x.dtype.is_floating_point or x.dtype.itemsize < 2:
        return f"x must be a float16/bfloat16/float32 tensor, got {x.dtype if x else None}"
    w = call.tensor("weight")
    if w is not None and (not w.shape or w.shape[-1] != x.shape[-1]):
        return f"weight of shape {w.shape} does not match the last dim of x {x.shape}"
    return None


def _fused_supported(call: OpCall) -> str | None:
    problem = _floating(call)
    r, x = call.tensor("residual"), call.tensor("x")
    if problem is None and (r is None or r.dtype != x.dtype or r.shape != x.shape):
        problem = "residual must have x's shape and dtype"
    return problem or True


def _dtype(t: Mapping[str, Any], p: Mapping[str, Any]) -> torch.dtype:
    # Graph nodes carry no dtype a lowering module may read, so callers pass x's dtype
    # by name in the params (a string keeps the params JSON-able for measuring).
    name = p.get("dtype")
    return getattr(torch, name) if isinstance(name, str) else t["x"].dtype


def _build_rms_norm(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> Any:
    return rms_norm(emit, t["x"], t.get("weight"), float(p["eps"]), _dtype(t, p))


def _build_fused(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> tuple[Any, Any]:
    return fused_add_rms_norm(emit, t["x"], t["residual"], t.get("weight"), float(p["eps"]), _dtype(t, p))


register("rms_norm", "aten", _build_rms_norm, supports=lambda call: _floating(call) or True, replace=True)
register("fused_add_rms_norm", "aten", _build_fused, supports=_fused_supported, replace=True)

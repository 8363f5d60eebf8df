"""`torch.ops.fusewright.rms_norm` / `fused_add_rms_norm`: the fused RMSNorm ops, registered as `triton`.

    y    = torch.ops.fusewright.rms_norm(x, weight, eps)
    y, s = torch.ops.fusewright.fused_add_rms_norm(x, residual, weight, eps)   # s = x + residual

x: `[..., H]` float32/bfloat16/float16 with a unit stride on H; weight: `[H]` of x's dtype
or None; residual: x's shape and dtype. Outputs are contiguous, in x's dtype. The math
is that of the `aten` implementation (`rms_norm_aten.py`); the reference below spells it
with torch ops and is the CPU implementation.

On CUDA the op runs the Triton kernel (`rms_norm_triton`) through
`torch.library.triton_op` + `wrap_triton`, so Inductor sees the kernel inside a
compiled graph; the token count is read from shapes only (dynamic, no host sync).
Registered in the lowering registry as `triton` for `rms_norm` and
`fused_add_rms_norm`: supported on CUDA (or anywhere under TRITON_INTERPRET=1, where
tests run it), for bf16/f16/f32 x with a unit stride on the last dim, H <= 32768 and a
weight of x's dtype.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Mapping, Optional

import torch
from torch.library import triton_op, wrap_triton

from . import rms_norm_triton
from .registry import Emit, OpCall, register


# ------------------------------------------------------------------ reference
def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The aten spelling: f32 statistic, one rounding to x's dtype, then the weight."""
    h = x.to(torch.float32)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = n.to(x.dtype)
    return (n if weight is None else weight * n).contiguous()


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None) -> None:
    if x.dim() < 1 or x.dtype not in rms_norm_triton.SUPPORTED_DTYPES:
        raise TypeError(f"fusewright.rms_norm: x must be a float32/bfloat16/float16 tensor, got "
                        f"{x.dtype} of shape {tuple(x.shape)}")
    if weight is not None and (weight.shape != x.shape[-1:] or weight.dtype != x.dtype):
        raise ValueError(f"fusewright.rms_norm: weight must be [{x.shape[-1]}] {x.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"fusewright.fused_add_rms_norm: residual must be {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")


# ------------------------------------------------------------------ the kernel path
def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _launch(kernel, x, residual, weight, eps, interpret=False):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = None if weight is None else weight.contiguous()
    rms_norm_triton.launch(kernel, _rows(x), None if residual is None else _rows(residual), w,
                           y.view(-1, x.shape[-1]), None if s is None else s.view(-1, x.shape[-1]), eps,
                           interpret=interpret)
    return y, s


@triton_op("fusewright::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    _check(x, weight)
    if x.device.type != "cuda":
        # torch.compile traces a triton_op's body on every device: elsewhere than CUDA
        # the body is the reference math, which Inductor compiles like any other code
        return rms_norm_reference(x, weight, eps)
    return _launch(wrap_triton(rms_norm_triton.rms_norm_kernel), x, None, weight, eps)[0]


@triton_op("fusewright::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, residual)
    if x.device.type != "cuda":
        s = (x + residual).contiguous()
        return rms_norm_reference(s, weight, eps), s
    y, s = _launch(wrap_triton(rms_norm_triton.rms_norm_kernel), x, residual, weight, eps)
    return y, s


@rms_norm.register_kernel("cpu")
def _rms_norm_cpu(x, weight, eps):
    _check(x, weight)
    return rms_norm_reference(x, weight, eps)


@fused_add_rms_norm.register_kernel("cpu")
def _fused_cpu(x, residual, weight, eps):
    _check(x, weight, residual)
    s = (x + residual).contiguous()
    return rms_norm_reference(s, weight, eps), s


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    _check(x, weight)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@fused_add_rms_norm.register_fake
def _fused_fake(x, residual, weight, eps):
    _check(x, weight, residual)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def run_interpreted(x, residual, weight, eps):
    """The Triton kernel itself on CPU tensors (tests): (y, s or None).

    Needs TRITON_INTERPRET=1 in the environment before Triton was first imported."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("run_interpreted() needs TRITON_INTERPRET=1 set before triton is imported")
    return _launch(rms_norm_triton.rms_norm_kernel, x, residual, weight, eps, interpret=True)


# ------------------------------------------------------------------ lowering registry
def _build_rms_norm(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> Any:
    return emit(torch.ops.fusewright.rms_norm.default, t["x"], t.get("weight"), float(p["eps"]))


def _build_fused(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> tuple[Any, Any]:
    out = emit(torch.ops.fusewright.fused_add_rms_norm.default, t["x"], t["residual"], t.get("weight"),
               float(p["eps"]))
    return emit(operator.getitem, out, 0), emit(operator.getitem, out, 1)


def _supported(call: OpCall) -> str | None:
    x = call.tensor("x")
    if x is None:
        return "no x"
    if x.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # elsewhere the op runs its reference math: nothing a fused kernel would add
        return f"the Triton kernel runs on CUDA (x is on {x.device}; TRITON_INTERPRET=1 allows it anywhere)"
    problem = rms_norm_triton.supports(x.shape[-1] if x.shape else 0, x.dtype)
    if problem:
        return problem
    if x.stride and x.stride[-1] != 1:
        return "x's last dim is not contiguous"
    w = call.tensor("weight")
    if w is not None and (w.dtype != x.dtype or tuple(w.shape) != tuple(x.shape[-1:])):
        return f"weight must be [{x.shape[-1]}] {x.dtype} (the aten sequence would promote another dtype)"
    r = call.tensor("residual")
    if call.op == "fused_add_rms_norm":
        if r is None or r.dtype != x.dtype or tuple(r.shape) != tuple(x.shape):
            return "residual must have x's shape and dtype"
        if r.stride and r.stride[-1] != 1:
            return "residual's last dim is not contiguous"
    return None


def _register() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sources = (os.path.join(here, "rms_norm_ops.py"), os.path.join(here, "rms_norm_triton.py"))
    register("rms_norm", "triton", _build_rms_norm, supports=_supported, source=sources, replace=True)
    register("fused_add_rms_norm", "triton", _build_fused, supports=_supported, source=sources, replace=True)


_register()


# ------------------------------------------------------------------ auto
def shipped_choice_for_call(call: OpCall, device_name: str, candidates: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """`auto` for `rms_norm` / `fused_add_rms_norm` on CUDA between the built-in aten and triton: aten.

    Timing the two in isolation (what `auto` measures) misses what the choice decides:
    the aten sequence is fused by Inductor with its neighbours (the residual add, a cast,
    the quantization the norm->quant pass then fuses into one kernel), while the fused
    op is a wall Inductor cannot fuse across. So aten is kept unless measuring is asked
    for explicitly (FUSEWRIGHT_AUTO_MEASURE=1) or a user-registered implementation is a
    candidate (then `auto` measures, as for any op).
    """
    from .auto import ENV_MEASURE

    if call.op not in ("rms_norm", "fused_add_rms_norm") or "aten" not in candidates or call.device_type != "cuda":
        return None  # elsewhere measuring is off by default and the registry's rule says aten
    if any(c not in ("aten", "triton") for c in candidates):
        return None
    if os.environ.get(ENV_MEASURE, "").strip().lower() in ("1", "true", "on", "yes"):
        return None
    return "aten", ("rule for cuda: aten is decomposable: Inductor fuses it with its neighbours (add, casts, "
                    "a quant tail the norm->quant pass fuses), which an isolated timing of the fused kernel "
                    "cannot see; "
                    f"{ENV_MEASURE}=1 measures instead")

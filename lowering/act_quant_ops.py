"""The fused activation -> quantization op: `torch.ops.fusewright.act_quant`.

    act_quant(Tensor x, Tensor? up, str spec) -> Tensor[]      # [q, scale]

`spec` is `ActQuantSpec.to_str()` (lowering/act_quant_spec.py). Implementations: fake
(shapes only, SymInt token counts), CPU (the reference), CUDA
(`fusewright.lowering.act_quant_triton.launch(spec, x, up)` when that module imports,
else the reference).

In the lowering registry the semantic op `act_quant` has two implementations: `triton`
(this op) and `none` (keep the model's nodes: Inductor's own kernel). There is no
separate aten sequence: the model's spelling *is* the decomposable form.
"""

from __future__ import annotations

import functools
import operator
import os
from typing import Optional

import torch

from .act_quant_reference import reference
from .act_quant_spec import ActQuantSpec
from .norm_quant_reference import col_major_strides

OP_NAME = "fusewright::act_quant"


@functools.lru_cache(maxsize=1)
def _triton_launch():
    """The Triton launcher, or None when the Triton module is missing or fails to import."""
    try:
        from . import act_quant_triton
    except Exception:  # noqa: BLE001 - no Triton (or a broken one) means: use the reference
        return None
    return getattr(act_quant_triton, "launch", None)


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types=("cpu",))
def act_quant(x: torch.Tensor, up: Optional[torch.Tensor], spec: str) -> list[torch.Tensor]:
    return list(reference(ActQuantSpec.from_str(spec), x, up))


@act_quant.register_kernel("cuda")
def _cuda(x, up, spec):
    parsed = ActQuantSpec.from_str(spec)
    launch = _triton_launch()
    if launch is not None:
        return list(launch(parsed, x, up))
    return list(reference(parsed, x, up))


@act_quant.register_fake
def _fake(x, up, spec):
    return fake_outputs(ActQuantSpec.from_str(spec), x)


def fake_outputs(spec: ActQuantSpec, x: torch.Tensor) -> list[torch.Tensor]:
    """Empty tensors with the shapes, dtypes and strides of the outputs (no data reads)."""
    shape = tuple(x.shape)
    q = x.new_empty(shape, dtype=spec.quant.out_dtype)
    sshape = spec.scale_shape(shape)
    if spec.quant.col_major:
        s = x.new_empty_strided(sshape, col_major_strides(sshape), dtype=torch.float32)
    else:
        s = x.new_empty(sshape, dtype=torch.float32)
    return [q, s]


def call(spec: ActQuantSpec, x: torch.Tensor, up: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Convenience: run the op with a spec object."""
    return torch.ops.fusewright.act_quant(x, up, spec.to_str())


# ------------------------------------------------------------------ lowering registry
def _build_op(emit, tensors, params):
    out = emit(torch.ops.fusewright.act_quant.default, tensors["x"], tensors.get("up"), params["spec"])
    return tuple(emit(operator.getitem, out, i) for i in range(2))


def _build_none(emit, tensors, params):
    """The model's own spelling, for measuring: the reference written in aten ops."""
    from .act_quant_reference import activation
    from .norm_quant_reference import quantize

    spec = ActQuantSpec.from_str(params["spec"])  # run eagerly whatever `emit` is: the pass never builds `none`
    h = activation(spec, tensors["x"], tensors.get("up"))
    return quantize(spec.quant, h, h.to(torch.float32), spec.numerics)


def _supported(call) -> str | None:
    x = call.tensor("x")
    try:
        spec = ActQuantSpec.from_str(call.variant)
    except ValueError as exc:
        return f"bad spec: {exc}"
    if x is None or x.dtype != spec.input_dtype:
        return "x's dtype differs from the spec's input dtype"
    if x.shape and isinstance(x.shape[-1], int) and x.shape[-1] > 0:
        try:
            spec.check_hidden(x.shape[-1])
        except ValueError as exc:
            return str(exc)
    return None


def _op_supported(call) -> str | None:
    """The fused op: on CUDA the Triton kernel's limits apply (elsewhere it runs the reference)."""
    problem = _supported(call)
    if problem or call.device_type != "cuda":
        return problem
    try:
        from . import act_quant_triton
    except Exception as exc:  # noqa: BLE001 - the CUDA impl falls back to the reference
        return f"Triton kernel unavailable ({type(exc).__name__}: {exc})"
    x = call.tensor("x")
    if x is None or not x.shape or not isinstance(x.shape[-1], int) or x.shape[-1] <= 0:
        return None
    return act_quant_triton.supports(ActQuantSpec.from_str(call.variant), x.shape[-1])


def _register() -> None:
    from . import registry

    here = os.path.dirname(os.path.abspath(__file__))
    srcs = tuple(os.path.join(here, f) for f in ("act_quant_ops.py", "act_quant_reference.py", "act_quant_spec.py"))
    registry.register("act_quant", "none", _build_none, supports=_supported, source=srcs, replace=True)
    registry.register("act_quant", "triton", _build_op, supports=_op_supported,
                      source=srcs + (os.path.join(here, "act_quant_triton.py"),), replace=True)


_register()


def op_call(spec: ActQuantSpec, x, up=None):
    """The registry's description of one fused call (real or fake tensors)."""
    from .registry import OpCall

    return OpCall.make("act_quant", {"x": x, "up": up}, variant=spec.to_str(), spec=spec.to_str())


def choose_lowering(spec: ActQuantSpec, x, up=None, priority=("auto",)):
    """Which implementation the pass splices in: a `registry.Choice` (`none` keeps the graph)."""
    from .registry import choose

    return choose(op_call(spec, x, up), priority)

"""The fused RMSNorm -> quantization op: `torch.ops.fusewright.rms_norm_quant`.

    rms_norm_quant(Tensor x, Tensor? weight, Tensor? residual, Tensor? scale, str spec) -> Tensor[]

`spec` is `NormQuantSpec.to_str()`; the outputs are those of
`norm_quant_reference.reference` (q, then scale for dynamic kinds, then the new
residual, then the normalised tensor when requested). One op serves every variant:
the spec string is a compile-time constant in the graph, so Inductor treats each
variant as its own call without needing one registered op per variant.

Implementations: fake (shapes only, SymInt token counts), CPU (the reference), CUDA
(`fusewright.lowering.norm_quant_triton.launch(spec, x, weight, residual, scale)` when
that module imports, else the reference).
"""

from __future__ import annotations

import functools
import operator
from typing import Optional

import torch

from .norm_quant_reference import col_major_strides, reference
from .norm_quant_spec import NormQuantSpec

OP_NAME = "fusewright::rms_norm_quant"


@functools.lru_cache(maxsize=1)
def _triton_launch():
    """The Triton launcher, or None when the Triton module is missing or fails to import."""
    try:
        from . import norm_quant_triton
    except Exception:  # noqa: BLE001 - no Triton (or a broken one) means: use the reference
        return None
    return getattr(norm_quant_triton, "launch", None)


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types=("cpu",))
def rms_norm_quant(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    spec: str,
) -> list[torch.Tensor]:
    return list(reference(NormQuantSpec.from_str(spec), x, weight, residual, scale))


@rms_norm_quant.register_kernel("cuda")
def _cuda(x, weight, residual, scale, spec):
    parsed = NormQuantSpec.from_str(spec)
    launch = _triton_launch()
    if launch is not None:
        return list(launch(parsed, x, weight, residual, scale))
    return list(reference(parsed, x, weight, residual, scale))


@rms_norm_quant.register_fake
def _fake(x, weight, residual, scale, spec):
    return fake_outputs(NormQuantSpec.from_str(spec), x)


def fake_outputs(spec: NormQuantSpec, x: torch.Tensor) -> list[torch.Tensor]:
    """Empty tensors with the shapes, dtypes and strides of the outputs (no data reads)."""
    shape = tuple(x.shape)
    outs = [x.new_empty(shape, dtype=spec.quant.out_dtype)]
    if spec.quant.dynamic:
        sshape = spec.scale_shape(shape)
        if spec.quant.col_major:
            outs.append(x.new_empty_strided(sshape, col_major_strides(sshape), dtype=torch.float32))
        else:
            outs.append(x.new_empty(sshape, dtype=torch.float32))
    if spec.norm.residual != "none":
        outs.append(x.new_empty(shape, dtype=spec.norm.input_dtype))
    if spec.return_normalized:
        outs.append(x.new_empty(shape, dtype=spec.norm.out_dtype))
    return outs


def call(spec: NormQuantSpec, x, weight=None, residual=None, scale=None) -> list[torch.Tensor]:
    """Convenience: run the op with a spec object."""
    return torch.ops.fusewright.rms_norm_quant(x, weight, residual, scale, spec.to_str())


# ------------------------------------------------------------------ lowering registry
# Two implementations of the semantic op `rms_norm_quant` (tensors x, weight, residual,
# scale; params: spec string, ndim of x): `aten`, the canonical sequence Inductor fuses
# on its own, and `triton`, this fused op (its Triton kernel on CUDA, the reference on
# CPU). `auto` picks between them by measurement on CUDA (lowering/auto.py) and uses
# the aten sequence elsewhere.


def _build_aten(emit, tensors, params):
    from .norm_quant_aten import emit_sequence

    return emit_sequence(
        emit,
        NormQuantSpec.from_str(params["spec"]),
        tensors["x"],
        tensors.get("weight"),
        tensors.get("residual"),
        tensors.get("scale"),
        int(params["ndim"]),
    )


def _build_op(emit, tensors, params):
    spec = params["spec"]
    out = emit(
        torch.ops.fusewright.rms_norm_quant.default,
        tensors["x"],
        tensors.get("weight"),
        tensors.get("residual"),
        tensors.get("scale"),
        spec,
    )
    return tuple(emit(operator.getitem, out, i) for i in range(len(NormQuantSpec.from_str(spec).output_names())))


def _supported(call) -> str | None:
    x = call.tensor("x")
    try:
        spec = NormQuantSpec.from_str(call.variant)
    except ValueError as exc:
        return f"bad spec: {exc}"
    if x is None or x.dtype != spec.norm.input_dtype:
        return "x's dtype differs from the spec's input dtype"
    if x.shape and x.shape[-1] > 0:
        try:
            spec.check_hidden(x.shape[-1])
        except ValueError as exc:
            return str(exc)
    return None


def _op_supported(call) -> str | None:
    """The fused op: on CUDA its Triton kernel's limits apply (elsewhere it runs the reference)."""
    problem = _supported(call)
    if problem or call.device_type != "cuda":
        return problem
    try:
        from . import norm_quant_triton
    except Exception as exc:  # noqa: BLE001 - the CUDA impl falls back to the reference
        return f"Triton kernel unavailable ({type(exc).__name__}: {exc})"
    check = getattr(norm_quant_triton, "supports", None)
    x = call.tensor("x")
    if check is None or x is None or not x.shape or x.shape[-1] <= 0:
        return None
    return check(NormQuantSpec.from_str(call.variant), x.shape[-1])


def _triton_source() -> str | None:
    import importlib.util

    found = importlib.util.find_spec(__package__ + ".norm_quant_triton")
    return found.origin if found is not None else None


def _register() -> None:
    import os

    from . import registry

    here = os.path.dirname(os.path.abspath(__file__))
    registry.register(
        "rms_norm_quant", "aten", _build_aten, supports=_supported,
        source=os.path.join(here, "norm_quant_aten.py"), replace=True,
    )
    registry.register(
        "rms_norm_quant", "triton", _build_op, supports=_op_supported, source=_triton_source(), replace=True,
    )


_register()


def op_call(spec: NormQuantSpec, x, weight=None, residual=None, scale=None):
    """The registry's description of one fused call (real or fake tensors)."""
    from .registry import OpCall

    return OpCall.make(
        "rms_norm_quant",
        {"x": x, "weight": weight, "residual": residual, "scale": scale},
        variant=spec.to_str(),
        spec=spec.to_str(),
        ndim=x.dim(),
    )


def choose_lowering(spec: NormQuantSpec, x, weight=None, residual=None, scale=None, priority=("auto",)):
    """The hook the pass asks which implementation to splice in: a `registry.Choice`.

    `priority` is the config's list for `rms_norm_quant`; `auto` is decided by the
    lowering registry's tuner (measured on CUDA, cached per shape class; the aten
    sequence on CPU). Measurement-based choices for the Triton kernel plug in there.
    """
    from .registry import choose

    return choose(op_call(spec, x, weight, residual, scale), priority)

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


def choose_lowering(spec: NormQuantSpec, device: torch.device, priority: tuple[str, ...]) -> str:
    """Which implementation the pass splices in: "op" (the fused op) or "aten".

    `priority` is the config's list for `rms_norm_quant` (e.g. ("auto",), ("triton", "aten")).
    `triton` means the fused op (on CPU it runs the reference). `auto` is the hook for
    measurement-based choice: if `norm_quant_triton` defines `auto_choice(spec, device)`
    returning "triton" / "aten" (from benchmarks), that decides; otherwise CUDA with a
    Triton launcher uses the fused op and everything else the aten sequence, which
    Inductor fuses on its own.
    """
    for choice in priority:
        if choice == "aten":
            return "aten"
        if choice == "triton":
            return "op"
        if choice == "auto":
            if device.type != "cuda":
                return "aten"
            try:
                from . import norm_quant_triton
            except Exception:  # noqa: BLE001 - no Triton: the aten sequence
                return "aten"
            hook = getattr(norm_quant_triton, "auto_choice", None)
            picked = hook(spec, device) if hook is not None else None
            if picked in ("triton", "aten"):
                return "op" if picked == "triton" else "aten"
            return "op" if _triton_launch() is not None else "aten"
    return "aten"

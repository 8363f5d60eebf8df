"""CPU reference of the fused activation -> quantization (`ActQuantSpec`), in eager torch.

Every implementation is tested against this (the Triton kernel under the interpreter on
CPU and compiled on the GPU); it is also the fused op's CPU implementation.
"""

from __future__ import annotations

import torch

from .act_quant_spec import ActQuantSpec
from .norm_quant_reference import quantize
from .norm_quant_spec import SpecError

f32 = torch.float32


def activation(spec: ActQuantSpec, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Step 1: the activation h, in `spec.h_dtype`."""
    if spec.prologue == "identity":
        return x
    g = x.to(f32)
    # the post-grad decomposition of silu: x / (1 + exp(-x)), each op in f32
    a = (g / (torch.exp(-g) + 1)).to(spec.act_dtype)
    return (a.to(f32) * up.to(f32)).to(spec.h_dtype)


def reference(spec: ActQuantSpec, x: torch.Tensor, up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of `spec` for `x` (and `up` for silu_mul), shapes `[..., H]`."""
    check_inputs(spec, x, up)
    h = activation(spec, x, up)
    # fast mode keeps the activation's roundings (amax and scale come from them), so the
    # value quantized is h itself
    q, sc = quantize(spec.quant, h, h.to(f32), spec.numerics)
    return q, sc


def check_inputs(spec: ActQuantSpec, x: torch.Tensor, up: torch.Tensor | None) -> None:
    if x.dtype != spec.input_dtype:
        raise SpecError(f"act_quant: x is {x.dtype}, the spec expects {spec.input_dtype}")
    if x.dim() == 0:
        raise SpecError("act_quant: x must have at least one dimension (the quantized one)")
    if spec.prologue == "silu_mul":
        if up is None:
            raise SpecError("act_quant: the silu_mul prologue needs `up`")
        if up.shape != x.shape or up.dtype != x.dtype:
            raise SpecError(f"act_quant: up must match x (shape {tuple(x.shape)}, {x.dtype}); "
                            f"got {tuple(up.shape)}, {up.dtype}")
    elif up is not None:
        raise SpecError("act_quant: the identity prologue takes no `up`")
    spec.check_hidden(x.shape[-1])

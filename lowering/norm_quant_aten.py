"""The canonical aten sequence of a NormQuantSpec: what the `aten` lowering splices in.

One fixed spelling per spec, built from ops Inductor lowers and fuses natively (no
fallbacks): the norm and the quantization become one or two generated kernels, while
the matched spelling's oddities (bf16 round trips around a clamp, transposed copies of
the scales, `reciprocal * C` for `C / a`) are gone. Step for step it is the reference
(`norm_quant_reference.reference`), so executed eagerly it is bitwise equal to it.

`emit` knows nothing of FX: it calls `ops.call(target, *args)` for every op and
`ops.sizes(t)` for the sizes of the input. `EagerOps` runs the ops at once (for tests);
the pass supplies an implementation that creates graph nodes instead.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .norm_quant_spec import NormQuantSpec

aten = torch.ops.aten
prims = torch.ops.prims
F32 = torch.float32


class Ops(Protocol):
    def call(self, target: Any, *args: Any, **kwargs: Any) -> Any: ...

    def sizes(self, t: Any) -> list: ...

    def dtype(self, t: Any) -> torch.dtype: ...


class EagerOps:
    """Runs each op immediately on real tensors."""

    def call(self, target, *args, **kwargs):
        return target(*args, **kwargs)

    def sizes(self, t):
        return list(t.shape)

    def dtype(self, t):
        return t.dtype


def emit(spec: NormQuantSpec, x, weight, residual, scale, ops: Ops) -> tuple:
    """Outputs in the order of `spec.output_names()` (same shapes/layouts as the op)."""
    norm, quant = spec.norm, spec.quant
    c = ops.call

    def cast(t, dtype):
        return t if ops.dtype(t) == dtype else c(prims.convert_element_type.default, t, dtype)

    new_residual = None
    if norm.residual == "none":
        h = cast(x, F32)
    elif norm.residual == "input_dtype":
        new_residual = c(aten.add.Tensor, x, residual)
        h = cast(new_residual, F32)
    else:
        h = c(aten.add.Tensor, cast(x, F32), cast(residual, F32))
        new_residual = cast(h, norm.input_dtype)

    var = c(aten.add.Tensor, c(aten.mean.dim, c(aten.mul.Tensor, h, h), [-1], True), norm.eps)
    if norm.inv == "rsqrt":
        hr = c(aten.mul.Tensor, h, c(aten.rsqrt.default, var))
    elif norm.inv == "recip_sqrt":
        hr = c(aten.mul.Tensor, h, c(aten.reciprocal.default, c(aten.sqrt.default, var)))
    else:
        hr = c(aten.div.Tensor, h, c(aten.sqrt.default, var))

    fast = spec.numerics == "fast"
    if norm.weight == "none":
        y_f32 = hr
        y = cast(hr, norm.out_dtype)
    elif norm.weight == "after_cast":
        y = c(aten.mul.Tensor, cast(hr, norm.cast_dtype), weight)
        y_f32 = c(aten.mul.Tensor, hr, cast(weight, F32)) if fast else None
    elif norm.weight == "before_cast":
        y_f32 = c(aten.mul.Tensor, hr, cast(weight, F32))
        y = cast(y_f32, norm.out_dtype)
    else:
        y_f32 = c(aten.mul.Tensor, hr, c(aten.add.Tensor, cast(weight, F32), 1.0))
        y = cast(y_f32, norm.out_dtype)

    v = cast(y, F32)
    src = y_f32 if fast else v
    grouped = quant.kind == "fp8_per_group"
    sizes = ops.sizes(x)
    lead, hidden = sizes[:-1], sizes[-1]
    if grouped:
        gs = quant.group_size
        gshape = list(lead) + [hidden // gs, gs]
        v = c(aten.reshape.default, v, gshape)
        src = c(aten.reshape.default, src, gshape)

    if quant.dynamic:
        a = cast(c(aten.amax.default, c(aten.abs.default, v), [-1], True), quant.scale_math_dtype)
        if quant.amax_ub is not None:
            a = c(aten.clamp_max.default, a, quant.amax_ub)
        if quant.floor is not None and quant.floor_on == "amax":
            a = c(aten.clamp_min.default, a, quant.floor)
        if quant.scale_form == "amax_div":
            s = c(aten.div.Tensor, a, quant.scale_const)
        else:
            # eager evaluates `C / tensor` as reciprocal(tensor) * C
            s = c(aten.mul.Tensor, c(aten.reciprocal.default, a), quant.scale_const)
        if quant.floor is not None and quant.floor_on == "scale":
            s = c(aten.clamp_min.default, s, quant.floor)
        if quant.ue8m0:
            s = c(aten.exp2.default, c(aten.ceil.default, c(aten.log2.default, s)))
        s = cast(s, quant.scale_dtype)
    else:
        s = cast(scale, F32)

    apply = "mul_recip" if fast and quant.apply == "div" else quant.apply
    if apply == "div":
        t = c(aten.div.Tensor, src, s)
    elif apply == "mul_recip":
        t = c(aten.mul.Tensor, src, c(aten.reciprocal.default, s))
    else:
        t = c(aten.mul.Tensor, src, s)
    if quant.out_dtype == torch.int8:
        t = c(aten.round.default, t)
    t = c(aten.clamp_max.default, c(aten.clamp_min.default, t, quant.clamp_lo), quant.clamp_hi)
    q = c(prims.convert_element_type.default, t, quant.out_dtype)

    outs = []
    if grouped:
        q = c(aten.reshape.default, q, list(lead) + [hidden])
        s = c(aten.reshape.default, s, list(lead) + [hidden // quant.group_size])
        if quant.col_major:
            nd = len(lead) + 1
            perm = [nd - 1] + list(range(nd - 1))
            inv = list(range(1, nd)) + [0]
            buf = c(aten.clone.default, c(aten.permute.default, s, perm), memory_format=torch.contiguous_format)
            s = c(aten.permute.default, buf, inv)
    outs.append(q)
    if quant.dynamic:
        outs.append(s)
    if new_residual is not None:
        outs.append(new_residual)
    if spec.return_normalized:
        outs.append(y)
    return tuple(outs)


def aten_sequence(spec: NormQuantSpec, x, weight, residual=None, scale=None) -> tuple:
    """`emit` run eagerly on real tensors (for tests and for comparing with the reference)."""
    return emit(spec, x, weight, residual, scale, EagerOps())

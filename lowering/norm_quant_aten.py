"""The canonical aten sequence of a NormQuantSpec: what the `aten` lowering splices in.

One fixed spelling per spec, built from ops Inductor lowers and fuses natively (no
fallbacks): the norm and the quantization become one or two generated kernels, while
the matched spelling's oddities (bf16 round trips around a clamp, transposed copies of
the scales, `reciprocal * C` for `C / a`) are gone. Step for step it is the reference
(`norm_quant_reference.reference`), so executed eagerly it is bitwise equal to it.

`emit_sequence` knows nothing of FX: it calls `emit(target, *args)` for every op (the
lowering registry's convention: `registry.eager_emit` runs them at once, the pass's
emit creates graph nodes). Dtypes come from the spec, and the leading sizes of x from
`aten.sym_size.int`, so dynamic token counts work.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .norm_quant_spec import NormQuantSpec

aten = torch.ops.aten
prims = torch.ops.prims
F32 = torch.float32


def emit_sequence(emit: Callable, spec: NormQuantSpec, x, weight, residual, scale, ndim: int) -> tuple:
    """Outputs in the order of `spec.output_names()` (same shapes/layouts as the op).

    `ndim` is x's number of dims (the leading ones are read with `sym_size`).
    """
    norm, quant = spec.norm, spec.quant
    c = emit

    def cast(t, have, want):
        return t if have == want else c(prims.convert_element_type.default, t, want)

    new_residual = None
    if norm.residual == "none":
        h = cast(x, norm.input_dtype, F32)
    elif norm.residual == "input_dtype":
        new_residual = c(aten.add.Tensor, x, residual)
        h = cast(new_residual, norm.input_dtype, F32)
    else:
        h = c(aten.add.Tensor, cast(x, norm.input_dtype, F32), cast(residual, norm.input_dtype, F32))
        new_residual = cast(h, F32, norm.input_dtype)

    var = c(aten.add.Tensor, c(aten.mean.dim, c(aten.mul.Tensor, h, h), [-1], True), norm.eps)
    if norm.inv == "rsqrt":
        hr = c(aten.mul.Tensor, h, c(aten.rsqrt.default, var))
    elif norm.inv == "recip_sqrt":
        hr = c(aten.mul.Tensor, h, c(aten.reciprocal.default, c(aten.sqrt.default, var)))
    else:
        hr = c(aten.div.Tensor, h, c(aten.sqrt.default, var))

    fast = spec.numerics == "fast"
    wd = norm.weight_dtype
    if norm.weight == "none":
        y_f32 = hr
        y = cast(hr, F32, norm.out_dtype)
    elif norm.weight == "after_cast":
        y = c(aten.mul.Tensor, weight, cast(hr, F32, norm.cast_dtype))
        y_f32 = c(aten.mul.Tensor, hr, cast(weight, wd, F32)) if fast else None
    elif norm.weight == "before_cast":
        y_f32 = c(aten.mul.Tensor, hr, cast(weight, wd, F32))
        y = cast(y_f32, F32, norm.out_dtype)
    else:
        y_f32 = c(aten.mul.Tensor, hr, c(aten.add.Tensor, cast(weight, wd, F32), 1.0))
        y = cast(y_f32, F32, norm.out_dtype)

    v = cast(y, norm.out_dtype, F32)
    src = y_f32 if fast else v
    grouped = quant.kind == "fp8_per_group"
    # Only the grouped reshapes need the leading sizes: emit nothing otherwise.
    lead = [c(aten.sym_size.int, x, d) for d in range(ndim - 1)] if grouped else []
    # amax of y in its own dtype: rounding is monotonic, so this equals the amax of the
    # rounded values even where Inductor's codegen keeps y in f32 registers.
    yv = y
    if grouped:
        gs = quant.group_size
        gshape = list(lead) + [-1, gs]
        yv = c(aten.reshape.default, y, gshape)
        src = c(aten.reshape.default, src, gshape)

    if quant.dynamic:
        a = cast(c(aten.amax.default, c(aten.abs.default, yv), [-1], True), norm.out_dtype, quant.scale_math_dtype)
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
        s = cast(s, quant.scale_math_dtype, quant.scale_dtype)
    else:
        s = scale  # float32 (the matcher declines other static scales)

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
        q = c(aten.reshape.default, q, list(lead) + [-1])
        s = c(aten.reshape.default, s, list(lead) + [-1])
        if quant.col_major:
            # a contiguous [G, ...] buffer seen through its transpose: flattening the
            # permuted scales forces the copy (emit takes no memory_format keyword)
            perm = [ndim - 1] + list(range(ndim - 1))
            inv = list(range(1, ndim)) + [0]
            flat = c(aten.reshape.default, c(aten.permute.default, s, perm), [-1])
            buf = c(aten.reshape.default, flat, [-1] + list(lead))
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
    """The sequence run eagerly on real tensors (for tests and for comparing with the reference)."""
    return emit_sequence(lambda op, *args: op(*args), spec, x, weight, residual, scale, x.dim())

"""Pure-torch reference of a fused RMSNorm -> quantization (the CPU implementation).

In exact mode it reproduces each rounding step of the matched spelling with the same
eager ops, so it is bitwise equal to running the spelling eagerly (the summation order
of `mean` included, since it is the same `torch.mean`). Triton kernels must equal it
bitwise in exact mode except for the order of that one sum.
"""

from __future__ import annotations

import torch

from .norm_quant_spec import NormQuantSpec, SpecError

f32 = torch.float32


def reference(
    spec: NormQuantSpec,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Compute `spec` on `x` (shape `[..., H]`, dtype `spec.norm.input_dtype`).

    Args:
        weight: the norm weight `[H]` (`None` iff `spec.norm.weight == "none"`).
        residual: `x.shape`, input dtype; required iff `spec.norm.residual != "none"`.
        scale: the static scale (one f32 element); required iff `spec.quant.kind == "fp8_static"`.

    Returns a tuple, in this order (see `spec.output_names()`):
        q:          `x.shape`, `spec.quant.out_dtype` (float8_e4m3fn or int8), contiguous.
        scale:      dynamic kinds only. Per token: `[..., 1]` f32. Per group:
                    `[..., H // group_size]` f32, contiguous (row-major) or, with
                    `col_major`, a permuted view of a contiguous `[H // gs, ...]` buffer.
        residual:   when `spec.norm.residual != "none"`: the new residual, `x.shape`,
                    input dtype.
        normalized: when `spec.return_normalized`: the RMSNorm output `y`, `x.shape`,
                    `spec.norm.out_dtype`.
    """
    _check_inputs(spec, x, weight, residual, scale)
    norm, quant = spec.norm, spec.quant

    # 1. residual
    new_residual = None
    if norm.residual == "none":
        h = x.to(f32)
    elif norm.residual == "input_dtype":
        s = x + residual
        new_residual = s
        h = s.to(f32)
    else:
        h = x.to(f32) + residual.to(f32)
        new_residual = h.to(norm.input_dtype)

    # 2. the reduction; eps added as a Python float (eager rounds it through f32)
    v = torch.mean(h * h, dim=-1, keepdim=True) + norm.eps
    if norm.inv == "rsqrt":
        hr = h * torch.rsqrt(v)
    elif norm.inv == "recip_sqrt":
        hr = h * torch.sqrt(v).reciprocal()
    else:
        hr = h / torch.sqrt(v)

    # 3. weight
    if norm.weight == "none":
        y = hr.to(norm.out_dtype)
        y_f32 = hr
    elif norm.weight == "after_cast":
        n = hr.to(norm.cast_dtype)
        y = n * weight
        y_f32 = hr * weight.to(f32)  # fast mode: no rounding to cast_dtype
    elif norm.weight == "before_cast":
        y_f32 = hr * weight.to(f32)
        y = y_f32.to(norm.out_dtype)
    else:
        y_f32 = hr * (1.0 + weight.to(f32))
        y = y_f32.to(norm.out_dtype)
    assert y.dtype == norm.out_dtype, (y.dtype, norm.out_dtype)

    # 4. quantization. amax and scales always from the rounded y (both modes).
    q, sc = quantize(quant, y, y_f32, spec.numerics, scale)

    outs: list[torch.Tensor] = [q]
    if quant.dynamic:
        outs.append(sc)
    if new_residual is not None:
        outs.append(new_residual)
    if spec.return_normalized:
        outs.append(y)
    return tuple(outs)


def quantize(quant, y: torch.Tensor, y_f32: torch.Tensor, numerics: str,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 4 of the norm_quant contract (also act_quant's step 2): quantize `y` (any float
    dtype, shape `[..., H]`) as `quant` says. amax and scales come from `f32(y)`; in fast
    mode the value quantized is `y_f32` (the product before y's last rounding) and a
    division becomes a multiply by the reciprocal. Returns (q contiguous, scale or None
    for static; per group `[..., H // gs]`, column-major when the spec says so)."""
    v = y.to(f32)
    gs = quant.group_size
    hidden = y.shape[-1]
    if quant.kind == "fp8_per_group":
        v_in = v.unflatten(-1, (hidden // gs, gs))
        src = (y_f32 if numerics == "fast" else v).unflatten(-1, (hidden // gs, gs))
    else:
        v_in = v
        src = y_f32 if numerics == "fast" else v

    if quant.dynamic:
        a = v_in.abs().amax(dim=-1, keepdim=True).to(quant.scale_math_dtype)
        if quant.amax_ub is not None:
            a = a.clamp(max=quant.amax_ub)
        if quant.floor is not None and quant.floor_on == "amax":
            a = a.clamp(min=quant.floor)
        if quant.scale_form == "amax_div":
            sc = a / quant.scale_const
        else:
            # what eager's `C / tensor` computes: reciprocal, then multiply
            sc = a.reciprocal() * quant.scale_const
        if quant.floor is not None and quant.floor_on == "scale":
            sc = sc.clamp(min=quant.floor)
        if quant.ue8m0:
            sc = torch.exp2(torch.ceil(torch.log2(sc)))
        sc = sc.to(quant.scale_dtype)
    else:
        sc = scale.to(f32).reshape(())

    apply = quant.apply
    if numerics == "fast" and apply == "div":
        apply = "mul_recip"
    if apply == "div":
        t = src / sc
    elif apply == "mul_recip":
        t = src * sc.reciprocal()
    else:
        t = src * sc
    if quant.out_dtype == torch.int8:
        t = torch.round(t)
    q = t.clamp(quant.clamp_lo, quant.clamp_hi).to(quant.out_dtype)

    if quant.kind == "fp8_per_group":
        q = q.flatten(-2)
        sc = sc.squeeze(-1)
        if quant.col_major:
            sc = _col_major(sc)
    return q.contiguous(), (sc if quant.dynamic else None)


def _col_major(sc: torch.Tensor) -> torch.Tensor:
    """`sc` [..., G] re-laid out as a contiguous [G, ...] buffer, returned permuted back."""
    nd = sc.dim()
    perm = (nd - 1,) + tuple(range(nd - 1))
    buf = sc.permute(perm).contiguous()
    inv = tuple(range(1, nd)) + (0,)
    return buf.permute(inv)


def col_major_strides(shape: tuple) -> tuple:
    """Strides of `_col_major`'s result for scale shape `[..., G]` (SymInts allowed)."""
    lead = shape[:-1]
    strides = []
    acc = 1
    for d in reversed(lead):
        strides.append(acc)
        acc = acc * d
    strides.reverse()
    return tuple(strides) + (acc,)


def _check_inputs(spec, x, weight, residual, scale) -> None:
    norm, quant = spec.norm, spec.quant
    if x.dtype != norm.input_dtype:
        raise SpecError(f"x has dtype {x.dtype}, the spec expects {norm.input_dtype}")
    if x.dim() < 1:
        raise SpecError("x must have at least one dimension (the hidden dim)")
    if (weight is None) != (norm.weight == "none"):
        raise SpecError(f"weight style {norm.weight!r} but weight is {'missing' if weight is None else 'given'}")
    if weight is not None:
        if weight.dtype != norm.weight_dtype:
            raise SpecError(f"weight has dtype {weight.dtype}, the spec expects {norm.weight_dtype}")
        if tuple(weight.shape) != (x.shape[-1],):
            raise SpecError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if (residual is None) != (norm.residual == "none"):
        raise SpecError(f"residual mode {norm.residual!r} but residual is {'missing' if residual is None else 'given'}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise SpecError("residual must have x's shape and dtype")
    if (scale is None) != quant.dynamic:
        raise SpecError(f"quant kind {quant.kind!r} but scale is {'missing' if scale is None else 'given'}")
    if scale is not None and scale.numel() != 1:
        raise SpecError(f"static scale must have one element, got shape {tuple(scale.shape)}")
    spec.check_hidden(x.shape[-1])

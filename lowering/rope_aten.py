"""Aten replacements for RoPE writebacks: stack/flatten (step 2) and cat (halves).

`out = empty(...); out[..., 0::2] = a; out[..., 1::2] = b` is the same tensor as
`stack((a, b), -1).flatten(-2)` once `a` and `b` are cast to the buffer dtype (the
writeback's `copy` casts implicitly, with the same round-to-nearest-even), so the
replacement is bitwise exact. Step-1 halves `out[..., :h] = a; out[..., h:] = b` are
`cat((a, b), -1)`.

The sequences are written against an `emit(op, *args)` callback so the same code
builds eager tensors (``emit = lambda op, *a: op(*a)``) or graph nodes; this module
knows nothing of FX. `stack` is spelled `unsqueeze + cat + reshape`, the form Inductor
sees after decomposition.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

aten = torch.ops.aten
prims = torch.ops.prims

Emit = Callable[..., Any]


def eager_emit(op, *args):
    return op(*args)


def _prepare(emit: Emit, value: Any, dtype: torch.dtype, src_dtype: torch.dtype,
             shape: Sequence[int], src_shape: Sequence[int]) -> Any:
    if src_dtype != dtype:
        value = emit(prims.convert_element_type.default, value, dtype)
    if tuple(src_shape) != tuple(shape):
        # copy() broadcasts its source into the slice; expand does the same without a copy
        value = emit(aten.expand.default, value, list(shape))
    return value


def interleave(emit: Emit, a: Any, b: Any, *, dim: int, shape: Sequence[int], dtype: torch.dtype,
               a_meta: tuple[torch.dtype, Sequence[int]], b_meta: tuple[torch.dtype, Sequence[int]]) -> Any:
    """The tensor of `shape` whose even indices along `dim` are `a` and odd ones `b`, as `dtype`.

    The halves are cast before they are interleaved, as the writeback's copies did
    (casting after gives the same bits; on CPU both orders measured within 2%).
    """
    half = list(shape)
    half[dim] //= 2
    a = _prepare(emit, a, dtype, a_meta[0], half, a_meta[1])
    b = _prepare(emit, b, dtype, b_meta[0], half, b_meta[1])
    a = emit(aten.unsqueeze.default, a, dim + 1)
    b = emit(aten.unsqueeze.default, b, dim + 1)
    pairs = emit(aten.cat.default, [a, b], dim + 1)
    return emit(aten.reshape.default, pairs, list(shape))


def concat_halves(emit: Emit, a: Any, b: Any, *, dim: int, split: int, shape: Sequence[int],
                  dtype: torch.dtype, a_meta: tuple[torch.dtype, Sequence[int]],
                  b_meta: tuple[torch.dtype, Sequence[int]]) -> Any:
    """`[0, split)` from `a` and `[split, size)` from `b` along `dim`, as `dtype`."""
    shape_a, shape_b = list(shape), list(shape)
    shape_a[dim] = split
    shape_b[dim] = shape[dim] - split
    a = _prepare(emit, a, dtype, a_meta[0], shape_a, a_meta[1])
    b = _prepare(emit, b, dtype, b_meta[0], shape_b, b_meta[1])
    return emit(aten.cat.default, [a, b], dim)


def rotate(emit: Emit, x: Any, cos: Any, sin: Any, *, interleaved: bool, head_dim: int) -> tuple[Any, Any]:
    """`(x1*cos - x2*sin, x1*sin + x2*cos)` in f32 from the halves of `x` along its last dim.

    The spelling of `lowering/rope_ops.rope_reference`: each operand is upcast to f32,
    each product rounded once, no rounding to x's dtype until the caller writes back.
    Used where no model-computed halves exist: measuring an implementation, and
    implementations built from x, cos and sin.
    """
    if interleaved:
        x1 = emit(aten.slice.Tensor, x, -1, 0, head_dim, 2)
        x2 = emit(aten.slice.Tensor, x, -1, 1, head_dim, 2)
    else:
        x1 = emit(aten.slice.Tensor, x, -1, 0, head_dim // 2)
        x2 = emit(aten.slice.Tensor, x, -1, head_dim // 2, head_dim)
    f32 = torch.float32
    x1, x2, c, s = (emit(prims.convert_element_type.default, t, f32) for t in (x1, x2, cos, sin))
    first = emit(aten.sub.Tensor, emit(aten.mul.Tensor, x1, c), emit(aten.mul.Tensor, x2, s))
    second = emit(aten.add.Tensor, emit(aten.mul.Tensor, x1, s), emit(aten.mul.Tensor, x2, c))
    return first, second


def writeback(emit: Emit, a: Any, b: Any, *, strided: bool, dim: int, split: int, shape: Sequence[int],
              dtype: torch.dtype) -> Any:
    """The model's own spelling, functionalized: a fresh buffer and two `slice_scatter`s.

    What lowering `none` leaves in the graph; built only to measure it (a pass never
    rebuilds a writeback it keeps). `a`/`b` must already have the half's shape.
    """
    a = emit(prims.convert_element_type.default, a, dtype)
    b = emit(prims.convert_element_type.default, b, dtype)
    buf = emit(aten.new_empty.default, a, list(shape))
    end = shape[dim]
    if strided:
        buf = emit(aten.slice_scatter.default, buf, a, dim, 0, end, 2)
        return emit(aten.slice_scatter.default, buf, b, dim, 1, end, 2)
    buf = emit(aten.slice_scatter.default, buf, a, dim, 0, split)
    return emit(aten.slice_scatter.default, buf, b, dim, split, end)

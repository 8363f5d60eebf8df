"""Recognise the quantization that follows a tensor, and the constants it used.

Given the node holding a normalised tensor ``y`` (hidden size ``H``), find every
quantization of it in the post-grad graph:

* value side: ``y``, its exact f32 upcast, and reshapes of either that keep the last
  dim (token flattening) or split it into groups of ``gs`` (per-group), then
  ``div(v, s)`` / ``mul(v, reciprocal(s))`` / ``mul(v, multiplier)``, an optional
  ``round`` (int8), ``clamp_min``/``clamp_max`` and the cast to float8_e4m3fn or int8;
* scale side: a static one-element tensor, or ``abs -> amax`` (or ``max.dim`` +
  ``getitem``) over the last dim of the same value, followed by the scale arithmetic
  (casts, ``clamp_min`` / ``clamp_max``, ``/ C`` or ``C / a`` - which decomposes to
  ``reciprocal(a) * C`` -, ``exp2(ceil(log2(abs(s))))`` for ue8m0, shape ops), which
  :func:`interpret_scale_chain` turns into the fixed pipeline of
  :class:`~fusewright.lowering.norm_quant_spec.QuantSpec`;
* layout: ``s.t().contiguous().t()`` after the scale marks column-major group scales.

Returns :class:`QuantTailMatch` objects (or :class:`Decline` with a reason for a tail
that looked like one but cannot be reproduced). Nothing here rewrites the graph.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..lowering.norm_quant_spec import FP8, QuantSpec, round_to
from ..passes.graph_utils import is_op, tensor_meta
from .rms_norm import Decline, can_hold, dtype_of, exact_upcast, is_convert, static_int

aten = torch.ops.aten
F32 = torch.float32

_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_SHAPE_OPS = _RESHAPES + (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims)


@dataclasses.dataclass
class Value:
    """A node holding y's value: y itself, an upcast, or a view; `gs` is its last dim."""

    node: fx.Node
    gs: int
    view_args: tuple | None  # size argument of the reshape producing this shape (None: y's shape)


@dataclasses.dataclass
class QuantTailMatch:
    quant: QuantSpec
    q: fx.Node  # the cast to fp8/int8
    q_view_args: tuple | None  # reshape args giving q's shape (None: x's shape)
    scale: fx.Node | None  # the node holding the (dynamic) scale
    amax_keepdim: bool
    scale_shape_ops: list[fx.Node]  # shape ops between the amax and `scale`, replayed on the op's scale
    static_scale: fx.Node | None
    col_major_out: fx.Node | None  # last permute of s.t().contiguous().t()
    col_major_args: tuple | None
    values: list[fx.Node]  # the value nodes (y, upcasts, views) this tail reads
    nodes: list[fx.Node]  # the tail's own nodes (dead once q and scale are replaced)

    def key(self):
        """Tails with equal keys compute the same tensors: one fused op serves them all."""
        return (self.quant, self.q_view_args, self.static_scale)


def _scalar(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def value_nodes(y: fx.Node, hidden: int) -> list[Value]:
    """y and every node that holds its value unchanged (exact upcasts, reshapes)."""
    out = [Value(y, hidden, None)]
    i = 0
    while i < len(out):
        cur = out[i]
        i += 1
        for user in cur.node.users:
            if exact_upcast(user) and dtype_of(user) == F32:
                out.append(Value(user, cur.gs, cur.view_args))
            elif is_op(user, *_RESHAPES) and cur.gs == hidden:
                val = tensor_meta(user)
                last = static_int(val.shape[-1]) if val is not None and val.dim() else None
                if isinstance(last, int) and last > 0 and hidden % last == 0:
                    out.append(Value(user, last, tuple(user.args[1])))
                elif isinstance(last, int) and last > 0 and last < hidden:
                    # groups that straddle rows: recorded so the caller can decline
                    out.append(Value(user, -last, tuple(user.args[1])))
    return out


def _amax_of(node: fx.Node):
    """(input, dims, keepdim) if `node` is an amax (or max.dim's values), else None."""
    if is_op(node, aten.amax.default):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return node.args[0], list(dims), bool(keep), [node]
    if node.target is operator.getitem and node.args[1] == 0 and is_op(node.args[0], aten.max.dim):
        mx = node.args[0]
        dim = mx.args[1]
        keep = mx.args[2] if len(mx.args) > 2 else mx.kwargs.get("keepdim", False)
        if len(mx.users) != 1:
            return None
        return mx.args[0], [dim], bool(keep), [mx, node]
    return None


def _is_last(node: fx.Node, dims) -> bool:
    val = tensor_meta(node)
    return val is not None and len(dims) == 1 and dims[0] in (-1, val.dim() - 1)


def find_tails(y: fx.Node, hidden: int) -> tuple[list[Value], list[QuantTailMatch | Decline]]:
    """All quantizations of `y` (its value nodes, and one match or decline per tail)."""
    values = value_nodes(y, hidden)
    by_node = {v.node: v for v in values}
    results: list[QuantTailMatch | Decline] = []
    seen_q: set[fx.Node] = set()
    for v in values:
        for apply in list(v.node.users):
            if not is_op(apply, aten.div.Tensor, aten.mul.Tensor) or apply in seen_q:
                continue
            if is_op(apply, aten.div.Tensor) and apply.args[0] is not v.node:
                continue
            other = apply.args[1] if apply.args[0] is v.node else apply.args[0]
            if not isinstance(other, fx.Node) or other in by_node:
                continue
            res = _match_tail(v, apply, other, by_node, hidden)
            if res is None:
                continue
            seen_q.add(apply)
            results.append(res)
    return values, results


def _match_tail(v: Value, apply: fx.Node, s_in: fx.Node, by_node: dict, hidden: int):
    # value side: apply -> [round] -> clamps -> cast
    nodes = [apply]
    n = apply
    rounded = False
    lo = hi = None
    casts = []
    while True:
        nxt = _single_user(n)
        if nxt is None:
            return None
        if is_op(nxt, aten.round.default) and not rounded and lo is None and hi is None:
            rounded = True
        elif is_op(nxt, aten.clamp_min.default) and lo is None and _scalar(nxt.args[1]) is not None:
            lo = _scalar(nxt.args[1])
        elif is_op(nxt, aten.clamp_max.default) and hi is None and _scalar(nxt.args[1]) is not None:
            hi = _scalar(nxt.args[1])
        elif is_op(nxt, aten.clamp.default) and lo is None and hi is None:
            lo, hi = _scalar(nxt.args[1]), _scalar(nxt.args[2] if len(nxt.args) > 2 else None)
            if lo is None or hi is None:
                return None
        elif is_convert(nxt) and dtype_of(nxt) in (FP8, torch.int8):
            q = nxt
            nodes.append(q)
            break
        elif is_convert(nxt) and dtype_of(nxt) in (F32, torch.bfloat16, torch.float16, torch.float64):
            casts.append(nxt)
        else:
            return None
        nodes.append(nxt)
        n = nxt
    out_dtype = dtype_of(q)
    if v.gs < 0:
        return Decline(f"hidden size {hidden} is not divisible by the group size {-v.gs}", apply)
    if lo is None or hi is None:
        return Decline("no clamp to the quantized range before the cast", q)
    if dtype_of(apply) != F32:
        return Decline(f"quantization arithmetic in {dtype_of(apply)}, not float32", apply)
    if casts:
        return Decline(f"a cast to {dtype_of(casts[0])} inside the quantization", casts[0])
    if out_dtype == torch.int8 and not rounded:
        return Decline("int8 cast without round", q)
    if out_dtype == FP8 and rounded:
        return Decline("round before an fp8 cast", q)

    # scale side
    if is_op(apply, aten.div.Tensor):
        mode, s = "div", s_in
    elif is_op(s_in, aten.reciprocal.default) and len(s_in.users) == 1:
        mode, s = "mul_recip", s_in.args[0]
        nodes.append(s_in)
    else:
        mode, s = "mul", s_in
    chain: list[fx.Node] = []
    cur = s
    amax = None
    while True:
        found = _amax_of(cur) if isinstance(cur, fx.Node) else None
        if found is not None:
            amax = (cur, found)
            break
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            break
        tensor_args = [a for a in cur.args if isinstance(a, fx.Node)]
        if len(tensor_args) != 1 or tensor_args[0] is not cur.args[0]:
            break
        chain.append(cur)
        cur = cur.args[0]
    chain.reverse()

    common = dict(clamp_lo=lo, clamp_hi=hi, out_dtype=out_dtype)
    if amax is None:
        val = tensor_meta(s)
        if val is None or val.numel() != 1:
            return Decline("the scale is neither a one-element tensor nor an amax of the quantized value", apply)
        if out_dtype != FP8:
            return Decline("static int8 quantization is not supported", apply)
        if val.dtype != F32:
            return Decline(f"static scale in {val.dtype}, not float32", apply)
        if _depends_on(s, set(by_node)):
            return Decline("the scale is computed from the quantized value by ops not recognised", apply)
        if mode == "mul":
            return Decline("static quantization by a given multiplier (not a scale) is not supported", apply)
        try:
            spec = QuantSpec(kind="fp8_static", apply=mode, scale_const=448.0, **common)
        except ValueError as exc:
            return Decline(f"unsupported static quantization: {exc}", apply)
        return QuantTailMatch(spec, q, v.view_args, None, True, [], s, None, None, [v.node], nodes)

    anode, (src, dims, keep, amax_nodes) = amax
    if not is_op(src, aten.abs.default):
        return Decline("amax of a value that is not abs()", anode)
    w = src.args[0]
    if w not in by_node:
        return Decline("the scale is computed from a different tensor than the one quantized", anode)
    if not _is_last(src, dims):
        return Decline(f"amax over dim {dims}, not the last dim", anode)
    wv = by_node[w]
    if (wv.gs, wv.view_args) != (v.gs, v.view_args):
        return Decline("amax and quantization use different views (group sizes) of the value", anode)
    if len(src.users) != 1 or any(len(a.users) != 1 for a in amax_nodes[:-1]):
        return Decline("the amax has other users", anode)
    nodes += [src] + amax_nodes
    amax_dtype = dtype_of(anode)
    try:
        interp = interpret_scale_chain(chain, amax_dtype, dtype_of(w))
    except _ChainError as exc:
        return Decline(str(exc), exc.node or anode)
    for c in chain[:-1]:
        if len(c.users) != 1:
            return Decline("an intermediate of the scale computation has other users", c)
    if mode in ("div", "mul_recip") and interp["scale_form"] != "amax_div":
        return Decline("the scale is a multiplier but is used as a divisor", apply)
    if mode == "mul" and interp["scale_form"] != "const_div":
        return Decline("the scale is a divisor but is used as a multiplier", apply)
    shape_ops = [c for c in chain if is_op(c, *_SHAPE_OPS)]
    nodes += [c for c in chain if c is not s]

    gs = v.gs
    grouped = gs != hidden
    col_out, col_args = _col_major_user(s) if grouped else (None, None)
    if out_dtype == torch.int8:
        if grouped:
            return Decline("per-group int8 quantization is not supported", apply)
        kind = "int8_per_token"
    else:
        kind = "fp8_per_group" if grouped else "fp8_per_token"
    try:
        spec = QuantSpec(
            kind=kind,
            group_size=gs if grouped else 0,
            col_major=col_out is not None,
            apply=mode,
            amax_on_f32=dtype_of(w) == F32,
            **interp,
            **common,
        )
    except ValueError as exc:
        return Decline(f"unsupported quantization: {exc}", apply)
    values = sorted({v.node, w}, key=lambda n: n.name)
    return QuantTailMatch(spec, q, v.view_args, s, keep, shape_ops, None, col_out, col_args, values, nodes)


def _depends_on(node: fx.Node, targets: set[fx.Node]) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _col_major_user(s: fx.Node):
    """The `reshape -> permute -> contiguous clone -> permute` of `s` (a transposed copy)."""
    for r in s.users:
        if not is_op(r, *_RESHAPES) or len(tensor_meta(r).shape) != 2:
            continue
        p1 = _single_user(r)
        if p1 is None or not is_op(p1, aten.permute.default) or list(p1.args[1]) != [1, 0]:
            continue
        c = _single_user(p1)
        if c is None or not is_op(c, aten.clone.default) or c.kwargs.get("memory_format", torch.contiguous_format) != torch.contiguous_format:
            continue
        p2 = _single_user(c)
        if p2 is None or not is_op(p2, aten.permute.default) or list(p2.args[1]) != [1, 0]:
            continue
        return p2, tuple(r.args[1])
    return None, None


class _ChainError(Exception):
    def __init__(self, msg: str, node: fx.Node | None = None) -> None:
        super().__init__(msg)
        self.node = node


def interpret_scale_chain(chain: list[fx.Node], amax_dtype: torch.dtype, src_dtype: torch.dtype) -> dict:
    """Map the ops between amax and the scale onto QuantSpec's fixed pipeline.

    Raises _ChainError for anything that pipeline cannot reproduce bit for bit.
    Floors and upper bounds are returned already rounded to the dtype they act in
    (a clamp in f32 followed by a cast to bf16 equals a clamp by the bf16-rounded bound).
    """
    phase, cur = "amax", amax_dtype
    floor = ub = None
    floor_on = "scale"
    form = const = math = None
    ue8m0 = narrowed = False
    i = 0
    while i < len(chain):
        n = chain[i]
        if is_op(n, *_SHAPE_OPS):
            i += 1
            continue
        if is_convert(n):
            d = dtype_of(n)
            if phase == "amax":
                if not can_hold(d, src_dtype):
                    raise _ChainError(f"lossy cast of the amax to {d}", n)
                floor = round_to(floor, d) if floor is not None else None
                ub = round_to(ub, d) if ub is not None else None
            elif not can_hold(d, cur):
                if narrowed or d != F32:
                    raise _ChainError(f"lossy cast of the scale to {d}", n)
                narrowed = True
            cur = d
        elif is_op(n, aten.clamp_min.default) and _scalar(n.args[1]) is not None:
            c = _scalar(n.args[1])
            if phase == "amax":
                if floor is not None:
                    raise _ChainError("two floors on the amax", n)
                floor, floor_on = round_to(c, cur), "amax"
            else:
                if floor is not None or ue8m0 or narrowed or cur != math:
                    raise _ChainError("scale floor at a place the fused op cannot reproduce", n)
                floor, floor_on = round_to(c, cur), "scale"
        elif is_op(n, aten.clamp_max.default) and _scalar(n.args[1]) is not None:
            if phase != "amax" or floor is not None or ub is not None:
                raise _ChainError("upper bound on the scale (only an amax upper bound before the floor is supported)", n)
            ub = round_to(_scalar(n.args[1]), cur)
        elif is_op(n, aten.div.Tensor) and phase == "amax" and _scalar(n.args[1]) is not None:
            form, const, math, phase = "amax_div", _scalar(n.args[1]), cur, "scale"
        elif is_op(n, aten.reciprocal.default) and phase == "amax" and i + 1 < len(chain):
            m = chain[i + 1]
            k = None
            if is_op(m, aten.mul.Tensor) and m.args[0] is n:
                k = _scalar(m.args[1])
            elif is_op(m, aten.mul.Tensor) and len(m.args) > 1 and m.args[1] is n:
                k = _scalar(m.args[0])
            if k is None:
                raise _ChainError("reciprocal of the amax not followed by a constant multiply", n)
            form, const, math, phase = "const_div", k, cur, "scale"
            i += 1
        elif is_op(n, aten.abs.default) and phase == "scale":
            pass
        elif (
            is_op(n, aten.log2.default)
            and phase == "scale"
            and i + 2 < len(chain)
            and is_op(chain[i + 1], aten.ceil.default)
            and is_op(chain[i + 2], aten.exp2.default)
        ):
            if ue8m0 or narrowed or cur != math:
                raise _ChainError("power-of-two rounding at a place the fused op cannot reproduce", n)
            ue8m0 = True
            i += 2
        else:
            raise _ChainError(f"unrecognised op {getattr(n.target, '__name__', n.target)} in the scale computation", n)
        i += 1
    if phase != "scale":
        raise _ChainError("no division by a constant in the scale computation")
    if cur != F32:
        raise _ChainError(f"scale in {cur}, not float32")
    return dict(
        scale_form=form,
        scale_const=const,
        floor=floor,
        floor_on=floor_on,
        amax_ub=ub,
        ue8m0=ue8m0,
        scale_math_dtype=math,
        scale_dtype=F32,
    )

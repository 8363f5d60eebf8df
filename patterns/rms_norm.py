"""Recognise RMSNorm in a post-grad graph, whatever spelling the model used.

The anchor is the reduction, not one traced spelling::

    mean(h * h  |  pow(h, 2), [-1] | [last], keepdim=True) + eps       (add.Tensor / add.Scalar)
      -> rsqrt | pow(-0.5) | sqrt (then reciprocal, or h / sqrt)

with ``h`` an f32 tensor: either the input itself or an exact upcast of a bf16/f16
input. From there the matcher walks outward and classifies:

* the head: a residual add in front, in the input dtype (``x = x + residual``) or with
  both operands upcast and added in f32 (vLLM's fused-add form), and which node holds
  the new residual;
* the weight: multiplied after the cast back (Llama), in f32 before the cast back
  (Olmo2, ``F.rms_norm``), as ``1 + w`` in f32 (Gemma), with no cast back at all
  (implicit promotion: T5/diffusers), or absent;
* eps as the value the graph applies (canonicalised to its f32 rounding, so
  ``1e-6`` and ``9.999999974752427e-07`` are the same norm).

The result is an :class:`RMSNormMatch` (typed description plus the nodes it covers) or a
:class:`Decline` with the reason. Nothing here rewrites the graph.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ..lowering.norm_quant_spec import NormSpec, f32_round
from ..passes.graph_utils import is_op, tensor_meta

aten = torch.ops.aten
prims = torch.ops.prims

F32 = torch.float32
_LOW = (torch.bfloat16, torch.float16)
# eps above this is not a numerical guard but a different normalisation
MAX_EPS = 1e-2


@dataclasses.dataclass
class Decline:
    """Why something that looked like the construct was not taken."""

    reason: str
    node: fx.Node | None = None


@dataclasses.dataclass
class RMSNormMatch:
    """One RMSNorm found in the graph.

    `x` (and `residual`) are the inputs the fused op reads; `out` is the node holding
    the normalised tensor; `residual_out` the node whose value is the new residual
    (the bf16 add, or the cast back of the f32 sum). `nodes` are the nodes the norm
    consists of (they become dead once `out` and `residual_out` are replaced), and
    `shared` the nodes allowed to stay alive (the weight preparation, e.g. ``1 + w``).
    """

    mean: fx.Node
    x: fx.Node
    weight: fx.Node | None
    residual: fx.Node | None
    residual_out: fx.Node | None
    out: fx.Node
    norm: NormSpec
    nodes: list[fx.Node]
    shared: list[fx.Node]


def dtype_of(node) -> torch.dtype | None:
    val = tensor_meta(node)
    return val.dtype if val is not None else None


def is_convert(node, dtype: torch.dtype | None = None) -> bool:
    if not is_op(node, prims.convert_element_type.default, aten._to_copy.default):
        return False
    return dtype is None or dtype_of(node) == dtype


def exact_upcast(node) -> bool:
    """A convert whose result holds its input's value exactly (bf16/f16 -> f32, ...)."""
    if not is_convert(node):
        return False
    src, dst = dtype_of(node.args[0]), dtype_of(node)
    return src is not None and dst is not None and can_hold(dst, src)


def can_hold(dst: torch.dtype, src: torch.dtype) -> bool:
    """Every value of `src` is representable in `dst`."""
    if dst == src:
        return True
    if dst == torch.float64:
        return src in (torch.float32, torch.bfloat16, torch.float16)
    if dst == torch.float32:
        return src in _LOW
    return False


def static_int(value) -> int | None:
    """`value` as a Python int if it is one, or a SymInt the shape env has pinned to one."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        if is_concrete_int(value):
            return int(value)
        expr = value.node.expr
        try:
            # a dim the shape env specialised (e.g. by a broadcast against a weight)
            replaced = value.node.shape_env.replace(expr)
            if replaced.is_number:
                return int(replaced)
        except Exception:  # noqa: BLE001 - no shape env: truly symbolic
            pass
    return None


def _scalar(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _last_dim(node: fx.Node, dims) -> bool:
    val = tensor_meta(node)
    if val is None or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    return dims[0] in (-1, val.dim() - 1)


def _other(node: fx.Node, this) -> object:
    a, b = node.args[0], node.args[1]
    return b if a is this else a


def _is_weight_like(node, hidden: int) -> bool:
    """A [H] tensor: one value per channel, broadcast over tokens (the fused op takes [H])."""
    val = tensor_meta(node)
    if val is None or val.dim() != 1 or static_int(val.shape[0]) != hidden:
        return False
    return val.dtype in (F32,) + _LOW


def find_anchors(graph: fx.Graph) -> list[fx.Node]:
    """Every mean whose input is a square: candidate variances, in graph order."""
    out = []
    for node in graph.nodes:
        if not is_op(node, aten.mean.dim):
            continue
        sq = node.args[0]
        if is_op(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
            out.append(node)
        elif is_op(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1] and isinstance(sq.args[0], fx.Node):
            out.append(node)
    return out


def match_rms_norm(mean: fx.Node) -> RMSNormMatch | Decline | None:
    """Classify the RMSNorm around the variance `mean`; None if it is not one at all."""
    sq = mean.args[0]
    h = sq.args[0]
    nodes: list[fx.Node] = [sq, mean]
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not _last_dim(sq, dims):
        return None  # a reduction over another dim is not an RMSNorm (near miss)
    if not keepdim:
        return Decline("variance mean without keepdim", mean)
    if dtype_of(h) != F32:
        return Decline(f"variance computed in {dtype_of(h)}, not float32", mean)
    hidden = static_int(tensor_meta(h).shape[-1])
    if hidden is None:
        return Decline("hidden size is symbolic (only the token count may be dynamic)", mean)

    # eps
    if len(mean.users) != 1:
        return Decline("the variance has other users", mean)
    add = next(iter(mean.users))
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or add.kwargs.get("alpha", 1) != 1:
        return None
    eps = _scalar(_other(add, mean))
    if eps is None:
        return Decline("eps is not a constant (a tensor add)", add)
    if not (0.0 < eps <= MAX_EPS) or not math.isfinite(eps):
        return Decline(f"eps {eps!r} is not a small positive constant", add)
    eps = f32_round(eps)
    nodes.append(add)

    # rsqrt and its spellings; `hr` is h normalised, in f32
    if len(add.users) != 1:
        return Decline("variance + eps has other users", add)
    inv = next(iter(add.users))
    nodes.append(inv)
    if is_op(inv, aten.rsqrt.default) or (is_op(inv, aten.pow.Tensor_Scalar) and inv.args[1] == -0.5):
        form, r = "rsqrt", inv
    elif is_op(inv, aten.sqrt.default):
        users = list(inv.users)
        if len(users) == 1 and is_op(users[0], aten.reciprocal.default):
            form, r = "recip_sqrt", users[0]
            nodes.append(r)
        elif len(users) == 1 and is_op(users[0], aten.div.Tensor) and users[0].args[1] is inv:
            form, r = "div_sqrt", inv
        else:
            return None
    else:
        return None
    if len(r.users) != 1:
        return Decline("the inverse RMS has other users", r)
    hr = next(iter(r.users))
    if form == "div_sqrt":
        if not is_op(hr, aten.div.Tensor) or hr.args[1] is not r:
            return None
        num = hr.args[0]
    else:
        if not is_op(hr, aten.mul.Tensor):
            return None
        num = _other(hr, r)
    # The numerator is h, or the bf16 tensor h was upcast from (implicit promotion:
    # the multiply converts it exactly, so the value is the same).
    if num is h:
        pass
    elif is_convert(h) and exact_upcast(h) and num is h.args[0]:
        pass
    else:
        return Decline("the normalised tensor is not the one the variance was taken of", hr)
    if dtype_of(hr) != F32:
        return Decline(f"normalisation computed in {dtype_of(hr)}", hr)
    nodes.append(hr)

    # head: input, upcast, residual add
    x, residual, residual_out, res_mode = h, None, None, "none"
    if exact_upcast(h):
        nodes.insert(0, h)
        x = h.args[0]
        allowed = {sq, hr}
        if any(u not in allowed for u in h.users):
            return Decline("the upcast input has other users", h)
        if _is_residual_add(x):
            res_mode, residual_out = "input_dtype", x
            x, residual = x.args[0], x.args[1]
            nodes.insert(0, residual_out)
    elif is_op(h, aten.add.Tensor) and h.kwargs.get("alpha", 1) == 1 and all(
        exact_upcast(a) and dtype_of(a.args[0]) in _LOW for a in h.args[:2] if isinstance(a, fx.Node)
    ) and all(isinstance(a, fx.Node) for a in h.args[:2]):
        a, b = h.args[0].args[0], h.args[1].args[0]
        if dtype_of(a) != dtype_of(b) or tensor_meta(a).shape != tensor_meta(b).shape or tensor_meta(a).shape != tensor_meta(h).shape:
            return Decline("residual add of tensors of different dtypes or shapes", h)
        outs = [u for u in h.users if u not in (sq, hr)]
        if len(outs) > 1 or (outs and not is_convert(outs[0], dtype_of(a))):
            return Decline("the f32 residual sum has other users", h)
        for up in h.args[:2]:
            if len(up.users) == 1:
                nodes.insert(0, up)
        nodes.insert(0, h)
        res_mode, x, residual = "f32", a, b
        residual_out = outs[0] if outs else None
        if residual_out is not None:
            nodes.append(residual_out)
    elif _is_residual_add(h):
        # an f32 model: the sum is both the new residual and the norm's input
        res_mode, residual_out = "input_dtype", h
        x, residual = h.args[0], h.args[1]
        nodes.insert(0, h)
    input_dtype = dtype_of(x)
    if input_dtype not in (F32,) + _LOW:
        return Decline(f"input dtype {input_dtype} is not a float type", mean)

    # tail: weight style and output dtype
    shared: list[fx.Node] = []
    if len(hr.users) != 1:
        # hr with several users: only a normalised tensor consumed directly
        return Decline("the normalised f32 tensor has other users", hr)
    nxt = next(iter(hr.users))
    weight, style = None, "none"
    cast_dtype = out_dtype = F32
    weight_dtype = None
    out = hr
    if is_convert(nxt):
        cast_dtype = dtype_of(nxt)
        if cast_dtype not in (F32,) + _LOW:
            return Decline(f"normalised tensor cast to {cast_dtype}", nxt)
        nodes.append(nxt)
        out, out_dtype = nxt, cast_dtype
        wm = next(iter(nxt.users)) if len(nxt.users) == 1 else None
        if wm is not None and is_op(wm, aten.mul.Tensor) and _is_weight_like(_other(wm, nxt), hidden) and _other(wm, nxt) is not nxt:
            weight = _other(wm, nxt)
            style, weight_dtype = "after_cast", dtype_of(weight)
            out, out_dtype = wm, dtype_of(wm)
            nodes.append(wm)
    elif is_op(nxt, aten.mul.Tensor) and _is_weight_like(_other(nxt, hr), hidden) and _other(nxt, hr) is not hr:
        w = _other(nxt, hr)
        style = "before_cast"
        # Gemma: (1 + w.float()) computed in f32
        if is_op(w, aten.add.Tensor) and _scalar(w.args[1]) == 1.0 and isinstance(w.args[0], fx.Node) and dtype_of(w) == F32:
            base = w.args[0]
            if exact_upcast(base):
                shared += [w, base]
                base = base.args[0]
            else:
                shared.append(w)
            style, w = "one_plus", base
        elif exact_upcast(w) and dtype_of(w) == F32:
            shared.append(w)
            w = w.args[0]
        if dtype_of(nxt) != F32:
            return Decline(f"weight multiply in {dtype_of(nxt)}", nxt)
        weight, weight_dtype = w, dtype_of(w)
        nodes.append(nxt)
        out = nxt
        fin = next(iter(nxt.users)) if len(nxt.users) == 1 else None
        if fin is not None and is_convert(fin) and dtype_of(fin) in _LOW:
            nodes.append(fin)
            out = fin
        out_dtype = cast_dtype = dtype_of(out)
    if res_mode == "input_dtype" and dtype_of(x) != dtype_of(residual_out):
        return Decline("residual add changes the dtype", residual_out)
    if residual is not None and (tensor_meta(residual).shape != tensor_meta(x).shape or dtype_of(residual) != dtype_of(x)):
        return Decline("residual add of tensors of different shapes or dtypes (a broadcast add)", residual_out)
    try:
        norm = NormSpec(
            eps=eps,
            weight=style,
            input_dtype=input_dtype,
            cast_dtype=cast_dtype,
            out_dtype=out_dtype,
            weight_dtype=weight_dtype,
            residual=res_mode,
            inv=form,
        )
    except ValueError as exc:
        return Decline(f"unsupported RMSNorm variant: {exc}", mean)
    return RMSNormMatch(mean, x, weight, residual, residual_out, out, norm, nodes, shared)


def _is_residual_add(node) -> bool:
    """`a + b` of two same-shape, same-dtype tensors (no broadcast, no scalar)."""
    if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    va, vb, vo = tensor_meta(a), tensor_meta(b), tensor_meta(node)
    if va is None or vb is None or vo is None:
        return False
    return va.dtype == vb.dtype == vo.dtype and va.shape == vb.shape == vo.shape

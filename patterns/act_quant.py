"""Recognise a dynamic quantization of an activation that Inductor would read twice.

Anchor: an ``amax`` (or ``max.dim``) over the last dim of ``abs(v)``. ``v`` is walked
back through exact upcasts and reshapes to the activation ``h`` it holds; the quant
tails of ``h`` come from :func:`patterns.quant.find_tails` (the same matcher the
RMSNorm -> quant pass uses), and ``h``'s producer decides the prologue:

* ``silu_mul``: ``h = mul(a, u)`` where ``a`` is the post-grad decomposition of
  ``F.silu(g)`` - ``div(g32, add(exp(neg(g32)), 1))`` with ``g32`` an exact f32 upcast
  of ``g`` (or ``g`` itself in f32), optionally rounded to a lower dtype - and ``u`` has
  ``g``'s shape (``u`` may be an exact upcast of a tensor of ``g``'s dtype);
* ``identity``: ``h`` is already in memory (a graph input, a GEMM or attention output,
  a custom op, or a view of one; `patterns.rope.x_producer` says "materialized") and
  its rows are contiguous, so the fused op reads it where it lies.

Everything else declines with a reason: an activation computed by other fusible ops
(Inductor already quantizes it in the kernel that computes it; the fused op would make
it write ``h`` out and read it back), an intermediate read elsewhere, a quantization
this matcher cannot reproduce. An RMSNorm output is the norm -> quant pass's; when
that pass declined it, the norm is a fusible producer and this matcher declines too.
Nothing here rewrites the graph.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..lowering.act_quant_spec import ActQuantSpec
from ..lowering.norm_quant_spec import SpecError
from ..passes.graph_utils import is_op, tensor_meta
from .quant import QuantTailMatch, find_tails
from .rms_norm import Decline, dtype_of, exact_upcast, is_convert, static_int
from .rope import _view_root, x_producer

aten = torch.ops.aten
F32 = torch.float32
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclasses.dataclass
class ActQuantMatch:
    spec: ActQuantSpec
    x: fx.Node  # silu's input g (silu_mul) or the activation itself (identity)
    up: fx.Node | None
    h: fx.Node  # the activation the tails quantize
    tails: list[QuantTailMatch]  # every tail of h that computes the same (q, scale)
    prologue: list[fx.Node]  # silu_mul's own nodes (dead once the tails are replaced)
    value_nodes: list[fx.Node]  # h, its upcasts and views

    def dead_candidates(self) -> list[fx.Node]:
        out = list(self.prologue) + list(self.value_nodes)
        for t in self.tails:
            out += list(t.nodes) + list(t.values) + ([t.scale] if t.scale is not None else [])
        return out


def find_anchors(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_op(n, aten.amax.default)
            or (n.target is operator.getitem and n.args[1] == 0 and is_op(n.args[0], aten.max.dim))]


def _amax_input(anchor: fx.Node) -> fx.Node:
    return anchor.args[0] if is_op(anchor, aten.amax.default) else anchor.args[0].args[0]


def _activation_of(v: fx.Node) -> fx.Node:
    """The node whose value `v` holds: back through exact upcasts and the reshapes a quant
    tail makes (token flattening, splitting the last dim into groups). A reshape that
    builds the last dim from several (heads x head_dim after attention) is where the
    activation starts."""
    while True:
        if exact_upcast(v) and isinstance(v.args[0], fx.Node):
            v = v.args[0]
        elif is_op(v, *_RESHAPES) and isinstance(v.args[0], fx.Node) and _splits_last_dim(v.args[0], v):
            v = v.args[0]
        else:
            return v


def _splits_last_dim(src: fx.Node, view: fx.Node) -> bool:
    a, b = tensor_meta(src), tensor_meta(view)
    if a is None or b is None or not a.dim() or not b.dim():
        return False
    la, lb = static_int(a.shape[-1]), static_int(b.shape[-1])
    return isinstance(la, int) and isinstance(lb, int) and lb > 0 and la % lb == 0


def match_act_quant(anchor: fx.Node, numerics: str = "exact") -> ActQuantMatch | Decline | None:
    """The fusible quantization `anchor` (an amax) belongs to; None when it is no quantization."""
    a_in = _amax_input(anchor)
    if not is_op(a_in, aten.abs.default) or not isinstance(a_in.args[0], fx.Node):
        return None  # an amax of something else: not a quantization's scale
    h = _activation_of(a_in.args[0])
    val = tensor_meta(h)
    if val is None or val.dim() == 0 or val.dtype not in _FLOATS:
        return None
    hidden = static_int(val.shape[-1])
    if not isinstance(hidden, int) or hidden <= 0:
        return Decline("the quantized dim has a symbolic size", anchor)

    values, results = find_tails(h, hidden)
    mine = [r for r in results if isinstance(r, QuantTailMatch) and anchor in r.nodes]
    if not mine:
        declined = [r for r in results if isinstance(r, Decline)]
        return declined[0] if declined else None
    tail = mine[0]
    tails = [r for r in results if isinstance(r, QuantTailMatch) and r.key() == tail.key()]
    others = [r for r in results if r not in tails and isinstance(r, QuantTailMatch)]
    if others:
        return Decline(f"{h.name} is quantized in {len(others) + 1} different ways; left to Inductor", anchor)

    pro = _silu_mul(h)
    if isinstance(pro, Decline):
        return pro
    if pro is not None:
        g, up, act_dtype, nodes = pro
        prologue, x = "silu_mul", g
    else:
        if x_producer(h) != "materialized":
            return Decline(
                f"{h.name} is {_producer(h)}, which Inductor fuses with the quantization; "
                "the fused op only pays where the activation is silu(x) * up or already in memory", anchor)
        if not _rows_contiguous(val):
            return Decline(f"the rows of {h.name} are not contiguous in memory (the fused op would copy them)",
                           anchor)
        prologue, x, up, act_dtype, nodes = "identity", h, None, F32, []
    try:
        spec = ActQuantSpec(prologue, dtype_of(x), tails[0].quant, act_dtype=act_dtype, h_dtype=val.dtype,
                            numerics=numerics)
        spec.check_hidden(hidden)
    except SpecError as exc:
        return Decline(f"not expressible as an act_quant spec: {exc}", anchor)
    # Every node the fused op replaces must be read only inside the match: a value read
    # elsewhere stays computed, and the activation would be computed twice.
    inside = set(nodes) | {n for t in tails for n in t.nodes} | {v.node for v in values}
    for n in nodes[:-1] if nodes else []:
        outside = [u for u in n.users if u not in inside]
        if outside:
            return Decline(f"{n.name} of the activation is also read by {outside[0].name}", anchor)
    if nodes:
        outside = [u for u in h.users if u not in inside]
        if outside:
            return Decline(f"the activation {h.name} is also read by {outside[0].name}; fusing would compute "
                           "it twice", anchor)
    return ActQuantMatch(spec, x, up, h, tails, nodes, [v.node for v in values])


def _producer(h: fx.Node, depth: int = 8) -> str:
    """How to name h's producer in a decline: an RMSNorm (the norm -> quant pass's aten
    lowering, or a norm it declined) when an rsqrt is a few ops upstream, else h's op."""
    seen, frontier = set(), [h]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if any(is_op(n, aten.rsqrt.default) for n in frontier):
            return "an RMSNorm's output (quantized with it by the norm -> quant pass, or declined there)"
    root, _ = _view_root(h)
    op = getattr(root.target, "__name__", str(root.target)) if root.op == "call_function" else root.op
    return f"computed by {op}" + (f" (behind views, {root.name})" if root is not h else "")


def _rows_contiguous(val: torch.Tensor) -> bool:
    """Unit stride on the last dim and the leading dims collapsible to one row index."""
    try:
        shape, stride = list(val.shape), list(val.stride())
        if stride[-1] != 1 and shape[-1] != 1:
            return False
        for i in range(len(shape) - 2):
            if shape[i] != 1 and stride[i] != stride[i + 1] * shape[i + 1]:
                return False
        return True
    except Exception:  # unbacked symbolic strides: cannot prove it
        return False


def _silu_mul(h: fx.Node):
    """(g, up, act_dtype, nodes) when h = silu(g) * up in post-grad form; None when h is no
    such product; a Decline when it is one this pass cannot take."""
    if not is_op(h, aten.mul.Tensor) or len(h.args) != 2:
        return None
    for s_side, u_side in ((0, 1), (1, 0)):
        s, u = h.args[s_side], h.args[u_side]
        if not isinstance(s, fx.Node) or not isinstance(u, fx.Node):
            continue
        silu = _silu(s)
        if silu is None:
            continue
        g, act_dtype, nodes = silu
        if exact_upcast(u) and dtype_of(u.args[0]) == dtype_of(g):
            u_nodes, u = [u], u.args[0]
        else:
            u_nodes = []
        gv, uv = tensor_meta(g), tensor_meta(u)
        if gv is None or uv is None or tuple(gv.shape) != tuple(uv.shape):
            return Decline(f"silu(x) * up with up of another shape (broadcast): {h.name}", h)
        if gv.dtype != uv.dtype:
            return Decline(f"silu(x) * up with x {gv.dtype} and up {uv.dtype}", h)
        if not (_rows_contiguous(gv) and _rows_contiguous(uv)):
            return Decline(f"the rows of silu's input or of up are not contiguous in memory: {h.name}", h)
        return g, u, act_dtype, nodes + u_nodes + [h]
    return None


def _silu(s: fx.Node):
    """(g, act_dtype, nodes) if s = [convert(] g32 / (exp(-g32) + 1) [, act_dtype)], g32 = f32(g)."""
    nodes = []
    act_dtype = dtype_of(s)
    if is_convert(s) and isinstance(s.args[0], fx.Node) and dtype_of(s.args[0]) == F32:
        nodes.append(s)
        s = s.args[0]
    if not is_op(s, aten.div.Tensor) or not all(isinstance(a, fx.Node) for a in s.args[:2]):
        return None
    g32, den = s.args[0], s.args[1]
    if dtype_of(g32) != F32 or not is_op(den, aten.add.Tensor, aten.add.Scalar):
        return None
    e, one = (den.args[0], den.args[1]) if isinstance(den.args[0], fx.Node) else (den.args[1], den.args[0])
    if one != 1 or not is_op(e, aten.exp.default) or not is_op(e.args[0], aten.neg.default):
        return None
    if e.args[0].args[0] is not g32:
        return None
    chain = [e.args[0], e, den, s]
    if exact_upcast(g32):
        g = g32.args[0]
        chain.insert(0, g32)
    else:
        g = g32
    if act_dtype not in _FLOATS or dtype_of(g) not in _FLOATS:
        return None
    return g, act_dtype, chain + nodes

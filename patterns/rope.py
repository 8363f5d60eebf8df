"""Recognise RoPE writebacks into a fresh buffer, and the rotation that feeds them.

Models that apply interleaved RoPE this way (diffusers Wan and relatives)::

    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos

reach the post-grad graph as a fresh buffer (`empty`, `empty_like`, or `full` for
`zeros_like`) followed, per half, by ``slice(buf) -> copy(slice, src) ->
slice_scatter(buf, copy)``. `copy` casts the (usually f32) source to the buffer dtype.
Step-1 writebacks of two contiguous halves (`out[..., :h] = a; out[..., h:] = b`)
take the same shape with step 1.

This module only describes what it finds (:class:`RopeWriteback`, with a
:class:`Rotation` when x, cos and sin can be identified) and why it declined a
look-alike (:class:`Decline`); it knows nothing of how the pass rewrites them.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
import torch.fx as fx

from ..passes.graph_utils import is_op, tensor_meta

aten = torch.ops.aten
prims = torch.ops.prims

INT64_MAX = 2**63 - 1

# Allocations whose initial contents cannot matter once every element is overwritten.
_FRESH = (
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.empty_strided.default,
    aten.zeros_like.default,
    aten.zeros.default,
    aten.full.default,
    aten.full_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
)
# Ops whose output shares storage with their input.
_VIEWS = (
    aten.slice.Tensor, aten.select.int, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.as_strided.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.alias.default, aten.unflatten.int,
)

Layout = Literal["interleaved", "neox"]
Producer = Literal["fusible", "materialized"]

# Ops whose result is in memory whatever reads it: Inductor runs them as extern kernels
# (GEMMs, convolutions, attention), so a consumer cannot fuse them in.
_EXTERN = tuple(
    getattr(aten, name) for name in (
        "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
    ) if hasattr(aten, name)
)


@dataclasses.dataclass(frozen=True)
class Rotation:
    """`out = rotate(x)` identified behind a writeback.

    interleaved: pairs (x[2i], x[2i+1]); neox: pairs (x[i], x[i + D/2]).
    cos/sin are the table nodes as the model feeds them (possibly strided views of a
    full-width table sliced inline), broadcastable to the shape of one half of x.
    `f32_math`: the products and the sum are computed in f32 from exactly representable
    inputs, so a fused kernel doing f32 math with one final rounding reproduces them.
    """

    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    layout: Layout
    f32_math: bool


@dataclasses.dataclass(frozen=True)
class RopeWriteback:
    """A fresh buffer filled completely by two slice writebacks along one dim.

    kind "strided": `first` fills the even indices, `second` the odd ones (step 2).
    kind "halves": `first` fills `[0, split)`, `second` `[split, size)` (step 1).
    `first`/`second` are the sources as written (before the copy's implicit cast);
    `out` is the node holding the finished buffer (the last slice_scatter).
    """

    buffer: fx.Node
    kind: Literal["strided", "halves"]
    dim: int
    split: int
    first: fx.Node
    second: fx.Node
    out: fx.Node
    dtype: torch.dtype
    shape: tuple[int, ...]
    nodes: tuple[fx.Node, ...]  # buffer, copy targets, copies and scatters: dead after a rewrite
    rotation: Rotation | None = None


@dataclasses.dataclass(frozen=True)
class Decline:
    """A writeback-like construct that is deliberately left alone."""

    node: fx.Node
    reason: str


# --------------------------------------------------------------------- helpers
def _static_int(value) -> int | None:
    return value if isinstance(value, int) else None


def _scatter_params(node: fx.Node) -> tuple[int, int, int, int] | None:
    """(dim, start, stop, step) of a slice_scatter, normalised against the buffer size."""
    val = tensor_meta(node)
    if val is None:
        return None
    args = list(node.args) + [None] * (6 - len(node.args))
    dim = node.kwargs.get("dim", args[2] if args[2] is not None else 0)
    start = node.kwargs.get("start", args[3])
    end = node.kwargs.get("end", args[4])
    step = node.kwargs.get("step", args[5] if args[5] is not None else 1)
    rank = val.dim()
    if not isinstance(dim, int) or rank == 0:
        return None
    dim %= rank
    size = _static_int(val.shape[dim])
    start = 0 if start is None else _static_int(start)
    end = INT64_MAX if end is None else _static_int(end)
    step = _static_int(step)
    if size is None or start is None or end is None or step is None or step < 1:
        return None
    if start < 0:
        start += size
    if end < 0:
        end += size
    return dim, max(0, min(start, size)), max(0, min(end, size)), step


def _view_root(node: fx.Node) -> tuple[fx.Node, bool]:
    """Follow view ops back to the tensor that owns the storage; (root, went_through_a_view)."""
    through = False
    while is_op(node, *_VIEWS) and isinstance(node.args[0], fx.Node):
        node, through = node.args[0], True
    return node, through


def x_producer(x: fx.Node) -> Producer:
    """How the rotation's input x comes to be, behind any views.

    "fusible": computed by aten ops that Inductor turns into generated kernels (an RMSNorm,
    a cast, a bias add). Lowered to aten, the rotation joins that kernel and x is never
    written to memory; a fused RoPE kernel would have to read it back.
    "materialized": a graph input, a GEMM/convolution/attention output, a custom op or
    anything else Inductor does not generate code for: x is read from memory either way.
    """
    root, _ = _view_root(x)
    if root.op == "call_function" and root.target is operator.getitem and isinstance(root.args[0], fx.Node):
        root = root.args[0]  # one result of a tuple-returning op (var_mean, attention): that op decides
    if root.op != "call_function" or not isinstance(root.target, torch._ops.OpOverload):
        return "materialized"  # placeholders, get_attr, Python-level calls
    if root.target.namespace not in ("aten", "prims") or root.target.overloadpacket in _EXTERN:
        return "materialized"
    return "fusible"


def _is_copy_target(node: fx.Node) -> bool:
    """A slice whose value is never read: it only gives a copy its shape and dtype (or is dead)."""
    return all(
        is_op(user, aten.copy.default) and user.args[0] is node and user.args[1] is not node
        for user in node.users
    )


def _is_contiguous(val: torch.Tensor) -> bool:
    try:
        return bool(val.is_contiguous())
    except Exception:  # unbacked symbolic strides
        return False


def _describe(node: fx.Node) -> str:
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


# ------------------------------------------------------------------ writebacks
def _chain_from(head: fx.Node) -> list[fx.Node]:
    """head, then each slice_scatter that writes into the previous one's result."""
    chain = [head]
    while True:
        nxt = [u for u in chain[-1].users if is_op(u, aten.slice_scatter.default) and u.args[0] is chain[-1]]
        if len(nxt) != 1:
            return chain
        chain.append(nxt[0])


def _source_of(scatter: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """The value written by a slice_scatter and the copy that cast it (None: written directly)."""
    src = scatter.args[1]
    if is_op(src, aten.copy.default):
        return src.args[1], src
    return src, None


def _extra_readers(node: fx.Node, allowed: fx.Node | None) -> list[fx.Node]:
    """Users of a partly written buffer other than the next write and copy targets."""
    return [u for u in node.users if u is not allowed and not (is_op(u, aten.slice.Tensor) and _is_copy_target(u))]


def _coverage(params: list[tuple[int, int, int, int]], size: int) -> tuple[int, ...]:
    written = [0] * size
    for _, start, stop, step in params:
        for i in range(start, stop, step):
            written[i] += 1
    return tuple(written)


def _match_chain(chain: list[fx.Node]) -> RopeWriteback | Decline | None:
    head = chain[0]
    base = head.args[0]
    params = [_scatter_params(s) for s in chain]
    strided_like = any(p is not None and p[3] > 1 for p in params)
    if not isinstance(base, fx.Node):
        return None
    root, through_view = _view_root(base)
    fresh_root = is_op(root, *_FRESH)
    if not fresh_root:
        # Writes into an input or a computed tensor (KV-cache updates and the like) are
        # not RoPE writebacks; only report the strided look-alikes.
        if strided_like:
            return Decline(head, f"strided writeback into an existing tensor {_describe(root)}, not a fresh buffer")
        return None
    if through_view:
        return Decline(head, f"buffer is aliased: the writes go through a view {_describe(base)} of {_describe(root)}")
    aliases = [u for u in base.users if is_op(u, *_VIEWS) and u is not head and not _is_copy_target(u)]
    if aliases:
        return Decline(head, f"buffer is aliased by {_describe(aliases[0])} before it is fully written")
    if any(p is None for p in params):
        return Decline(head, "writeback with symbolic or unknown slice bounds")
    val = tensor_meta(base)
    if val is None:
        return None
    if not all(isinstance(s, int) for s in val.shape):
        # the aten replacement would need the sizes as graph values; not supported yet
        return Decline(head, "buffer has symbolic sizes (dynamic shapes): only static shapes are rewritten")
    dims = {p[0] for p in params}
    if len(dims) != 1:
        return Decline(head, f"writes along different dims {sorted(dims)}")
    dim = dims.pop()
    size = _static_int(val.shape[dim])
    if size is None:
        return Decline(head, "symbolic size along the written dim")

    # A read of the buffer between allocation and the last write sees uninitialised
    # (or half-written) memory: removing the buffer would change what it reads.
    for i, node in enumerate([base] + chain[:-1]):
        readers = _extra_readers(node, chain[i] if i < len(chain) else None)
        if readers:
            return Decline(head, f"buffer is read by {_describe(readers[0])} before it is fully written")

    covered = _coverage(params, size)
    steps = sorted({p[3] for p in params})
    if 0 in covered:
        missing = covered.count(0)
        return Decline(head, f"buffer only partly covered: {missing} of {size} indices along dim {dim} never written")
    if any(c > 1 for c in covered):
        return Decline(head, f"overlapping writes along dim {dim}")
    if len(chain) != 2:
        return Decline(head, f"{len(chain)} writebacks with step {'/'.join(map(str, steps))}: only 2 (step 2, or step-1 halves) are rewritten")
    (_, s0, e0, st0), (_, s1, e1, st1) = params
    if steps == [2]:
        kind, split = "strided", 0
        first_idx = 0 if s0 == 0 else 1
    elif steps == [1]:
        kind = "halves"
        first_idx = 0 if s0 == 0 else 1
        split = e0 if first_idx == 0 else e1
    else:
        return Decline(head, f"writebacks with steps {steps} are not a RoPE interleave")
    if not _is_contiguous(val):
        return Decline(head, "buffer is not contiguous (empty_like of a strided tensor): replacements would change its layout")

    sources = [_source_of(s) for s in chain]
    for src, _copy in sources:
        sval = tensor_meta(src) if isinstance(src, fx.Node) else None
        if sval is None:
            return Decline(head, "written value has no tensor metadata")
    first, second = sources[first_idx][0], sources[1 - first_idx][0]
    nodes = [base]
    for node in [base] + chain[:-1]:
        nodes += [u for u in node.users if is_op(u, aten.slice.Tensor) and _is_copy_target(u)]
    nodes += [c for _, c in sources if c is not None] + chain
    return RopeWriteback(
        buffer=base, kind=kind, dim=dim, split=split, first=first, second=second, out=chain[-1],
        dtype=val.dtype, shape=tuple(int(s) for s in val.shape), nodes=tuple(dict.fromkeys(nodes)),
    )


# ------------------------------------------------------------------- rotation
def _strip_upcast(node):
    """Skip a lossless upcast to f32 (bf16/f16 -> f32): the kernel upcasts in registers."""
    while is_op(node, prims.convert_element_type.default, aten._to_copy.default):
        src = node.args[0]
        sval, val = tensor_meta(src), tensor_meta(node)
        if sval is None or val is None or val.dtype != torch.float32:
            break
        if sval.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            break
        node = src
    return node


def _half_of(node) -> tuple[fx.Node, Layout, int] | None:
    """If `node` is one half of some x along its last dim: (x, layout, which half)."""
    node = _strip_upcast(node)
    if not isinstance(node, fx.Node):
        return None
    # x.unflatten(-1, (-1, 2)).unbind(-1)[i]  or  ...[..., i]
    if node.op == "call_function" and node.target is operator.getitem and is_op(node.args[0], aten.unbind.int):
        unbind, which = node.args[0], node.args[1]
        pair_dim = unbind.args[1] if len(unbind.args) > 1 else 0
        return _pairs_of(unbind.args[0], pair_dim, which)
    if is_op(node, aten.select.int):
        return _pairs_of(node.args[0], node.args[1], node.args[2])
    if is_op(node, aten.slice.Tensor):
        x = node.args[0]
        xval, val = tensor_meta(x), tensor_meta(node)
        if xval is None or val is None:
            return None
        params = _scatter_params_like(node, xval)
        if params is None or params[0] != xval.dim() - 1:
            return None
        _, start, stop, step = params
        size = xval.shape[-1]
        if step == 2 and start in (0, 1) and stop == size and size % 2 == 0:
            return x, "interleaved", start
        if step == 1 and size % 2 == 0:
            if (start, stop) == (0, size // 2):
                return x, "neox", 0
            if (start, stop) == (size // 2, size):
                return x, "neox", 1
    return None


def _scatter_params_like(node: fx.Node, val: torch.Tensor):
    """(dim, start, stop, step) of an aten.slice against the sliced tensor `val`."""
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = (args[1] or 0), args[2], args[3], (args[4] or 1)
    if not all(isinstance(v, int) or v is None for v in (dim, start, end, step)):
        return None
    dim %= val.dim()
    size = _static_int(val.shape[dim])
    if size is None:
        return None
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    return dim, max(0, min(start, size)), max(0, min(end, size)), step


def _pairs_of(reshaped, pair_dim, which) -> tuple[fx.Node, Layout, int] | None:
    """`reshaped` is x viewed as [..., D/2, 2] and the pair index `which` is taken on its last dim."""
    if not is_op(reshaped, aten.reshape.default, aten.view.default, aten.unflatten.int):
        return None
    x = reshaped.args[0]
    rval, xval = tensor_meta(reshaped), tensor_meta(x)
    if rval is None or xval is None or not isinstance(pair_dim, int) or which not in (0, 1):
        return None
    if pair_dim % rval.dim() != rval.dim() - 1 or rval.shape[-1] != 2:
        return None
    if tuple(rval.shape[:-2]) != tuple(xval.shape[:-1]) or rval.shape[-2] * 2 != xval.shape[-1]:
        return None
    return x, "interleaved", which


def _product(node) -> tuple[fx.Node, fx.Node] | None:
    if is_op(node, aten.mul.Tensor) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return node.args[0], node.args[1]
    return None


def _split_product(node) -> list[tuple[fx.Node, Layout, int, fx.Node]]:
    """Ways to read mul(u, v) as half_of_x * table: [(x, layout, which half, table)].

    Both operands can look like halves (Wan slices its full-width tables with step 2,
    just like x), so every reading is returned and the caller keeps the one whose x
    is shared by all four products.
    """
    operands = _product(node)
    if operands is None:
        return []
    out = []
    for half, table in (operands, operands[::-1]):
        found = _half_of(half)
        if found is not None:
            out.append((*found, table))
    return out


def _terms(node, op) -> tuple[fx.Node, fx.Node] | None:
    if is_op(node, op) and len(node.args) == 2 and not node.kwargs.get("alpha", 1) != 1:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return a, b
    return None


def match_rotation(wb: RopeWriteback) -> Rotation | None:
    """Identify first = x1*cos - x2*sin, second = x1*sin + x2*cos (any operand order)."""
    if wb.dim != len(wb.shape) - 1:
        return None
    diff = _terms(wb.first, aten.sub.Tensor)
    total = _terms(wb.second, aten.add.Tensor)
    if diff is None or total is None:
        return None
    readings = [_split_product(t) for t in (*diff, *total)]
    for x, layout, which, cos in readings[0]:
        if which != 0:
            continue
        pick = lambda options, w: [t for (y, lay, w2, t) in options if y is x and lay == layout and w2 == w]
        sins = pick(readings[1], 1)
        if len(sins) != 1:
            continue
        sin = sins[0]
        # second = x1*sin + x2*cos, the two terms in either order
        if any(cos in pick(readings[2 + i], 1) and sin in pick(readings[3 - i], 0) for i in (0, 1)):
            break
    else:
        return None
    wanted = "interleaved" if wb.kind == "strided" else "neox"
    if layout != wanted or (wb.kind == "halves" and wb.split * 2 != wb.shape[-1]):
        return None
    xval = tensor_meta(x)
    if xval is None or tuple(xval.shape) != wb.shape:
        return None
    math_nodes = [wb.first, wb.second, *diff, *total]
    f32_math = all(tensor_meta(n) is not None and tensor_meta(n).dtype == torch.float32 for n in math_nodes)
    tables = [_strip_upcast(cos), _strip_upcast(sin)]
    f32_math = f32_math and all(
        tensor_meta(t) is not None and tensor_meta(t).dtype in (torch.float32, torch.bfloat16, torch.float16)
        for t in tables
    )
    return Rotation(x=x, cos=tables[0], sin=tables[1], layout=layout, f32_math=f32_math)


# ----------------------------------------------------------------------- entry
def find_rope_writebacks(graph: fx.Graph) -> tuple[list[RopeWriteback], list[Decline]]:
    """All RoPE writebacks of `graph` (with their rotation when identified) and the declined look-alikes."""
    found: list[RopeWriteback] = []
    declined: list[Decline] = []
    for node in graph.find_nodes(op="call_function", target=aten.slice_scatter.default):
        if is_op(node.args[0], aten.slice_scatter.default):
            continue  # not the head of a chain
        result = _match_chain(_chain_from(node))
        if isinstance(result, Decline):
            declined.append(result)
        elif result is not None:
            found.append(dataclasses.replace(result, rotation=match_rotation(result)))
    return found, declined

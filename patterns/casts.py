"""Matching for the no-op cast pass: dtype conversions, layout-only ops, aliasing.

This module only *describes* what it finds (a :class:`RoundTrip`, a :class:`Use`);
`passes/noop_casts.py` decides what to rewrite.

Which chains are lossless: a value of dtype `d` survives a conversion to `w` unchanged
when every value of `d` is representable in `w`. Among the float types fusewright
touches, bf16 and f16 both fit in f32 and f64, and f32 fits in f64; bf16 and f16 do
not fit in each other (bf16 has the range, f16 the mantissa). So a chain of casts and
layout ops that starts at dtype `d`, only passes through dtypes that hold `d` exactly
and ends at `d` again computes a rearrangement of its input: nothing else. fp8 and
integer types are never part of a match, even where a particular chain happens to be
exact, because their conversions saturate, wrap or truncate.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from typing import Any, Iterator

import torch
import torch.fx as fx

from ..passes.graph_utils import is_op, tensor_meta

aten = torch.ops.aten
prims = torch.ops.prims

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# dtype -> the dtypes that represent every one of its values exactly.
_HOLDS: dict[torch.dtype, frozenset[torch.dtype]] = {
    torch.bfloat16: frozenset({torch.bfloat16, torch.float32, torch.float64}),
    torch.float16: frozenset({torch.float16, torch.float32, torch.float64}),
    torch.float32: frozenset({torch.float32, torch.float64}),
    torch.float64: frozenset({torch.float64}),
}


def holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every `narrow` value converts to `wide` and back unchanged."""
    return wide in _HOLDS.get(narrow, ())


# ---------------------------------------------------------------- casts

CAST_TARGETS = (prims.convert_element_type.default, aten._to_copy.default, aten.to.dtype)


@dataclasses.dataclass(frozen=True)
class Cast:
    node: fx.Node
    source: fx.Node
    src_dtype: torch.dtype
    dtype: torch.dtype
    aliases_source: bool  # `aten.to.dtype` to the same dtype without copy=True returns its input


def as_cast(node: Any) -> Cast | None:
    """`node` as a pure dtype conversion on one device, or None.

    A `_to_copy` that also moves the tensor, changes its layout or pins memory is
    not a dtype conversion; neither is any cast without fake tensor metadata (its
    dtypes are then unknown).
    """
    if not is_op(node, *CAST_TARGETS) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    src, out = tensor_meta(source), tensor_meta(node)
    if src is None or out is None or src.device != out.device:
        return None
    aliases = False
    if node.target is aten._to_copy.default:
        kw = node.kwargs
        if len(node.args) > 1 or kw.get("layout") not in (None, torch.strided) or kw.get("pin_memory"):
            return None
    elif node.target is aten.to.dtype:
        copy = node.args[3] if len(node.args) > 3 else node.kwargs.get("copy", False)
        aliases = src.dtype == out.dtype and not copy
    return Cast(node, source, src.dtype, out.dtype, aliases)


# ---------------------------------------------------------------- layout ops

# Ops that only rearrange (or copy) elements: converting the dtype before or after
# them gives the same values. Their first argument is the tensor; the others are
# sizes, dims, indices, memory formats.
LAYOUT_OPS = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.narrow.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
)

# Of those, the ones whose result may share storage with their input (reshape and
# contiguous do when they can).
_ALIASING_LAYOUT_OPS = frozenset(LAYOUT_OPS) - {aten.clone.default}


def is_layout_op(node: Any) -> bool:
    """A layout-only op whose only tensor argument is its first one."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in LAYOUT_OPS:
        return False
    if not node.args or not isinstance(node.args[0], fx.Node) or tensor_meta(node.args[0]) is None:
        return False
    rest: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), rest.append)
    # Symbolic sizes arrive as nodes; tensors must not.
    return all(tensor_meta(n) is None for n in rest)


def aliases_input(node: fx.Node) -> bool:
    """Whether `node`'s result may share storage with its first argument."""
    if node.op != "call_function":
        return False
    if node.target in _ALIASING_LAYOUT_OPS:
        return True
    cast = as_cast(node)
    if cast is not None:
        return cast.aliases_source
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or not schema.arguments:
        return False
    # Views (`Tensor(a)`) and in-place ops (`Tensor(a!)`, returning `self`) both alias.
    out_alias, in_alias = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return out_alias is not None and in_alias is not None


def alias_root(node: fx.Node) -> fx.Node:
    """The node owning the storage that `node` may be a view of."""
    seen = 0
    while aliases_input(node) and isinstance(node.args[0], fx.Node) and seen < 1000:
        node, seen = node.args[0], seen + 1
    return node


# ---------------------------------------------------------------- round trips


@dataclasses.dataclass
class RoundTrip:
    """`cast_back` computes `layout` applied to `source`: the casts in between are exact.

    `layout` lists the layout-op nodes from the source side to the cast side; `chain`
    every node strictly between `source` and `cast_back` (casts and layout ops), the
    candidates for removal once nothing else reads them. `wide_dtypes` are the dtypes
    the value passed through.
    """

    cast_back: fx.Node
    source: fx.Node
    dtype: torch.dtype
    layout: list[fx.Node]
    chain: list[fx.Node]
    wide_dtypes: tuple[torch.dtype, ...]

    @property
    def same_dtype(self) -> bool:
        return not self.chain

    @property
    def kind(self) -> str:
        if self.same_dtype:
            return "same_dtype"
        return "round_trip_layout" if self.layout else "round_trip"


MAX_CHAIN = 64


def match_round_trip(node: fx.Node) -> RoundTrip | None:
    """If `node` is a cast that returns its chain's starting value (rearranged), describe it.

    Walks from the cast towards the inputs through casts and layout ops while every
    value on the way holds the target dtype exactly, and stops at the first value of
    the target dtype that a cast consumed (the narrow tensor). Anything else on the way
    (arithmetic, a lossy dtype, fp8, an integer) ends the walk with no match.
    """
    back = as_cast(node)
    if back is None or back.dtype not in FLOAT_DTYPES:
        return None
    target = back.dtype
    if back.src_dtype == target:
        return RoundTrip(node, back.source, target, [], [], ())
    chain: list[fx.Node] = []
    layout: list[fx.Node] = []
    wide: list[torch.dtype] = []
    current = back.source
    while len(chain) < MAX_CHAIN:
        val = tensor_meta(current)
        if val is None or not holds_exactly(val.dtype, target):
            return None
        chain.append(current)
        if val.dtype not in wide:
            wide.append(val.dtype)
        cast = as_cast(current)
        if cast is not None:
            if cast.src_dtype == target:
                chain.reverse()
                layout.reverse()
                return RoundTrip(node, cast.source, target, layout, chain, tuple(wide))
            current = cast.source
        elif is_layout_op(current):
            layout.append(current)
            current = current.args[0]
        else:
            return None
    return None


# ---------------------------------------------------------------- consumers


class UseKind(enum.Enum):
    OUTPUT = "output"  # returned by the graph
    MUTATES = "mutates"  # written through this argument (or handed over as a mutable base)
    COMPUTE = "compute"  # an aten/prims op whose values do not depend on the input's layout
    VIEW = "view"  # an aten op whose result may alias this argument
    OPAQUE = "opaque"  # a custom op, auto_functionalized, or any other aten op: sees the exact tensor
    UNKNOWN = "unknown"  # anything we cannot read a schema for


AUTO_FUNCTIONALIZED = tuple(
    op
    for op in (
        getattr(torch.ops.higher_order, "auto_functionalized", None),
        getattr(torch.ops.higher_order, "auto_functionalized_v2", None),
    )
    if op is not None
)

# aten ops whose result values and layout do not depend on the input's strides beyond
# what fake propagation reports; besides ops tagged pointwise.
_COMPUTE_OPS = {
    aten.sum.default, aten.sum.dim_IntList, aten.mean.dim, aten.mean.default,
    aten.amax.default, aten.amin.default, aten.max.default, aten.min.default,
    aten.prod.default, aten.prod.dim_int, aten.var.correction, aten.argmax.default,
    aten.argmin.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
    aten.baddbmm.default, aten.cat.default, aten.stack.default, aten.where.self,
    aten.constant_pad_nd.default, aten.cumsum.default, aten._softmax.default,
    aten._log_softmax.default,
}
_NOT_COMPUTE = {aten.as_strided.default, aten.empty_like.default, aten.new_empty_strided.default,
                aten.copy.default}


def _positions(args: Any, node: fx.Node) -> bool:
    found: list[bool] = []
    fx.node.map_arg(args, lambda n: found.append(n is node))
    return any(found)


def _schema_writes(schema: Any, call_args: tuple, call_kwargs: dict, node: fx.Node) -> bool | None:
    """Whether `node` is passed to a written argument; None if it is passed nowhere we can see."""
    seen = False
    for i, arg in enumerate(schema.arguments):
        if arg.kwarg_only or i >= len(call_args):
            value = call_kwargs.get(arg.name)
        else:
            value = call_args[i]
        if value is None or not _positions(value, node):
            continue
        seen = True
        if arg.alias_info is not None and arg.alias_info.is_write:
            return True
    return False if seen else None


def classify_use(user: fx.Node, node: fx.Node) -> UseKind:
    """How `user` consumes the tensor `node`."""
    if user.op == "output":
        return UseKind.OUTPUT
    if user.op != "call_function":
        return UseKind.UNKNOWN
    target = user.target
    if AUTO_FUNCTIONALIZED and target in AUTO_FUNCTIONALIZED:
        op = user.args[0] if user.args else None
        schema = getattr(op, "_schema", None)
        if schema is None:
            return UseKind.UNKNOWN
        if _positions(user.kwargs.get("_all_bases", ()), node):
            return UseKind.MUTATES  # v2 hands mutable arguments over as bases
        writes = _schema_writes(schema, (), dict(user.kwargs), node)
        return UseKind.MUTATES if writes else UseKind.OPAQUE
    schema = getattr(target, "_schema", None)
    if not isinstance(target, torch._ops.OpOverload) or schema is None:
        return UseKind.UNKNOWN
    if _schema_writes(schema, tuple(user.args), dict(user.kwargs), node):
        return UseKind.MUTATES
    if target.namespace not in ("aten", "prims"):
        return UseKind.OPAQUE
    if target is aten.clone.default:
        return UseKind.COMPUTE  # a fresh copy whose layout follows its input, like pointwise ops
    if target in LAYOUT_OPS or aliases_input(user):
        return UseKind.VIEW if user.args and user.args[0] is node else UseKind.OPAQUE
    if target in _NOT_COMPUTE or schema.is_mutable:
        return UseKind.OPAQUE
    if torch.Tag.pointwise in target.tags or target in _COMPUTE_OPS or as_cast(user) is not None:
        return UseKind.COMPUTE
    return UseKind.OPAQUE


def alias_closure(node: fx.Node) -> Iterator[tuple[fx.Node, fx.Node, UseKind]]:
    """(user, value used, kind) for every use of `node` and of every view taken of it."""
    stack, seen = [node], {node}
    while stack:
        value = stack.pop()
        for user in value.users:
            kind = classify_use(user, value)
            yield user, value, kind
            if kind is UseKind.VIEW and user not in seen:
                seen.add(user)
                stack.append(user)


def writers(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Storage owner -> the nodes that write to it (directly or through a view).

    auto_functionalized nodes do not count: they are functional until Inductor
    reinplaces them, and it reinplaces only where no later reader would notice.
    """
    found: dict[fx.Node, list[fx.Node]] = {}
    for user in graph.nodes:
        if user.op != "call_function" or (AUTO_FUNCTIONALIZED and user.target in AUTO_FUNCTIONALIZED):
            continue
        inputs: list[fx.Node] = []
        fx.node.map_arg((user.args, user.kwargs), inputs.append)
        for value in inputs:
            kind = classify_use(user, value)
            if kind is UseKind.MUTATES or (kind is UseKind.UNKNOWN and tensor_meta(value) is not None
                                            and not _known_pure(user)):
                found.setdefault(alias_root(value), []).append(user)
    return found


def _known_pure(node: fx.Node) -> bool:
    return node.target is operator.getitem  # picks a tuple element: reads nothing


def same_geometry(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, device, shape, strides and storage offset (symbolic sizes compared soundly)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    pairs = list(zip(a.shape, b.shape)) + list(zip(a.stride(), b.stride()))
    pairs.append((a.storage_offset(), b.storage_offset()))
    return all(statically_known_true(x == y) for x, y in pairs)

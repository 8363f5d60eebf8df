"""Recognising opaque custom ops that compute a known semantic op, by their schema.

Three schemas are understood (argument names may differ; types and mutation may not):

=================  =====================================================  ==================
form               schema                                                 semantic op
=================  =====================================================  ==================
``out``            ``(Tensor(a!) out, Tensor x, Tensor? w, float eps) -> ()``  ``rms_norm``
``functional``     ``(Tensor x, Tensor? w, float eps) -> Tensor``              ``rms_norm``
``fused_add``      ``(Tensor(a!) x, Tensor(b!) residual, Tensor? w, float eps) -> ()``  ``fused_add_rms_norm``
=================  =====================================================  ==================

(``out`` and ``fused_add`` are vLLM's ``_C.rms_norm`` / ``_C.fused_add_rms_norm``.)

In a post-grad graph a mutating op is wrapped by functionalization:

* ``auto_functionalized(op, out=buf, input=x, ...)``: ``getitem(node, 1 + i)`` is the
  new value of the i-th mutated argument (schema order);
* ``auto_functionalized_v2(op, input=x, ..., _out_base_index=0, _all_bases=[buf])``:
  ``getitem(node, 1 + j)`` is the new value of base j; a mutated argument that is a
  view of its base (``_out_size`` / ``_out_slice_dim`` ...) is declined.

:func:`find_opaque_calls` returns an :class:`OpaqueCall` per configured op, and a
:class:`Declined` (node, reason) for each configured op it cannot describe safely.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping

import torch
import torch.fx as fx

# The functionalization wrappers, by name (either may be missing from a torch build).
_HOPS: dict[Any, str] = {
    hop: name
    for name in ("auto_functionalized", "auto_functionalized_v2")
    if (hop := getattr(torch.ops.higher_order, name, None)) is not None
}

SEMANTIC_OF_FORM = {"out": "rms_norm", "functional": "rms_norm", "fused_add": "fused_add_rms_norm"}
SCHEMAS = {
    "out": "(Tensor(a!) out, Tensor x, Tensor? weight, float eps) -> ()",
    "functional": "(Tensor x, Tensor? weight, float eps) -> Tensor",
    "fused_add": "(Tensor(a!) x, Tensor(b!) residual, Tensor? weight, float eps) -> ()",
}
# Role of each positional argument, per form.
_ROLES = {"out": ("out", "x", "weight", "eps"), "functional": ("x", "weight", "eps"),
          "fused_add": ("x", "residual", "weight", "eps")}
# Roles written by the op, in schema order.
_MUTATED = {"out": ("out",), "functional": (), "fused_add": ("x", "residual")}


@dataclasses.dataclass
class OpaqueCall:
    """One configured opaque op in the graph, with its arguments by role."""

    node: fx.Node  # the op call, or the auto_functionalized(_v2) node
    op_name: str  # "mylib::rms_norm.default"
    form: str  # "out", "functional" or "fused_add"
    semantic: str  # "rms_norm" or "fused_add_rms_norm"
    wrapper: str  # "direct", "auto_functionalized" or "auto_functionalized_v2"
    args: dict[str, Any]  # role -> fx.Node / float / None
    # role of a mutated argument -> the getitem nodes reading its new value
    new_values: dict[str, list[fx.Node]]

    @property
    def how(self) -> str:
        return self.op_name + ("" if self.wrapper == "direct" else f" in {self.wrapper}")


@dataclasses.dataclass
class Declined:
    node: fx.Node
    reason: str


def classify_schema(schema: torch._C.FunctionSchema) -> str | None:
    """The form of `schema` ("out", "functional", "fused_add"), or None."""
    args = list(schema.arguments)
    if any(a.kwarg_only and not a.has_default_value() for a in args):
        return None
    kinds = []
    for a in args:
        written = a.alias_info is not None and a.alias_info.is_write
        kinds.append((str(a.type), written))
    tensor, opt = "Tensor", "Optional[Tensor]"
    returns = [str(r.type) for r in schema.returns]
    if len(kinds) == 4 and not returns and kinds[3] == ("float", False) and kinds[2] in ((tensor, False), (opt, False)):
        if kinds[0] == (tensor, True) and kinds[1] == (tensor, False):
            return "out"
        if kinds[0] == (tensor, True) and kinds[1] == (tensor, True):
            return "fused_add"
    if (len(kinds) == 3 and returns == [tensor] and kinds[0] == (tensor, False)
            and kinds[1] in ((tensor, False), (opt, False)) and kinds[2] == ("float", False)
            and schema.returns[0].alias_info is None):
        return "functional"
    return None


def _op_name(op: Any) -> str:
    schema = op._schema
    return f"{schema.name}.{schema.overload_name or 'default'}"


def configured_semantic(op: Any, mapping: Mapping[str, str]) -> str | None:
    """The semantic op `mapping` names for OpOverload `op` ("ns::op" or "ns::op.overload")."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    full = _op_name(op)
    return mapping.get(full) or mapping.get(op._schema.name)


def _bind(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            values[a.name] = args[i]
        elif a.name in kwargs:
            values[a.name] = kwargs[a.name]
        elif a.has_default_value():
            values[a.name] = a.default_value
        else:
            raise KeyError(a.name)
    return values


def describe(node: fx.Node, mapping: Mapping[str, str]) -> OpaqueCall | Declined | None:
    """Describe `node` if it calls (or wraps) a configured op; None if it is not one."""
    if node.op != "call_function":
        return None
    wrapper = _HOPS.get(node.target, "direct")
    op = node.args[0] if wrapper != "direct" and node.args else node.target
    semantic = configured_semantic(op, mapping)
    if semantic is None:
        return None
    name = _op_name(op)
    form = classify_schema(op._schema)
    if form is None:
        return Declined(node, f"{name}: schema {op._schema} is none of the de-opaquable schemas "
                              f"({'; '.join(SCHEMAS.values())})")
    if SEMANTIC_OF_FORM[form] != semantic:
        return Declined(node, f"{name} is configured as {semantic}, but its schema is the "
                              f"{SEMANTIC_OF_FORM[form]} one: {SCHEMAS[form]}")
    if (wrapper == "direct") != (form == "functional"):
        return Declined(node, f"{name}: a mutating op called directly (not functionalized) is left alone")
    names = [a.name for a in op._schema.arguments]
    roles = _ROLES[form]
    try:
        if wrapper == "auto_functionalized_v2":
            bound, bases = _bind_v2(node, op, names, form)
        else:
            bound = _bind(op, node.args if wrapper == "direct" else (), dict(node.kwargs))
            bases = None
    except (KeyError, ValueError) as exc:
        return Declined(node, f"{name}: {exc.args[0] if isinstance(exc, ValueError) else f'argument {exc} missing'}")
    args = {role: bound[n] for role, n in zip(roles, names)}
    new_values: dict[str, list[fx.Node]] = {role: [] for role in _MUTATED[form]}
    if wrapper != "direct":
        slot_of = {}
        for i, role in enumerate(_MUTATED[form]):
            slot_of[1 + (bases[role] if bases is not None else i)] = role
        for user in node.users:
            if user.target is not operator.getitem or user.args[1] not in slot_of:
                return Declined(node, f"{name}: output used other than by reading a mutated argument ({user.format_node()})")
            new_values[slot_of[user.args[1]]].append(user)
    return OpaqueCall(node, name, form, semantic, wrapper, args, new_values)


def _bind_v2(node: fx.Node, op: Any, names: list[str], form: str) -> tuple[dict[str, Any], dict[str, int]]:
    kwargs = dict(node.kwargs)
    all_bases = kwargs.get("_all_bases") or []
    bound: dict[str, Any] = {}
    bases: dict[str, int] = {}
    mutated = dict(zip(_ROLES[form], names))
    for role in _MUTATED[form]:
        arg = mutated[role]
        index = kwargs.get(f"_{arg}_base_index")
        if index is None or not 0 <= index < len(all_bases):
            raise ValueError(f"mutated argument '{arg}' has no base tensor")
        view_keys = [k for k in kwargs if k.startswith(f"_{arg}_") and k not in (f"_{arg}_base_index", f"_{arg}_alias")]
        if view_keys:
            raise ValueError(f"mutated argument '{arg}' is a view of a larger buffer ({', '.join(sorted(view_keys))})")
        bound[arg] = all_bases[index]
        bases[role] = index
    if len(set(bases.values())) != len(bases):
        raise ValueError("two mutated arguments share one buffer")
    for a in op._schema.arguments:
        if a.name in bound:
            continue
        if a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            raise KeyError(a.name)
    return bound, bases


def find_opaque_calls(graph: fx.Graph, mapping: Mapping[str, str]) -> tuple[list[OpaqueCall], list[Declined]]:
    found: list[OpaqueCall] = []
    declined: list[Declined] = []
    for node in graph.nodes:
        result = describe(node, mapping)
        if isinstance(result, OpaqueCall):
            found.append(result)
        elif isinstance(result, Declined):
            declined.append(result)
    return found, declined

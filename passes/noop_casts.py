"""Remove dtype conversions that cannot change a value (the cleanup pass; runs last).

Each removed conversion is a full read and write of its tensor: Inductor fuses a
cast chain into its consumer when it can, but in front of an opaque op, an extern
kernel or a graph output the chain becomes a copy kernel of its own.

What goes (see `patterns/casts.py` for which dtype chains are exact):

* lossless round trips `narrow -> wide -> narrow` (narrow bf16/f16, wide f32/f64;
  also f32 -> f64 -> f32), also with layout-only ops between the casts, which are
  replayed on the narrow tensor (a `view` that needs the wide copy's dense strides
  becomes a `reshape`);
* conversions to the dtype a tensor already has (`convert_element_type`,
  `_to_copy`, `.to(copy=True)`);
* round trips whose wide value has other consumers: only the cast-back's readers move
  to the narrow tensor, the wide value stays for the others;
* all of the above in front of custom ops and `auto_functionalized(_v2)` when the op
  receives a tensor of the same shape, strides and offset.

Before (post-grad, a round trip through a reshape in front of an opaque op)::

    %cvt   = prims.convert_element_type(%x, torch.float32)      # x: bf16[2, 32, 4, 64]
    %view  = aten.reshape(%cvt, [2, 32, 256])
    %cvt_1 = prims.convert_element_type(%view, torch.bfloat16)
    %gate  = fusewright_example.opaque_gate(%cvt_1)

After::

    %reshape = aten.reshape(%x, [2, 32, 256])                   # bf16, same strides
    %gate    = fusewright_example.opaque_gate(%reshape)

What stays (each recorded as a skip with its reason):

* lossy chains (f32 -> bf16 -> f32, anything through bf16 <-> f16, fp8, integers):
  never matched in the first place;
* a copy that a consumer writes to (a mutable argument, an auto_functionalized
  base), a copy of a tensor that is written to after the copy was taken, a round
  trip whose wide value is written to;
* a copy returned by the graph when the replacement would alias a graph input or
  another output, or would have other strides;
* a copy read by an op that sees layout (custom ops, views, most aten ops) when the
  replacement's shape/strides/offset differ (e.g. after a slice or an expand: the op
  would need a copy anyway). Pointwise ops, reductions and matmuls accept another
  layout as long as the change is absorbed before it reaches anything that sees it
  (checked by re-running fake propagation forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..patterns import casts
from ..patterns.casts import RoundTrip, UseKind, alias_root, classify_use, same_geometry
from .base import GraphPass, PassContext
from .graph_utils import insert_call, is_op, tensor_meta

aten = torch.ops.aten

# How far forward a layout change may travel through compute ops before it must be
# absorbed (a reduction, a matmul, a pointwise op whose result has the old layout).
_MAX_FORWARD = 32


class _Refused(Exception):
    """A reader of the copy that must keep it; the message is the skip reason."""


class EliminateNoopCasts(GraphPass):
    name = "eliminate_noop_casts"
    order = 90
    extra_source_modules = (casts,)

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        state = _GraphState(graph)
        for node in [n for n in graph.nodes if is_op(n, *casts.CAST_TARGETS)]:
            if node in state.erased:
                continue
            trip = casts.match_round_trip(node)
            if trip is None:
                continue
            with ctx.at(node):
                ctx.matched()
                self._rewrite(graph, trip, ctx, state)

    # ------------------------------------------------------------------ one match
    def _rewrite(self, graph: fx.Graph, trip: RoundTrip, ctx: PassContext, state: "_GraphState") -> None:
        back = trip.cast_back
        # A write to the source after the copy was taken would reach the moved readers; a
        # write to the wide value (or its views) before the cast back is part of its value.
        here = state.position[back]
        if any(state.position.get(w, -1) > here for w in state.writers.get(alias_root(trip.source), ())):
            ctx.skipped(f"{trip.kind}: the source tensor is written to after the copy", back)
            return
        if any(alias_root(n) in state.writers for n in trip.chain):
            ctx.skipped(f"{trip.kind}: the wide value is written to in the graph", back)
            return
        written = self._written_copy(back)
        if written:
            ctx.skipped(f"{trip.kind}: kept, {written}", back)
            return
        try:
            replacement, new_nodes = self._replay_layout(graph, trip)
        except _Refused as refusal:
            ctx.skipped(f"{trip.kind}: kept for {refusal}", back)
            return
        r_val, b_val = tensor_meta(replacement), tensor_meta(back)
        if r_val is None or b_val is None or r_val.dtype != b_val.dtype or r_val.shape != b_val.shape:
            self._erase_unused(reversed(new_nodes), state)
            ctx.skipped(f"{trip.kind}: no fake metadata for the replacement", back)
            return

        moved, reasons = 0, []
        for user in list(back.users):
            try:
                updates = self._check_user(user, back, replacement, state)
            except _Refused as refusal:
                reasons.append(str(refusal))
                continue
            user.replace_input_with(back, replacement)
            for node, val in updates.items():
                node.meta["val"] = val
            moved += 1

        self._erase_unused([back, *reversed(trip.chain)], state)
        self._erase_unused(reversed(new_nodes), state)
        for reason in dict.fromkeys(reasons):
            ctx.skipped(f"{trip.kind}: kept for {reason}", back)
        if moved:
            ctx.rewritten(detail=trip.kind)
            if any(n not in state.erased for n in trip.chain):
                # The wide value has other readers: it stays, only the cast back went.
                details = ctx.stats.details
                details["wide_value_kept"] = details.get("wide_value_kept", 0) + 1

    @staticmethod
    def _written_copy(back: fx.Node) -> str | None:
        """Why no reader may leave the copy: someone writes to it (or to a view of it)."""
        for user, _, kind in casts.alias_closure(back):
            if kind is UseKind.MUTATES:
                return f"the copy is written to by {user.name}"
            if kind is UseKind.UNKNOWN:
                return f"the copy is read by {user.name}, an op without a schema"
        return None

    def _replay_layout(self, graph: fx.Graph, trip: RoundTrip) -> tuple[fx.Node, list[fx.Node]]:
        """The layout ops of the chain, applied to the narrow source (before the cast back).

        Raises _Refused (with every node it made erased) when one does not apply.
        """
        value, created = trip.source, []
        with graph.inserting_before(trip.cast_back):
            for op in trip.layout:
                try:
                    value = self._replay_one(graph, op, value)
                except _Refused:
                    for node in reversed(created):
                        graph.erase_node(node)
                    raise
                created.append(value)
        return value, created

    @staticmethod
    def _replay_one(graph: fx.Graph, op: fx.Node, value: fx.Node) -> fx.Node:
        args, kwargs = (value, *op.args[1:]), dict(op.kwargs)
        target = op.target
        if not _fake_runs(target, args, kwargs):
            # A wide cast may have made a dense copy of a strided tensor (`_to_copy` of an
            # expand, say) that a `view` after it relies on; the narrow tensor still has
            # the old strides. `reshape` gives the same values (a view where it can be one).
            if target in (aten.view.default, aten._unsafe_view.default) and _fake_runs(
                    aten.reshape.default, args, kwargs):
                target = aten.reshape.default
            else:
                raise _Refused(f"{op.name}, which does not apply to the narrow tensor")
        return insert_call(graph, target, args, kwargs, like=op)

    # ------------------------------------------------------------------ readers
    def _check_user(self, user: fx.Node, back: fx.Node, replacement: fx.Node,
                    state: "_GraphState") -> dict[fx.Node, Any]:
        """Meta updates to apply if `user` may read `replacement` instead of `back`; else raises."""
        kind = classify_use(user, back)
        same = same_geometry(tensor_meta(replacement), tensor_meta(back))
        if kind is UseKind.MUTATES:
            raise _Refused(f"{user.name}, which writes to the copy")
        if kind is UseKind.UNKNOWN:
            raise _Refused(f"{user.name}, an op without a schema")
        if kind is UseKind.COMPUTE:
            return {} if same else self._forward_layout(user, back, replacement, state)
        if not same:
            what = "the graph output" if kind is UseKind.OUTPUT else user.name
            raise _Refused(f"{what}, which sees the copy's layout (another shape, strides or offset)")
        if kind is UseKind.OUTPUT:
            self._check_output_alias(replacement, back, state)
        elif kind is UseKind.VIEW:
            for later, value, later_kind in casts.alias_closure(user):
                if later_kind is UseKind.MUTATES:
                    raise _Refused(f"{later.name}, which writes to a view of the copy")
                if later_kind is UseKind.UNKNOWN:
                    raise _Refused(f"{later.name}, an op without a schema reading a view of the copy")
                if later_kind is UseKind.OUTPUT:
                    self._check_output_alias(replacement, value, state)
        return {}

    def _check_output_alias(self, replacement: fx.Node, returned: fx.Node, state: "_GraphState") -> None:
        root = alias_root(replacement)
        if root.op in ("placeholder", "get_attr"):
            raise _Refused("the graph output, which would alias a graph input")
        mine = alias_root(returned)
        other_roots = {alias_root(n) for n in state.returned() if n is not returned}
        if root in other_roots and root is not mine:
            raise _Refused("the graph output, which would alias another output")
        # Another output shares this one's storage (the copy and a view of it, both
        # returned): moving one of them to the replacement alone would split them.
        if mine in other_roots:
            raise _Refused("the graph output, which shares its storage with another output")

    def _forward_layout(self, user: fx.Node, back: fx.Node, replacement: fx.Node,
                        state: "_GraphState") -> dict[fx.Node, Any]:
        """Re-run fake propagation from `user` with the new input; the layout change must die out.

        A pointwise op propagates its input's strides, so a consumer fed a strided view
        instead of a dense copy may produce another layout. That is fine until the value
        reaches an op that sees layout (an output, a custom op, a view): then refuse.
        """
        from torch._guards import detect_fake_mode

        vals: dict[fx.Node, Any] = {back: tensor_meta(replacement)}
        frontier, updates, steps = [user], {}, 0
        fake_mode = detect_fake_mode([tensor_meta(replacement)])
        if fake_mode is None:
            raise _Refused(f"{user.name}: no fake mode to check the layout change")
        while frontier:
            node = frontier.pop(0)
            steps += 1
            if steps > _MAX_FORWARD:
                raise _Refused(f"{user.name}, whose output layout change travels too far")
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: vals.get(n, n.meta.get("val")))
            try:
                with fake_mode:
                    new = node.target(*args, **kwargs)
            except Exception as exc:  # an op fake propagation cannot run: be safe
                raise _Refused(f"{node.name}, whose new layout could not be computed ({type(exc).__name__})")
            old = tensor_meta(node)
            if not isinstance(new, torch.Tensor) or old is None:
                raise _Refused(f"{node.name}, whose new layout could not be computed")
            if same_geometry(new, old):
                continue
            vals[node], updates[node] = new, new
            for later in node.users:
                if classify_use(later, node) is not UseKind.COMPUTE:
                    raise _Refused(f"{later.name}, which would see a layout changed by {user.name}")
                if later not in frontier:
                    frontier.append(later)
        return updates

    # ------------------------------------------------------------------ cleanup
    @staticmethod
    def _erase_unused(nodes: Any, state: "_GraphState") -> None:
        for node in nodes:
            if node not in state.erased and not node.users:
                node.graph.erase_node(node)
                state.erased.add(node)


def _fake_runs(target: Any, args: tuple, kwargs: dict) -> bool:
    """Whether `target` accepts these arguments' fake values (no node is made)."""
    from torch._guards import detect_fake_mode

    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
    mode = detect_fake_mode([a for a in fake_args if isinstance(a, torch.Tensor)])
    if mode is None:
        return False
    try:
        with mode:
            target(*fake_args, **fake_kwargs)
    except Exception:
        return False
    return True


class _GraphState:
    """What the pass needs to know about the whole graph while it rewrites it."""

    def __init__(self, graph: fx.Graph) -> None:
        self.writers = casts.writers(graph)
        # Original order; only nodes that existed before the pass are ever looked up.
        self.position = {node: i for i, node in enumerate(graph.nodes)}
        self.erased: set[fx.Node] = set()
        self.graph = graph

    def returned(self) -> list[fx.Node]:
        # Recomputed each time: earlier rewrites may have changed what the graph returns.
        output = next(iter(self.graph.find_nodes(op="output")), None)
        returned: list[fx.Node] = []
        if output is not None:
            fx.node.map_arg(output.args, returned.append)
        return returned


PASS = EliminateNoopCasts()

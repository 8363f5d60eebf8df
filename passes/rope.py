"""Rewrite strided RoPE writebacks into a stack/flatten (or cat), or into the fused RoPE op.

Before (diffusers Wan, post-grad; x bf16 `[B, S, H, D]`, tables f32 `[1, S, 1, D]`)::

    x1, x2 = getitem(unbind(reshape(x, [B, S, H, D/2, 2]), -1), 0 / 1)
    cos = slice(freqs_cos, 3, 0, MAX, 2);  sin = slice(freqs_sin, 3, 1, MAX, 2)
    buf = empty([B, S, H, D], bf16)
    c0  = copy(slice(buf, 3, 0, MAX, 2), x1*cos - x2*sin)          # casts f32 -> bf16
    s0  = slice_scatter(buf, c0, 3, 0, MAX, 2)
    c1  = copy(slice(s0, 3, 1, MAX, 2), x1*sin + x2*cos)
    out = slice_scatter(s0, c1, 3, 1, MAX, 2)

After, lowering "aten" (bitwise exact)::

    a = convert_element_type(x1*cos - x2*sin, bf16);  b = convert_element_type(x1*sin + x2*cos, bf16)
    out = reshape(cat([unsqueeze(a, 4), unsqueeze(b, 4)], 4), [B, S, H, D])

After, lowering "triton" (x, cos, sin identified; q and k sharing tables become one launch)::

    qk = fusewright.rope_qk(xq, xk, cos, sin, True);  out_q = qk[0];  out_k = qk[1]

Step-1 half writebacks become `cat([a, b], dim)` (aten) or the neox kernel.

The lowering comes from the lowering registry (semantic op `rope`,
`lowering/rope_lowering.py`): `-cc.lowering.rope=triton,aten` walks the list, `auto`
asks the registry's tuner (the shipped H100 measurements in `rope_auto.json`, a
measurement, or the rule), and user-registered implementations (`registry.register(
"rope", "vendor", ...)`) are built through the same `emit` as `aten`. Implementation
`none` keeps the writeback, recorded as a skip. The report's details read
`strided writeback: rope[interleaved] -> aten (why)` for graph-diff.
Look-alikes that are not safe to rewrite (buffer read before fully written, partly
covered, aliased, step 3) are left alone with their reason in the report.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..lowering import registry as lowering_registry
from ..lowering import rope_aten, rope_lowering, rope_ops, rope_triton
from ..patterns import rope as rope_patterns
from ..patterns.rope import RopeWriteback, find_rope_writebacks, x_producer
from .base import GraphPass, PassContext
from .graph_utils import insert_call, tensor_meta

_IMPURE_OK = (torch.ops.aten.copy.default, torch.ops.aten.slice_scatter.default)


def _structural_key(node, depth: int = 0):
    """Equal for two table nodes that compute the same view of the same tensor.

    Post-grad graphs repeat `freqs_cos[..., 0::2]` for q and for k; pairing q and k into
    one launch needs to see through that duplication.
    """
    if not isinstance(node, fx.Node):
        return node if not isinstance(node, (list, tuple)) else tuple(_structural_key(a, depth) for a in node)
    if node.op != "call_function" or depth > 8 or node.is_impure():
        return node
    target = node.target
    if getattr(target, "is_view", False) or target in _SAME_VALUE_OPS:
        args = tuple(_structural_key(a, depth + 1) for a in node.args)
        kwargs = tuple(sorted((k, _structural_key(v, depth + 1)) for k, v in node.kwargs.items()))
        return (target, args, kwargs)
    return node


_SAME_VALUE_OPS = (
    torch.ops.aten.slice.Tensor, torch.ops.aten.reshape.default, torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default, torch.ops.aten.select.int,
    torch.ops.aten.permute.default, torch.ops.prims.convert_element_type.default,
)


def _erase_dead(graph: fx.Graph, nodes) -> None:
    """Erase `nodes` and then whatever only they used, as long as it is pure and unused."""
    pending = list(nodes)
    erased: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op != "call_function":
            continue
        if node.is_impure() and node.target not in _IMPURE_OK:
            continue
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)


class RewriteRopePass(GraphPass):
    name = "rewrite_rope"
    order = 30
    extra_source_modules = (rope_patterns, rope_aten, rope_ops, rope_triton, rope_lowering, lowering_registry)

    def source_files(self) -> list[str]:
        # the auto table decides rewrites as much as the code does: it joins the cache key
        return sorted(set(super().source_files()) | {rope_lowering.TABLE_PATH})

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        found, declined = find_rope_writebacks(graph)
        for decline in declined:
            ctx.skipped(f"RoPE writeback not rewritten: {decline.reason}", decline.node)
        if not found:
            return
        ctx.matched(len(found))
        fused: list[tuple[RopeWriteback, str]] = []
        for wb in found:
            with ctx.at(wb.out):
                call = self._op_call(wb, ctx)
                choice = lowering_registry.choose(call, ctx.config.lowering.priority("rope"))
                detail = f"{wb.kind} writeback: {choice.detail()}"
                if choice.impl is None:
                    ctx.skipped(f"RoPE writeback not rewritten: no rope implementation applies ({choice.reason})",
                                wb.out)
                elif choice.impl.name == "none":
                    ctx.skipped(f"RoPE writeback kept as is: {detail}", wb.out)
                elif rope_lowering.is_builtin_triton(choice.impl):
                    fused.append((wb, detail))
                else:
                    self._lower(graph, wb, choice.impl, call)
                    ctx.rewritten(detail=detail)
        details = dict(fused)
        for group in self._pair(graph, [wb for wb, _ in fused]):
            with ctx.at(group[0].out):
                self._lower_fused(graph, group)
                for wb in group:
                    ctx.rewritten(detail=details[wb])
                ctx.stats.details["triton:launches"] = ctx.stats.details.get("triton:launches", 0) + 1

    # ------------------------------------------------------------ choosing
    @staticmethod
    def _rotation(wb: RopeWriteback, ctx: PassContext) -> str:
        """Whether a rotation in f32 with one rounding computes what the model does (see rope_lowering)."""
        rot = wb.rotation
        if rot is None:
            return "not_identified"
        xval = tensor_meta(rot.x)
        if xval is None or xval.dtype != wb.dtype:
            return "x_dtype_differs"
        if not rot.f32_math and ctx.config.numerics == "exact":
            return "rounds_between_steps"
        return "f32"

    def _op_call(self, wb: RopeWriteback, ctx: PassContext) -> lowering_registry.OpCall:
        rot = wb.rotation
        interleaved = rot.layout == "interleaved" if rot is not None else wb.kind == "strided"
        if rot is not None:
            x, cos, sin = tensor_meta(rot.x), tensor_meta(rot.cos), tensor_meta(rot.sin)
        else:
            # the buffer has x's shape and dtype: what the shape class and supports() need
            x, cos, sin = tensor_meta(wb.buffer), None, None
        producer = x_producer(rot.x) if rot is not None else "materialized"
        return rope_lowering.op_call(x, cos, sin, interleaved=interleaved, rotation=self._rotation(wb, ctx),
                                     producer=producer)

    # ------------------------------------------------------------ aten, user implementations
    @staticmethod
    def _lower(graph: fx.Graph, wb: RopeWriteback, impl, call) -> None:
        def emit(op, *args):
            return insert_call(graph, op, args, like=wb.out)

        rot = wb.rotation
        tensors = {"first": wb.first, "second": wb.second, "x": None, "cos": None, "sin": None}
        if rot is not None:
            tensors.update(x=rot.x, cos=rot.cos, sin=rot.sin)
        metas = [(tensor_meta(n).dtype, tuple(tensor_meta(n).shape)) for n in (wb.first, wb.second)]
        params = dict(call.params, dim=wb.dim, split=wb.split, shape=wb.shape, dtype=wb.dtype,
                      first_meta=metas[0], second_meta=metas[1])
        with graph.inserting_before(wb.out):
            new = impl.build(emit, tensors, params)
        val = tensor_meta(new) if isinstance(new, fx.Node) else None
        if val is None or val.dtype != wb.dtype or tuple(val.shape) != tuple(wb.shape):
            # a user implementation that breaks the contract: the manager restores the graph
            # and reports this
            got = "no tensor" if val is None else f"{tuple(val.shape)} {val.dtype}"
            raise RuntimeError(f"rope implementation {impl.name!r} returned {got}, "
                               f"expected {tuple(wb.shape)} {wb.dtype}")
        wb.out.replace_all_uses_with(new)
        _erase_dead(graph, reversed(wb.nodes))

    # ------------------------------------------------------------ triton
    @staticmethod
    def _pair(graph: fx.Graph, fused: list[RopeWriteback]) -> list[list[RopeWriteback]]:
        """Group writebacks two by two (q then k) when one launch can serve both."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        groups: list[list[RopeWriteback]] = []
        open_: dict[tuple, RopeWriteback] = {}
        for wb in sorted(fused, key=lambda w: order[w.out]):
            rot = wb.rotation
            key = (_structural_key(rot.cos), _structural_key(rot.sin), rot.layout, wb.dtype, wb.shape[:-2], wb.shape[-1])
            other = open_.pop(key, None)
            if other is not None:
                # the launch uses the first writeback's (equivalent) table nodes
                inputs = [other.rotation.x, rot.x, other.rotation.cos, other.rotation.sin]
                latest = max(order[n] for n in inputs)
                first_use = min(order[u] for w in (other, wb) for u in w.out.users) if (other.out.users or wb.out.users) else len(order)
                heads_ok = other.shape[-2] == wb.shape[-2] or all(
                    tensor_meta(t).dim() < 2 or tensor_meta(t).shape[-2] == 1 for t in (rot.cos, rot.sin))
                if latest < first_use and heads_ok:
                    groups.append([other, wb])
                    continue
                groups.append([other])
            open_[key] = wb
        groups.extend([wb] for wb in open_.values())
        return groups

    @staticmethod
    def _lower_fused(graph: fx.Graph, group: list[RopeWriteback]) -> None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        rot = group[0].rotation
        interleaved = rot.layout == "interleaved"
        xs = [wb.rotation.x for wb in group]
        # never between placeholders: Inductor expects them all before the first call
        placeholders = graph.find_nodes(op="placeholder")
        latest = max([*xs, rot.cos, rot.sin, *placeholders[-1:]], key=order.__getitem__)
        with graph.inserting_after(latest):
            if len(group) == 1:
                outs = [insert_call(graph, torch.ops.fusewright.rope.default,
                                    (xs[0], rot.cos, rot.sin, interleaved), like=group[0].out)]
            else:
                both = insert_call(graph, torch.ops.fusewright.rope_qk.default,
                                   (xs[0], xs[1], rot.cos, rot.sin, interleaved), like=group[0].out)
                with graph.inserting_after(both):
                    first = insert_call(graph, operator.getitem, (both, 0), like=group[0].out)
                with graph.inserting_after(first):
                    second = insert_call(graph, operator.getitem, (first.args[0], 1), like=group[1].out)
                outs = [first, second]
        for wb, out in zip(group, outs):
            wb.out.replace_all_uses_with(out)
        _erase_dead(graph, [n for wb in group for n in (wb.first, wb.second, *reversed(wb.nodes))])


PASS = RewriteRopePass()

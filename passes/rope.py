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

Step-1 half writebacks become `cat([a, b], dim)` (aten) or the neox kernel. Lowering
`auto` asks `lowering.rope_ops.choose_lowering` (measured table per device, documented
rule otherwise); it may also keep the writeback ("none"), recorded as a skip.
Look-alikes that are not safe to rewrite (buffer read before fully written, partly
covered, aliased, step 3) are left alone with their reason in the report.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..lowering import rope_aten, rope_ops, rope_triton
from ..patterns import rope as rope_patterns
from ..patterns.rope import RopeWriteback, find_rope_writebacks
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
    extra_source_modules = (rope_patterns, rope_aten, rope_ops, rope_triton)

    def source_files(self) -> list[str]:
        # the auto table decides rewrites as much as the code does: it joins the cache key
        return sorted(set(super().source_files()) | {rope_ops.TABLE_PATH})

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        found, declined = find_rope_writebacks(graph)
        for decline in declined:
            ctx.skipped(f"RoPE writeback not rewritten: {decline.reason}", decline.node)
        if not found:
            return
        ctx.matched(len(found))
        fused: list[RopeWriteback] = []
        for wb in found:
            with ctx.at(wb.out):
                choice, why = self._choose(wb, ctx)
                if choice == "triton":
                    fused.append(wb)
                elif choice == "aten":
                    self._lower_aten(graph, wb)
                    ctx.rewritten(detail=f"aten:{wb.kind}")
                else:
                    ctx.skipped(f"RoPE writeback kept as is: {why}", wb.out)
        for group in self._pair(graph, fused):
            with ctx.at(group[0].out):
                self._lower_fused(graph, group)
                ctx.rewritten(len(group), detail=f"triton:{group[0].rotation.layout}")
                details = ctx.stats.details
                details["triton:launches"] = details.get("triton:launches", 0) + 1

    # ------------------------------------------------------------ choosing
    @staticmethod
    def _kernel_problem(wb: RopeWriteback, ctx: PassContext) -> str | None:
        rot = wb.rotation
        if rot is None:
            return "x, cos and sin not identified behind the writeback"
        xval = tensor_meta(rot.x)
        if xval is None or xval.dtype != wb.dtype:
            return "x dtype differs from the buffer dtype"
        if not rot.f32_math and ctx.config.numerics == "exact":
            return "the model rounds between steps (not f32 math); the kernel needs numerics='fast'"
        return None

    def _choose(self, wb: RopeWriteback, ctx: PassContext) -> tuple[str, str]:
        problem = self._kernel_problem(wb, ctx)
        val = tensor_meta(wb.buffer)
        for impl in ctx.config.lowering.priority("rope"):
            if impl == "auto":
                numel = 1
                for s in wb.shape:
                    numel *= s
                return rope_ops.choose_lowering(val.device, numel, problem is None)
            if impl == "triton" and problem is None:
                return "triton", "requested"
            if impl == "aten":
                return "aten", "requested"
            if impl not in ("triton", "aten"):
                return "none", f"implementation '{impl}' is not supported by the RoPE pass (only auto, triton, aten)"
        return "none", f"lowering {','.join(ctx.config.lowering.priority('rope'))} not applicable: {problem}"

    # ------------------------------------------------------------ aten
    @staticmethod
    def _lower_aten(graph: fx.Graph, wb: RopeWriteback) -> None:
        def emit(op, *args):
            return insert_call(graph, op, args, like=wb.out)

        metas = [(tensor_meta(n).dtype, tuple(tensor_meta(n).shape)) for n in (wb.first, wb.second)]
        with graph.inserting_before(wb.out):
            if wb.kind == "strided":
                new = rope_aten.interleave(emit, wb.first, wb.second, dim=wb.dim, shape=wb.shape,
                                           dtype=wb.dtype, a_meta=metas[0], b_meta=metas[1])
            else:
                new = rope_aten.concat_halves(emit, wb.first, wb.second, dim=wb.dim, split=wb.split,
                                              shape=wb.shape, dtype=wb.dtype, a_meta=metas[0], b_meta=metas[1])
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

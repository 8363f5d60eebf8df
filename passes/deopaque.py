"""De-opaquing: replace configured third-party RMSNorm custom ops by a decomposable lowering.

Enabled by the `deopaque` config mapping (`-cc.deopaque._C::rms_norm=rms_norm`); runs
first (order 10) so the norm->quant pass (order 20) and Inductor see through the op.
The implementation comes from the lowering registry (`-cc.lowering.rms_norm=...`,
default `auto`); the report's details name the op, the implementation and why.

Before (vLLM-style in-place op, post-grad, auto_functionalized_v2)::

    buf = empty([T, H], bf16)
    af  = auto_functionalized_v2(_C.rms_norm.default, input=x, weight=w, epsilon=1e-6,
                                 _result_base_index=0, _all_bases=[buf])
    y   = getitem(af, 1)                        # the new value of `result`

After (lowering `aten`)::

    x32 = convert_element_type(x, f32)
    n   = mul(x32, rsqrt(add(mean(pow(x32, 2), [-1], True), 1e-6)))
    y   = mul(w, convert_element_type(n, bf16))  # users of getitem(af, 1) now read y

`fused_add_rms_norm(input, residual, weight, eps)` becomes `s = add(x, residual)`
and the norm of `s`; readers of the new `input` get the norm, readers of the new
`residual` get `s` (a write back into a graph input stays: functionalization's
`copy_` now copies `s`). A functional `rms_norm(x, weight, eps) -> Tensor` is replaced
in place. A call whose schema, layout or dtypes do not fit, or for which no
implementation applies, is left alone with its reason in the report.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..lowering import registry as lowering_registry
from ..lowering import rms_norm_aten
from ..patterns import opaque as opaque_patterns
from ..patterns.opaque import OpaqueCall, find_opaque_calls
from .base import GraphPass, PassContext
from .graph_utils import insert_call, tensor_meta

prims = torch.ops.prims
_EMPTY = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
          torch.ops.aten.empty_strided.default)


class DeopaquePass(GraphPass):
    name = "deopaque"
    order = 10
    extra_source_modules = (opaque_patterns, lowering_registry, rms_norm_aten)

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        mapping = dict(ctx.config.deopaque)
        if not mapping:
            return
        found, declined = find_opaque_calls(graph, mapping)
        for d in declined:
            ctx.skipped(f"opaque op not replaced: {d.reason}", d.node)
        # Calls were found on the graph as it was; one call's argument may be an earlier
        # call's result (a chain of opaque ops), which that replacement erased: map erased
        # nodes to what replaced them before looking at a call.
        replaced: dict[fx.Node, fx.Node] = {}
        for call in found:
            ctx.matched()
            for role, value in list(call.args.items()):
                while isinstance(value, fx.Node) and value in replaced:
                    value = replaced[value]
                call.args[role] = value
            with ctx.at(call.node):
                problem = self._problem(call)
                if problem:
                    ctx.skipped(f"{call.how} not replaced: {problem}", call.node)
                    continue
                op_call = self._op_call(call)
                choice = lowering_registry.choose(op_call, ctx.config.lowering.priority(call.semantic))
                if choice.impl is None:
                    ctx.skipped(f"{call.how} not replaced: no {call.semantic} implementation applies "
                                f"({choice.reason})", call.node)
                    continue
                replaced.update(self._replace(graph, call, choice.impl, dict(op_call.params)))
                ctx.rewritten(detail=f"{call.how}: {choice.detail()}")

    # ------------------------------------------------------------ checks
    @staticmethod
    def _problem(call: OpaqueCall) -> str | None:
        args = call.args
        if not isinstance(args["eps"], (int, float)):
            return "eps is not a constant"
        x = tensor_meta(args["x"]) if isinstance(args["x"], fx.Node) else None
        if x is None:
            return "x has no tensor metadata"
        roles = [r for r in ("out", "residual", "weight") if args.get(r) is not None]
        metas = {r: tensor_meta(args[r]) if isinstance(args[r], fx.Node) else None for r in roles}
        if any(m is None for m in metas.values()):
            return "an argument has no tensor metadata"
        if call.form == "fused_add" and args["residual"] is args["x"]:
            return "x and residual are the same tensor"
        if not x.is_contiguous():
            return "x is not contiguous (the replacement would change output strides)"
        for role in ("out", "residual"):
            m = metas.get(role)
            if m is None:
                continue
            if tuple(m.shape) != tuple(x.shape) or not m.is_contiguous():
                return f"{role} is not a contiguous tensor of x's shape"
            if role == "residual" and m.dtype != x.dtype:
                return "residual dtype differs from x's"
        if call.form == "functional":
            out = tensor_meta(call.node)
            if out is None or out.dtype != x.dtype or tuple(out.shape) != tuple(x.shape) or not out.is_contiguous():
                return "the op's output is not a contiguous tensor of x's shape and dtype"
        return None

    @staticmethod
    def _op_call(call: OpaqueCall) -> lowering_registry.OpCall:
        x = tensor_meta(call.args["x"])
        tensors = {"x": x}
        if call.semantic == "fused_add_rms_norm":
            tensors["residual"] = tensor_meta(call.args["residual"])
        w = call.args.get("weight")
        tensors["weight"] = tensor_meta(w) if isinstance(w, fx.Node) else None
        return lowering_registry.OpCall.make(call.semantic, tensors, eps=float(call.args["eps"]),
                                             dtype=str(x.dtype).replace("torch.", ""))

    # ------------------------------------------------------------ rewriting
    @staticmethod
    def _replace(graph: fx.Graph, call: OpaqueCall, impl: lowering_registry.Implementation,
                 params: dict) -> dict[fx.Node, fx.Node]:
        """Replace the call; returns {erased node: the node that now holds its value}."""
        node = call.node

        def emit(op, *args):
            return insert_call(graph, op, args, like=node)

        tensors = {role: call.args.get(role) for role in ("x", "residual", "weight") if role in call.args}
        with graph.inserting_before(node):
            result = impl.build(emit, tensors, params)
            if call.form == "fused_add":
                norm, total = result
                new = {"x": norm, "residual": total}
            elif call.form == "out":
                out_dtype = tensor_meta(call.args["out"]).dtype
                # the op writes into `out`, whose dtype wins, as a copy into it would
                if tensor_meta(result).dtype != out_dtype:
                    result = emit(prims.convert_element_type.default, result, out_dtype)
                new = {"out": result}
        if call.form == "functional":
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            return {node: result}
        erased = {}
        for role, readers in call.new_values.items():
            for reader in readers:
                reader.replace_all_uses_with(new[role])
                graph.erase_node(reader)
                erased[reader] = new[role]
        graph.erase_node(node)
        out = call.args.get("out")
        if isinstance(out, fx.Node) and not out.users and out.target in _EMPTY:
            graph.erase_node(out)  # the buffer the op wrote into is not needed any more
        return erased


PASS = DeopaquePass()

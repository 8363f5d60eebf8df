"""Fuse an activation's dynamic quantization into one pass over its inputs.

Before (Llama MLP, torchao float8 rowwise in front of down_proj; post-grad aten)::

    g32 = convert(gate, f32); a = convert(div(g32, add(exp(neg(g32)), 1)), bf16)
    h = mul(a, up)                                    # silu(gate) * up, bf16
    amax = amax(abs(h), [-1], True); s = clamp_min(div(convert(amax, f32), 448.0), 1e-12)
    q = convert(clamp_max(clamp_min(div(convert(h, f32), s), -448.0), 448.0), fp8)
    return (q, s)

Inductor turns this into one reduction kernel with two loops over the 14336-wide row:
the first finds amax, the second reads gate and up again and recomputes h.

After, lowering `triton` (`auto` on CUDA)::

    aq = fusewright.act_quant(gate, up, '<ActQuantSpec string>')
    return (aq[0], aq[1])

The fused op (lowering/act_quant_ops.py; a Triton kernel on CUDA) holds the row in
registers and reads gate and up once. The same applies to an activation that is
already in memory (the attention output in front of o_proj: prologue `identity`).
Lowering `none` (`auto` off CUDA, where the op is the eager reference) keeps the graph.

The matcher (patterns/act_quant.py) declines, with a reason, activations that other
fusible ops compute (Inductor already quantizes those in the kernel that computes
them), intermediates read elsewhere, and quantizations it cannot reproduce; a
declined match leaves the graph unchanged.
"""

from __future__ import annotations

import torch.fx as fx

from ..lowering import act_quant_ops, act_quant_reference, act_quant_spec
from ..patterns import act_quant as aq_patterns
from ..patterns import quant as quant_patterns
from .base import GraphPass, PassContext
from .graph_utils import insert_call, tensor_meta
from .quant_tails import erase_dead, replace_tails


class ActQuantPass(GraphPass):
    name = "fuse_act_quant"
    # after the norm -> quant pass (a norm's quantization is its), before the cast cleanup
    order = 25
    extra_source_modules = (aq_patterns, quant_patterns, act_quant_spec, act_quant_reference, act_quant_ops)

    def source_files(self) -> list[str]:
        # the shipped measurements decide `auto`'s lowering, so they are part of the cache key
        from ..lowering import act_quant_choice

        return sorted(set(super().source_files()) | {act_quant_choice.CHOICE_PATH})

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        from torch._inductor.pattern_matcher import stable_topological_sort

        changed = False
        for anchor in aq_patterns.find_anchors(graph):
            if anchor.graph is not graph or getattr(anchor, "_erased", False):
                continue
            with ctx.at(anchor):
                match = aq_patterns.match_act_quant(anchor, ctx.config.numerics)
                if match is None:
                    continue
                ctx.matched()
                if isinstance(match, aq_patterns.Decline):
                    ctx.skipped(match.reason, match.node)
                    continue
                # `aten` (e.g. `lowering.default=aten`) means the model's own aten nodes here: `none`
                priority = tuple("none" if p == "aten" else p for p in ctx.config.lowering.priority("act_quant"))
                choice = act_quant_ops.choose_lowering(
                    match.spec, tensor_meta(match.x), tensor_meta(match.up) if match.up is not None else None,
                    priority=priority)
                if choice.impl is None:
                    ctx.skipped(f"no act_quant implementation applies ({choice.reason})", anchor)
                    continue
                if choice.impl.name == "none":
                    ctx.skipped(f"{match.spec.describe()} kept as Inductor compiles it (lowering none: {choice.reason})", anchor)
                    continue
                self._rewrite(graph, match, choice.impl)
                changed = True
                ctx.rewritten(detail=f"{match.spec.describe()} -> {choice.name} ({choice.reason})")
        if changed:
            # the op sits before the first node of each match; put any input defined later back in order
            stable_topological_sort(graph)

    def _rewrite(self, graph: fx.Graph, m: aq_patterns.ActQuantMatch, impl) -> None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((n for n in m.dead_candidates() if n in order), key=order.__getitem__)
        with graph.inserting_before(first):
            def call(target, *args, **kwargs):
                return insert_call(graph, target, args, kwargs, like=first)

            outs = list(impl.build(call, {"x": m.x, "up": m.up}, {"spec": m.spec.to_str()}))
            if len(outs) != 2:
                # a user-registered implementation that breaks the output contract: the
                # manager restores the graph and reports this
                raise RuntimeError(f"act_quant implementation {impl.name!r} returned {len(outs)} outputs, "
                                   "expected 2 (q, scale)")
            replace_tails(call, m.tails, outs[0], outs[1])
        erase_dead(graph, m.dead_candidates(), m.tails)


PASS = ActQuantPass()

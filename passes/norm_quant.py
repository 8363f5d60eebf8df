"""Fuse RMSNorm -> quantization (FP8 static / per-token / per-group, INT8 per-token).

Before (Llama norm, vLLM per-token FP8 tail; post-grad aten)::

    h = convert(x, f32); var = mean(pow(h, 2), [-1], True); r = rsqrt(var + 1e-06)
    y = mul(w, convert(mul(h, r), bf16))
    amax = amax(abs(y), [-1], True); s = clamp_min(div(convert(amax, f32), 448.0), 4.36e-06)
    q = convert(clamp_max(clamp_min(mul(convert(y, f32), reciprocal(s)), -448.0), 448.0), fp8)
    return (q, s)

After, lowering `triton` (the fused op; on CUDA its Triton kernel)::

    nq = fusewright.rms_norm_quant(x, w, None, None, '<NormQuantSpec string>')
    return (nq[0], nq[1])

After, lowering `aten` (or `auto` off CUDA): the canonical aten sequence of the spec
(`lowering/norm_quant_aten.py`), which Inductor fuses into one or two kernels.

The matcher (patterns/norm_quant.py) accepts the norm spellings and quant tails listed
in docs/numerics.md. Declined matches (an intermediate read elsewhere, groups that
straddle rows, quantization math in bf16, ...) leave the graph unchanged and are
reported as skips with the reason.
"""

from __future__ import annotations


import torch
import torch.fx as fx

from ..lowering import norm_quant_aten, norm_quant_ops, norm_quant_spec
from ..patterns import norm_quant as nq_patterns
from ..patterns import quant as quant_patterns
from ..patterns import rms_norm as rms_patterns
from .base import GraphPass, PassContext
from .graph_utils import insert_call, tensor_meta
from .quant_tails import erase_dead, replace_tails

aten = torch.ops.aten


_LOW = (torch.bfloat16, torch.float16)


class _FxOps:
    """Creates graph nodes (with fake metadata) for the replacement and the reshapes."""

    def __init__(self, graph: fx.Graph, like: fx.Node, exact: bool) -> None:
        self.graph, self.like, self.exact = graph, like, exact

    def call(self, target, *args, **kwargs):
        if target is aten.sym_size.int:
            size = tensor_meta(args[0]).shape[args[1]]
            if isinstance(size, int):
                # A static size is a plain int: a sym_size node would carry an int `val`,
                # which torch 2.11's post-grad fake-tensor check rejects.
                return size
        node = insert_call(self.graph, target, args, kwargs, like=self.like)
        if self.exact and _touches_low_precision(node) and _emulating_precision_casts():
            # Tracing marks eager-level ops this way under emulate_precision_casts, and
            # Inductor then rounds their bf16/f16 values as eager does. Marking ours the
            # same keeps the aten lowering numerically where the original spelling
            # would be: bitwise eager with the option on, bitwise stock with it off.
            node.meta["low_precision_pointwise_barrier"] = True
        return node


def _emulating_precision_casts() -> bool:
    from torch._inductor import config as inductor_config

    return bool(getattr(inductor_config, "emulate_precision_casts", False))


def _touches_low_precision(node: fx.Node) -> bool:
    vals = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    return any(isinstance(v, torch.Tensor) and v.dtype in _LOW for v in vals)


class NormQuantPass(GraphPass):
    name = "fuse_norm_quant"
    order = 20
    extra_source_modules = (
        rms_patterns,
        quant_patterns,
        nq_patterns,
        norm_quant_spec,
        norm_quant_aten,
        norm_quant_ops,
    )

    def source_files(self) -> list[str]:
        # The shipped measurements decide `auto`'s lowering, so they are part of the cache key.
        from ..lowering import norm_quant_choice, norm_quant_plan

        tables = {norm_quant_plan.TUNING_PATH, norm_quant_choice.CHOICE_PATH}
        return sorted(set(super().source_files()) | tables)

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        changed = False
        for mean in nq_patterns.find_anchors(graph):
            if getattr(mean, "_erased", False):
                continue
            with ctx.at(mean):
                match = nq_patterns.match_norm_quant(mean, ctx.config.numerics)
                if match is None:
                    continue
                ctx.matched()
                if isinstance(match, nq_patterns.Decline):
                    ctx.skipped(match.reason, match.node)
                    continue
                for other in match.other_declines:
                    ctx.skipped(f"second quantization of the same norm left in place: {other.reason}", other.node)
                for other in match.other_tails:
                    ctx.skipped(
                        f"second quantization of the same norm left in place: a different variant "
                        f"({other.quant.kind}); it reads the normalised tensor the fused op returns",
                        other.q,
                    )
                norm = match.norm
                fake = [tensor_meta(n) if n is not None else None for n in (norm.x, norm.weight, norm.residual, match.static_scale)]
                priority = ctx.config.lowering.priority("rms_norm_quant")
                if match.strided:
                    priority = ("aten",)
                choice = norm_quant_ops.choose_lowering(match.spec, *fake, priority=priority)
                if choice.impl is None:
                    ctx.skipped(f"no rms_norm_quant implementation applies ({choice.reason})", mean)
                    continue
                self._rewrite(graph, match, choice.impl, fake[0].dim())
                changed = True
                # What it was lowered to, and why (graph-diff shows these details).
                why = f"strided {', '.join(match.strided)}" if match.strided else choice.reason
                ctx.rewritten(detail=f"{match.spec.describe()} -> {choice.name} ({why})")
        if changed:
            from torch._inductor.pattern_matcher import stable_topological_sort

            # New nodes sit before the first node of each match; an input defined later
            # (a weight computed late) is put back in order here.
            stable_topological_sort(graph)

    def _rewrite(self, graph: fx.Graph, m: nq_patterns.NormQuantMatch, impl, ndim: int) -> None:
        spec = m.spec
        norm = m.norm
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((n for n in norm.nodes if n in order), key=order.__getitem__)
        inputs = (norm.x, norm.weight, norm.residual, m.static_scale)
        with graph.inserting_before(first):
            ops = _FxOps(graph, norm.mean, exact=spec.numerics == "exact")
            tensors = dict(zip(("x", "weight", "residual", "scale"), inputs))
            outs = list(impl.build(ops.call, tensors, {"spec": spec.to_str(), "ndim": ndim}))
            if len(outs) != len(spec.output_names()):
                # a user-registered implementation that breaks the output contract: the
                # manager restores the graph and reports this
                raise RuntimeError(
                    f"rms_norm_quant implementation {impl.name!r} returned {len(outs)} outputs, "
                    f"expected {len(spec.output_names())} ({', '.join(spec.output_names())})"
                )
            named = dict(zip(spec.output_names(), outs))
            replace_tails(ops.call, m.tails, named["q"], named.get("scale"))
            if norm.residual_out is not None:
                norm.residual_out.replace_all_uses_with(named["residual"])
            if spec.return_normalized:
                norm.out.replace_all_uses_with(named["normalized"])
        erase_dead(graph, m.dead_candidates(), m.tails)


PASS = NormQuantPass()

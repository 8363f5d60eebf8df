"""Splicing a fused op's (q, scale) into the quant tails it replaces, and erasing what died.

Shared by the passes whose fused op ends in a quantization (norm -> quant, activation ->
quant): each matched tail (`patterns.quant.QuantTailMatch`) may have reshaped the value
(per-group views, token flattening), kept or dropped the amax's last dim, reshaped the
scale, or copied it to column-major; the fused op returns q in x's shape and the scale
in the spec's layout, and these helpers rebuild exactly what each tail's users read.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten


def replace_tails(call: Callable, tails: Iterable, q: fx.Node, scale: fx.Node | None) -> None:
    """Point every user of each tail's q and scale at the fused op's `q` / `scale`.

    `call(target, *args)` creates a node (with fake metadata) at the insertion point."""
    for t in tails:
        q_new = q
        if t.q_view_args is not None:
            q_new = call(aten.reshape.default, q, list(t.q_view_args))
        t.q.replace_all_uses_with(q_new)
        if t.scale is None:
            continue
        s_new = scale
        if t.q_view_args is not None:
            shape = list(t.q_view_args[:-1]) + ([1] if t.amax_keepdim else [])
            s_new = call(aten.reshape.default, s_new, shape)
        elif not t.amax_keepdim:
            s_new = call(aten.squeeze.dim, s_new, -1)
        for op in t.scale_shape_ops:
            s_new = call(op.target, s_new, *op.args[1:], **op.kwargs)
        if t.col_major_out is not None:
            col = call(aten.reshape.default, scale, list(t.col_major_args))
            t.col_major_out.replace_all_uses_with(col)
        t.scale.replace_all_uses_with(s_new)


def erase_dead(graph: fx.Graph, candidates: Iterable[fx.Node], tails: Iterable) -> None:
    """Erase the candidates (and each tail's column-major scale copy) that nothing reads now."""
    candidates = set(candidates)
    for t in tails:
        # the transposed copy of the scales (reshape, permute, clone, permute)
        n = t.col_major_out
        while n is not None and n not in candidates and n.op == "call_function":
            candidates.add(n)
            n = n.args[0] if isinstance(n.args[0], fx.Node) else None
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted((n for n in candidates if n in order), key=order.__getitem__, reverse=True):
        if not node.users and node.op == "call_function":
            graph.erase_node(node)

"""RMSNorm followed by quantization: the combined match the norm-quant pass rewrites.

:func:`match_norm_quant` joins :mod:`.rms_norm` (the norm around one variance anchor)
and :mod:`.quant` (the quantizations of its output) and applies the safety rules:

* every intermediate of the norm and of the fused tails must be used only inside the
  match; the normalised tensor itself may have other users, in which case the match
  asks for it as an extra output (`return_normalized`);
* several identical quantizations of the same normalised tensor (one per linear that
  reads it, e.g. q/k/v projections) are served by one fused op;
* a tail that differs from the fused one stays in the graph, reading the returned
  normalised tensor.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..lowering.norm_quant_spec import NormQuantSpec
from .quant import QuantTailMatch, find_tails
from .rms_norm import Decline, RMSNormMatch, dtype_of, find_anchors, is_convert, match_rms_norm, static_int, tensor_meta

__all__ = ["Decline", "NormQuantMatch", "find_anchors", "match_norm_quant"]


@dataclasses.dataclass
class NormQuantMatch:
    norm: RMSNormMatch
    tails: list[QuantTailMatch]  # all with the same key: one op serves them
    spec: NormQuantSpec
    static_scale: fx.Node | None
    value_nodes: list[fx.Node]  # y, its upcasts and views
    other_declines: list[Decline]  # tails of the same norm that were not taken
    other_tails: list[QuantTailMatch] = dataclasses.field(default_factory=list)  # different, left unfused
    # inputs that are not contiguous: the fused op reads rows contiguously and returns
    # contiguous tensors, so only the aten sequence may lower such a match
    strided: list[str] = dataclasses.field(default_factory=list)

    def dead_candidates(self) -> list[fx.Node]:
        """Nodes of the match that are dead once the outputs are replaced."""
        nodes = list(self.norm.nodes) + list(self.norm.shared) + list(self.value_nodes)
        for t in self.tails:
            nodes += t.nodes
            if t.scale is not None:
                nodes.append(t.scale)
        return nodes


_QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def _quantized_downstream(start: fx.Node, limit: int = 40) -> bool:
    """Whether a cast to fp8/int8 is among the first `limit` nodes reachable from `start`."""
    seen, frontier = {start}, [start]
    while frontier and len(seen) < limit:
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                if is_convert(user) and dtype_of(user) in _QUANT_DTYPES:
                    return True
                seen.add(user)
                nxt.append(user)
        frontier = nxt
    return False


def match_norm_quant(mean: fx.Node, numerics: str = "exact") -> NormQuantMatch | Decline | None:
    """The norm->quant match anchored on `mean`; None when there is no norm or no quant."""
    norm = match_rms_norm(mean)
    if norm is None:
        return None
    if isinstance(norm, Decline):
        # Report it only when a quantization follows: a norm feeding plain linears (or a
        # training graph saving the inverse RMS for backward) is not a candidate.
        return norm if _quantized_downstream(mean) else None
    hidden = static_int(tensor_meta(mean.args[0]).shape[-1])
    values, tails = find_tails(norm.out, hidden)
    good = [t for t in tails if isinstance(t, QuantTailMatch)]
    bad = [t for t in tails if isinstance(t, Decline)]
    if not good:
        return bad[0] if bad else None
    key = good[0].key()
    chosen = [t for t in good if t.key() == key]
    others = [t for t in good if t.key() != key]

    tail_nodes: set[fx.Node] = set()
    for t in chosen:
        tail_nodes.update(t.nodes)
        if t.scale is not None:
            tail_nodes.add(t.scale)
    value_set = {v.node for v in values}
    norm_set = set(norm.nodes)
    replaced = {norm.out, norm.residual_out}
    for n in norm.nodes:
        if n in replaced:
            continue
        outside = [u for u in n.users if u not in norm_set and u not in value_set]
        if outside:
            return Decline(f"intermediate '{n.name}' of the RMSNorm has other users ({outside[0].name})", n)
    for t in chosen:
        for n in t.nodes:
            if n is t.q or n is t.scale:
                continue
            outside = [u for u in n.users if u not in tail_nodes]
            if outside:
                return Decline(f"intermediate '{n.name}' of the quantization has other users ({outside[0].name})", n)
    # The normalised value must survive if anything but the fused tails reads it.
    need_normalized = any(
        u not in tail_nodes and u not in value_set for v in value_set for u in v.users
    ) or bool(others) or bool(bad)
    try:
        spec = NormQuantSpec(norm=norm.norm, quant=key[0], return_normalized=need_normalized, numerics=numerics)
    except ValueError as exc:
        return Decline(f"unsupported norm-quant combination: {exc}", mean)
    strided = [
        role
        for role, node in (("input", norm.x), ("residual", norm.residual))
        if node is not None and not tensor_meta(node).is_contiguous()
    ]
    return NormQuantMatch(norm, chosen, spec, chosen[0].static_scale, [v.node for v in values], bad, others, strided)

"""Pairing the kernels of two compiles by what they compute, for graph-diff.

`match_kernels(before, after)` pairs each side's kernels (one rank's, in launch order):
same kernel signature -> unchanged; same kind and name stem, or same kind and mostly the
same fused aten ops -> changed; the rest are removed / added. Numbered kernel names are
never compared as such. Collectives pair only with collectives, in launch order per
compiled graph (`_pair_collectives`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from .output_code import Kernel


# ----------------------------------------------------------------------------- kernel diff
@dataclasses.dataclass
class KernelMatch:
    status: str  # unchanged (same body), changed (same role, different body), removed, added
    before: Kernel | None
    after: Kernel | None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "before": self.before.name if self.before else None,
                "after": self.after.name if self.after else None,
                "kind": (self.after or self.before).kind}


def _stem(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _collective_key(k: Kernel) -> tuple:
    c = k.collective or {}
    return (k.name, tuple(c.get("args", ())), tuple(c.get("tensors", ())))


def _compatible(x: str, y: str) -> bool:
    """Two `shape:dtype` descriptions agree where both sides state them ("?" = not stated)."""
    return all(a == b or "?" in (a, b) for a, b in zip(x.rsplit(":", 1), y.rsplit(":", 1)))


def _pair_collectives(before: list[Kernel], after: list[Kernel]) -> dict[int, tuple[str, int]]:
    """Collectives of each compiled graph paired in launch order by op (difflib on the op
    sequence): same op, arguments and tensor shapes -> unchanged, same op otherwise -> changed.
    Shapes a side cannot state ("?") do not count as a change."""
    pairs: dict[int, tuple[str, int]] = {}
    for graph in sorted({k.graph for k in before + after if k.kind == "collective"}):
        bi = [i for i, k in enumerate(before) if k.kind == "collective" and k.graph == graph]
        ai = [i for i, k in enumerate(after) if k.kind == "collective" and k.graph == graph]
        ops = difflib.SequenceMatcher(None, [before[i].name for i in bi], [after[i].name for i in ai], autojunk=False)
        for block in ops.get_matching_blocks():
            for j in range(block.size):
                b, a = before[bi[block.a + j]], after[ai[block.b + j]]
                kb, ka = _collective_key(b), _collective_key(a)
                same = kb[:2] == ka[:2] and len(kb[2]) == len(ka[2]) and all(
                    _compatible(x, y) for x, y in zip(kb[2], ka[2]))
                pairs[ai[block.b + j]] = ("unchanged" if same else "changed", bi[block.a + j])
    return pairs


def match_kernels(before: list[Kernel], after: list[Kernel]) -> list[KernelMatch]:
    """Pair kernels by what they compute. Numbered names are never compared as such.
    Collectives pair only with collectives (`_pair_collectives`); kernels of different
    ranks never pair (diff rank by rank: `offline_diff`)."""
    pairs: dict[int, tuple[str, int]] = _pair_collectives(before, after)
    taken_b = {bi for _, bi in pairs.values()}
    free_b = [i for i in range(len(before)) if i not in taken_b and before[i].kind != "collective"]

    def take(ai: int, pred, status: str) -> None:
        # prefer a kernel of the same compiled graph, then any
        for same_graph in (True, False):
            for bi in free_b:
                if (not same_graph or before[bi].graph == after[ai].graph) and pred(before[bi], after[ai]):
                    free_b.remove(bi)
                    pairs[ai] = (status, bi)
                    return

    for ai in range(len(after)):
        if ai not in pairs and after[ai].kind != "collective":
            take(ai, lambda b, a: b.signature and b.signature == a.signature, "unchanged")
    for ai in range(len(after)):
        if ai not in pairs and after[ai].kind != "collective":
            take(ai, lambda b, a: b.kind == a.kind and _stem(b.name) == _stem(a.name), "changed")
    for ai in range(len(after)):
        if ai not in pairs and after[ai].kind != "collective":
            def similar(b: Kernel, a: Kernel) -> bool:
                sb, sa = set(b.ops), set(a.ops)
                return b.kind == a.kind and bool(sb | sa) and len(sb & sa) / len(sb | sa) >= 0.6
            take(ai, similar, "changed")
    out: list[KernelMatch] = []
    matched_b = {bi: ai for ai, (_, bi) in pairs.items()}
    # in "before" order, with added kernels after the matched kernel launched just before them
    emitted_a: set[int] = set()
    for bi, kb in enumerate(before):
        if bi in matched_b:
            ai = matched_b[bi]
            for prev in range(ai):
                if prev not in pairs and prev not in emitted_a:
                    out.append(KernelMatch("added", None, after[prev]))
                    emitted_a.add(prev)
            out.append(KernelMatch(pairs[ai][0], kb, after[ai]))
            emitted_a.add(ai)
        else:
            out.append(KernelMatch("removed", kb, None))
    for ai, ka in enumerate(after):
        if ai not in emitted_a:
            out.append(KernelMatch("added", None, ka))
    return out


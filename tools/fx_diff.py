"""Diff two FX graphs with networkx: nodes and edges removed and added, by source line.

The two graphs are the post-grad graph of one compiled graph before and after
fusewright's passes. Within one compile, untouched nodes keep their names (the pass
manager preserves them), so a node is matched first by (name, op, target); a node a
pass re-created with a new name but the same target and the same (matched) inputs is
then matched structurally, in topological order. What is left is removed (before only)
or added (after only). Edges are compared on the matched nodes, so a user whose input
was rewired shows as unchanged with one edge removed and one added.

The result is a networkx `DiGraph` holding the union of both graphs; each node and
edge carries `status` in {"removed", "added", "unchanged"}. Renderers and the JSON
report read only that graph.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ..passes.graph_utils import source_line

REMOVED, ADDED, UNCHANGED = "removed", "added", "unchanged"


def target_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        name = f"{target._opname}.{target._overloadname}" if target._overloadname != "default" else target._opname
        return name if ns == "aten" else f"{ns}.{name}"
    return getattr(target, "__name__", str(target))


def _val_text(node: fx.Node) -> str:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    parts = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            dtype = str(v.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "f32") \
                .replace("float16", "f16").replace("float8_e4m3fn", "f8e4m3")
            parts.append(f"{dtype}{list(v.shape)}".replace(" ", ""))
    return ", ".join(parts[:2]) + (" ..." if len(parts) > 2 else "")


def short_source(node: fx.Node) -> str | None:
    """`file.py:LINE in fn: code` with the file's directory dropped."""
    line = source_line(node)
    if not line:
        return None
    path, rest = line.split(":", 1)
    return os.path.basename(path) + ":" + rest


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """One FX graph as a DiGraph: node per FX node (by name), edge per input use."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, target=target_name(node), val=_val_text(node),
                   source=short_source(node))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _flat_inputs(node: fx.Node) -> list[str]:
    out: list[str] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n.name))
    return out


@dataclasses.dataclass
class GraphDiff:
    """The diff of one compiled graph (index `graph`) before and after the passes."""

    graph: int
    union: nx.DiGraph

    def nodes(self, status: str) -> list[str]:
        return [n for n, d in self.union.nodes(data=True) if d["status"] == status]

    def edges(self, status: str) -> list[tuple[str, str]]:
        return [(u, v) for u, v, d in self.union.edges(data=True) if d["status"] == status]

    @property
    def changed(self) -> bool:
        return bool(self.nodes(REMOVED) or self.nodes(ADDED) or self.edges(REMOVED) or self.edges(ADDED))

    def by_source(self) -> list[dict[str, Any]]:
        """Removed and added nodes grouped by the model source line they come from."""
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: {REMOVED: [], ADDED: []})
        for n, d in self.union.nodes(data=True):
            if d["status"] in (REMOVED, ADDED) and d["op"] not in ("placeholder", "output"):
                groups[d.get("source") or "(no stack trace)"][d["status"]].append(d["target"])
        return [{"source": src, "removed": sorted(v[REMOVED]), "added": sorted(v[ADDED])}
                for src, v in sorted(groups.items())]

    def to_dict(self) -> dict[str, Any]:
        label = lambda n: self.union.nodes[n]["name"]
        return {
            "graph": self.graph,
            "nodes": {s: sorted(label(n) for n in self.nodes(s)) for s in (REMOVED, ADDED)}
            | {"unchanged_count": len(self.nodes(UNCHANGED))},
            "edges": {s: sorted([label(u), label(v)] for u, v in self.edges(s)) for s in (REMOVED, ADDED)},
            "by_source": self.by_source(),
        }


def diff_graphs(before: fx.Graph, after: fx.Graph, graph: int = 0) -> GraphDiff:
    b_nodes = {n.name: n for n in before.nodes}
    a_nodes = {n.name: n for n in after.nodes}
    b_to_a: dict[str, str] = {}
    for name, bn in b_nodes.items():
        an = a_nodes.get(name)
        if an is not None and an.op == bn.op and target_name(an) == target_name(bn):
            b_to_a[name] = name
    # structural matching of what is left, inputs first
    matched_a = set(b_to_a.values())
    union_id = lambda side, name: ("=" + (b_to_a[name] if side == "b" else name)) if (
        (side == "b" and name in b_to_a) or (side == "a" and name in matched_a)) else f"{side}:{name}"
    changed = True
    while changed:
        changed = False
        free_b: dict[tuple, list[str]] = defaultdict(list)
        for name, bn in b_nodes.items():
            if name not in b_to_a and bn.op == "call_function":
                key = (bn.op, target_name(bn), _val_text(bn), tuple(union_id("b", i) for i in _flat_inputs(bn)))
                free_b[key].append(name)
        for name, an in a_nodes.items():
            if name in matched_a or an.op != "call_function":
                continue
            key = (an.op, target_name(an), _val_text(an), tuple(union_id("a", i) for i in _flat_inputs(an)))
            if free_b.get(key):
                b_to_a[free_b[key].pop(0)] = name
                matched_a.add(name)
                changed = True
    union = nx.DiGraph()

    def add(node: fx.Node, uid: str, status: str) -> None:
        union.add_node(uid, name=node.name, op=node.op, target=target_name(node), val=_val_text(node),
                       source=short_source(node), status=status)

    for name, bn in b_nodes.items():
        add(bn, union_id("b", name), UNCHANGED if name in b_to_a else REMOVED)
    for name, an in a_nodes.items():
        if name not in matched_a:
            add(an, union_id("a", name), ADDED)
    b_edges = {(union_id("b", i), union_id("b", n)) for n, bn in b_nodes.items() for i in _flat_inputs(bn)}
    a_edges = {(union_id("a", i), union_id("a", n)) for n, an in a_nodes.items() for i in _flat_inputs(an)}
    for u, v in b_edges | a_edges:
        status = UNCHANGED if (u, v) in b_edges and (u, v) in a_edges else REMOVED if (u, v) in b_edges else ADDED
        union.add_edge(u, v, status=status)
    return GraphDiff(graph, union)


def diff_graph_lists(before: list[fx.Graph], after: list[fx.Graph]) -> list[GraphDiff]:
    """Pair the compiled graphs by index (one compile: same graph breaks on both sides)."""
    return [diff_graphs(b, a, i) for i, (b, a) in enumerate(zip(before, after))]


# ----------------------------------------------------------------------------- collectives
# torch.distributed's functional collectives as they appear in post-grad graphs
COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")


def is_collective(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace in COLLECTIVE_NAMESPACES)


def _is_wait(node: fx.Node) -> bool:
    return is_collective(node) and node.target._opname == "wait_tensor"


def _tensor_type(node: Any) -> str | None:
    """dtype, shape and strides of what a node holds (what a collective sends)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return f"{val.dtype}{list(val.shape)} stride {list(val.stride())}".replace("torch.", "")


def collective_fingerprint(graph: fx.Graph) -> dict[str, Any]:
    """What a graph communicates and how its computation is ordered around the waits.

    * each collective (in graph order): op, non-tensor arguments, the type of each tensor
      it sends, which earlier waits and which graph inputs its inputs depend on, and
      what reads its result (only its wait_tensor may: anything else reads before the wait);
    * each wait: which collective it waits on;
    * each graph output: which waits it depends on.

    * each computing node's region: the waits it comes after and the collectives it feeds.

    Two graphs with equal collective entries send the same kinds of values computed from
    the same inputs, in the same order. Rewrites elsewhere (a fused norm upstream of a
    matmul that feeds an all-reduce) leave those unchanged: they record dependencies on
    waits and graph inputs, not the ops between. The regions catch computation that moved
    across a collective (see `collective_changes`).
    """
    waits: dict[fx.Node, int] = {}
    colls: dict[fx.Node, int] = {}
    waits_of: dict[fx.Node, frozenset] = {}
    inputs_of: dict[fx.Node, frozenset] = {}
    placeholders = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    for node in graph.nodes:
        deps = [waits_of[i] for i in node.all_input_nodes]
        w = frozenset().union(*deps)
        p = frozenset().union(*[inputs_of[i] for i in node.all_input_nodes])
        if node in placeholders:
            p = p | {placeholders[node]}
        if _is_wait(node):
            waits[node] = len(waits)
            w = w | {waits[node]}
        elif is_collective(node):
            colls[node] = len(colls)
        waits_of[node], inputs_of[node] = w, p
    feeds: dict[fx.Node, frozenset] = {}
    for node in reversed(graph.nodes):
        f = frozenset().union(*[feeds[u] for u in node.users]) if node.users else frozenset()
        f |= {colls[u] for u in node.users if u in colls}
        feeds[node] = f
    regions = {n.name: (target_name(n), tuple(sorted(waits_of[n])), tuple(sorted(feeds[n])))
               for n in graph.nodes if n.op == "call_function" and not is_collective(n)}
    collectives = []
    for node, i in colls.items():
        tensors = [a for a in node.all_input_nodes]
        collectives.append({
            "op": target_name(node),
            "args": [repr(a) for a in node.args if not isinstance(a, (fx.Node, list, tuple))]
            + [f"{k}={v!r}" for k, v in node.kwargs.items() if not isinstance(v, fx.Node)],
            "sends": [_tensor_type(a) for a in tensors],
            "after_waits": sorted(set().union(*[waits_of[a] for a in tensors])),
            "from_inputs": sorted(set().union(*[inputs_of[a] for a in tensors])),
            "read_by": sorted(target_name(u) for u in node.users),
        })
    wait_rows = []
    for node in waits:
        src = node.args[0] if node.args else None
        wait_rows.append({"on": colls.get(src) if isinstance(src, fx.Node) else None})
    outputs = []
    for node in graph.nodes:
        if node.op == "output":
            for leaf in torch.utils._pytree.tree_leaves(node.args):
                outputs.append(sorted(waits_of[leaf]) if isinstance(leaf, fx.Node) else None)
    return {"collectives": collectives, "waits": wait_rows, "outputs": outputs, "regions": regions}


def _region_text(region: tuple) -> str:
    _, waits, feeds = region
    return f"after waits {list(waits)}, feeding collectives {list(feeds)}"


def collective_changes(before: fx.Graph, after: fx.Graph) -> list[str]:
    """How a rewrite changed what `before` communicates or moved computation across a wait,
    one sentence each; [] when it did neither (see `collective_fingerprint`)."""
    b, a = collective_fingerprint(before), collective_fingerprint(after)
    problems = []
    if len(b["collectives"]) != len(a["collectives"]):
        problems.append(f"collectives {len(b['collectives'])} -> {len(a['collectives'])}: "
                        f"{[c['op'] for c in b['collectives']]} -> {[c['op'] for c in a['collectives']]}")
    for i, (cb, ca) in enumerate(zip(b["collectives"], a["collectives"])):
        what = f"collective #{i} ({cb['op']})"
        if cb["op"] != ca["op"] or cb["args"] != ca["args"]:
            problems.append(f"{what}: now {ca['op']}({', '.join(ca['args'])}), was {cb['op']}({', '.join(cb['args'])})")
        if cb["sends"] != ca["sends"]:
            problems.append(f"{what}: sends {ca['sends']}, was {cb['sends']}")
        if cb["after_waits"] != ca["after_waits"]:
            problems.append(f"{what}: its input depends on waits {ca['after_waits']}, was {cb['after_waits']} "
                            "(computation moved across a wait_tensor)")
        if cb["from_inputs"] != ca["from_inputs"]:
            problems.append(f"{what}: its input is computed from graph inputs {ca['from_inputs']}, was "
                            f"{cb['from_inputs']} (computation moved across the collective)")
        if cb["read_by"] != ca["read_by"]:
            problems.append(f"{what}: its result is read by {ca['read_by']}, was {cb['read_by']}"
                            + (" (read before its wait_tensor)" if set(ca["read_by"]) - {"_c10d_functional.wait_tensor"}
                               else ""))
    # Computation stays in its region. A node both graphs hold (same name and op: the pass
    # manager keeps untouched nodes' names) must keep its region; a node a rewrite added must
    # land in a region where that rewrite removed computation (a fusion replaces nodes in
    # place; nothing is created in front of a collective from work that was behind a wait).
    removed_regions = {r[1:] for name, r in b["regions"].items()
                       if name not in a["regions"] or a["regions"][name][0] != r[0]}
    for name, ra in a["regions"].items():
        rb = b["regions"].get(name)
        if rb is not None and rb[0] == ra[0]:
            if rb != ra:
                problems.append(f"{name} ({ra[0]}) moved: now {_region_text(ra)}, was {_region_text(rb)} "
                                "(computation moved across a collective)")
        elif ra[1:] not in removed_regions:
            problems.append(f"new node {name} ({ra[0]}) {_region_text(ra)}, where the rewrite removed nothing "
                            "(computation moved across a collective)")
    if b["waits"] != a["waits"]:
        problems.append(f"wait_tensors {b['waits']} -> {a['waits']}")
    if b["outputs"] != a["outputs"]:
        problems.append(f"which waits each output depends on: {b['outputs']} -> {a['outputs']}")
    return problems

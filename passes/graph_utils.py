"""Small FX helpers shared by the passes: snapshots, source lines, fake-tensor metadata."""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

import torch
import torch.fx as fx

aten = torch.ops.aten


def snapshot(graph: fx.Graph) -> fx.Graph:
    """A deep copy of `graph` (nodes and their meta) that `restore` can put back."""
    clone = fx.Graph(owning_module=graph.owning_module)
    _copy_into(clone, graph)
    return clone


def restore(graph: fx.Graph, saved: fx.Graph) -> None:
    """Make `graph` (in place: Inductor holds a reference to it) equal to `saved` again."""
    nodes = list(graph.nodes)
    # Drop every edge first: a failed pass may have left nodes out of order, and
    # erase_node refuses a node that still has users.
    for node in nodes:
        node.args, node.kwargs = (), {}
    for node in reversed(nodes):
        graph.erase_node(node)
    # Erased nodes keep their names reserved; a fresh namespace lets the copies take
    # the original names back (Inductor names buffers after nodes).
    graph._graph_namespace = fx.graph._Namespace()
    _copy_into(graph, saved)


def _copy_into(dst: fx.Graph, src: fx.Graph) -> None:
    val_map: dict[fx.Node, fx.Node] = {}
    copied = dst.graph_copy(src, val_map, return_output_node=True)
    if copied is None:  # a graph without an output node
        return
    out_value, src_output = copied
    new_out = dst.output(out_value)
    new_out.meta = copy.copy(src_output.meta)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node | None) -> str | None:
    """`file:line in function: code` of the innermost model frame in the node's stack trace."""
    if node is None:
        return None
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    if not frames:
        return None
    filename, line, func, code = frames[-1]
    return f"{filename}:{line} in {func}: {code.strip()}"


def fake_value(node: Any) -> Any:
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return node


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def propagate_meta(node: fx.Node) -> None:
    """Set `node.meta['val']` by running its target on the fake values of its inputs."""
    from torch._guards import detect_fake_mode

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fake_value)
    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    fake_mode = detect_fake_mode(flat)
    if fake_mode is None:
        return
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def insert_call(
    graph: fx.Graph,
    target: Callable,
    args: tuple,
    kwargs: dict | None = None,
    like: fx.Node | None = None,
) -> fx.Node:
    """Create a call_function node (at the current insertion point) with fake metadata.

    `like` donates its stack trace, so later reports and graph-diff can still map the
    new node to the model source line of the code it replaced.
    """
    node = graph.call_function(target, args, kwargs or {})
    if like is not None and "stack_trace" in like.meta:
        node.meta["stack_trace"] = like.meta["stack_trace"]
    propagate_meta(node)
    return node


def is_op(node: Any, *targets: Any) -> bool:
    """Whether `node` calls one of `targets` (an OpOverload or an OpOverloadPacket)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for target in targets:
        if node.target is target:
            return True
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None and packet is target:
            return True
    return False


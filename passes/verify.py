"""`verify` mode: run a graph before and after a pass on random inputs and compare.

The inputs are made from the placeholders' fake tensors (shape, stride, dtype,
device; symbolic sizes take their hints). In `exact` numerics the outputs must be
bitwise equal; in `fast` numerics within the tolerances documented in docs/numerics.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class VerificationError(AssertionError):
    """The rewritten graph computed something else than the original."""


def _hint(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import hint_int

        return hint_int(value)
    return value


def _random_like(val: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = [_hint(s) for s in val.shape]
    stride = [_hint(s) for s in val.stride()]
    out = torch.empty_strided(shape, stride, dtype=val.dtype, device=val.device)
    if val.dtype.is_floating_point:
        base = torch.randn(out.shape, generator=generator, dtype=torch.float32)
        out.copy_(base.to(val.dtype))
    elif val.dtype == torch.bool:
        out.copy_(torch.randint(0, 2, out.shape, generator=generator).bool())
    else:
        out.copy_(torch.randint(0, 4, out.shape, generator=generator).to(val.dtype))
    return out


def sample_inputs(graph: fx.Graph, seed: int = 0) -> list[Any] | None:
    """Random real inputs for `graph`, or None when a placeholder has no usable metadata."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            inputs.append(_random_like(val, generator))
        elif isinstance(val, (int, float, bool, torch.SymInt)):
            inputs.append(_hint(val))
        else:
            return None
    return inputs


def run_graph(graph: fx.Graph, inputs: list[Any]) -> Any:
    from .graph_utils import snapshot

    root = graph.owning_module if graph.owning_module is not None else torch.nn.Module()
    module = fx.GraphModule(root, snapshot(graph))
    cloned = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad():
        return module(*cloned)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a, b = a.contiguous(), b.contiguous()
    if a.dtype.is_floating_point and a.element_size() in (1, 2, 4, 8):
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`fast` numerics: FP8 within one ulp (relative 1/8) on 99.9% of elements, else allclose."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return bool(((a.long() - b.long()).abs() <= 1).float().mean() >= 0.999)
    af, bf = a.float(), b.float()
    if a.element_size() == 1:
        ok = (af - bf).abs() <= af.abs().maximum(bf.abs()) * 0.125 + 1e-6
        ok |= torch.isnan(af) & torch.isnan(bf)
        return bool(ok.float().mean() >= 0.999)
    rtol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(a.dtype, 1e-5)
    return torch.allclose(af, bf, rtol=rtol, atol=rtol, equal_nan=True)


def compare_outputs(before: Any, after: Any, exact: bool) -> str | None:
    """None when the outputs agree, else a description of the first difference."""
    flat_b = torch.utils._pytree.tree_leaves(before)
    flat_a = torch.utils._pytree.tree_leaves(after)
    if len(flat_b) != len(flat_a):
        return f"{len(flat_b)} outputs before, {len(flat_a)} after"
    for i, (b, a) in enumerate(zip(flat_b, flat_a)):
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor):
            same = _bitwise_equal(b, a) if exact else _close(b, a)
            if not same:
                detail = f"{b.dtype}{list(b.shape)} vs {a.dtype}{list(a.shape)}"
                if b.dtype == a.dtype and b.shape == a.shape and b.dtype.is_floating_point:
                    diff = (b.float() - a.float()).abs().nan_to_num(nan=float("inf")).max().item()
                    detail += f", max abs diff {diff:g}"
                return f"output {i} differs ({detail})"
        elif b != a:
            return f"output {i} differs ({b!r} vs {a!r})"
    return None


def verify_rewrite(before: fx.Graph, after: fx.Graph, exact: bool) -> str | None:
    """Run both graphs on the same random inputs; None when they agree or cannot be run.

    A graph that cannot run on random inputs (index inputs out of range, say) is not
    evidence against the pass, so it reports None rather than a failure.
    """
    inputs = sample_inputs(before)
    if inputs is None:
        return None
    try:
        expected = run_graph(before, inputs)
    except Exception:
        return None
    actual = run_graph(after, inputs)
    return compare_outputs(expected, actual, exact)

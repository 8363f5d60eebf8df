"""The `rope` semantic op in the lowering registry: `none`, `aten`, `triton`, and `auto`'s table.

One call is one RoPE writeback (one of q/k): ``out = rotate(x, cos, sin)`` written into
a fresh buffer of x's shape. The pass describes it as an `OpCall`:

* tensors ``x``, ``cos``, ``sin`` (the matched rotation; when it was not identified,
  ``x`` describes the buffer, which has x's shape and dtype, and cos/sin are None);
* variant ``interleaved`` (step-2 writeback, pairs ``(x[2i], x[2i+1])``) or ``neox``
  (two halves);
* params ``interleaved``, ``head_dim`` and ``rotation``: ``f32`` when a rotation computed
  in f32 with one rounding reproduces the model (matched f32 math, or
  ``numerics="fast"``), else why not (``not_identified``, ``rounds_between_steps``,
  ``x_dtype_differs``).

`build(emit, tensors, params)` gets, besides those roles, the model's own halves
``first`` / ``second`` (as written, before the writeback's cast) and the writeback's
geometry (``dim``, ``split``, ``shape``, ``dtype``, ``first_meta``, ``second_meta``)
when a pass calls it. Without them (measuring, tests) the builds compute the halves
from x, cos and sin in f32 (`rope_aten.rotate`), so every implementation is timed
doing the same work.

Implementations:

* ``none``: keep the writeback. The pass leaves the model's nodes alone; the build
  spells the functionalized writeback so that it can be measured.
* ``aten``: stack/flatten (``cat`` of unsqueezed halves + reshape) or ``cat`` of the
  model's halves: bitwise the writeback (`rope_aten`). Always applicable.
* ``triton``: ``fusewright.rope(x, cos, sin, interleaved)`` (the Triton kernel on CUDA,
  the reference math elsewhere); the pass pairs q and k sharing tables into one
  ``rope_qk`` launch. Needs the rotation identified with f32 math.

`auto` (lowering/auto.py) first asks :func:`shipped_choice_for_call`, which answers
from ``rope_auto.json``: the rows measured by ``fusewright bench rope --table`` for
this device by name (nearest element count decides, with the registry's 3% band and
rule order), else the file's rule for the backend (cuda, cpu), which cites the
measurements behind it. It answers only when every candidate is one of the table's
options, so a user-registered implementation is measured like for any other op.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import torch

from . import rope_aten
from . import rope_ops  # noqa: F401  (registers torch.ops.fusewright.rope, which build_triton emits)
from .registry import Emit, OpCall, register, semantic_op

TABLE_PATH = os.path.join(os.path.dirname(__file__), "rope_auto.json")
TABLE_OPTIONS = ("none", "aten", "triton")
ROTATION_PROBLEMS = {
    "not_identified": "x, cos and sin not identified behind the writeback",
    "rounds_between_steps": "the model rounds between steps (not f32 math); the kernel needs numerics='fast'",
    "x_dtype_differs": "x dtype differs from the buffer dtype",
}


def op_call(x: Any, cos: Any, sin: Any, *, interleaved: bool, rotation: str,
            producer: str = "materialized") -> OpCall:
    """The registry's description of one writeback (real, fake or TensorInfo tensors).

    `producer` is context, not a property of the op: "fusible" when x is computed by ops
    Inductor would fuse into the aten lowering (patterns.rope.x_producer)."""
    head_dim = int(x.shape[-1]) if len(x.shape) else 0
    return OpCall.make("rope", {"x": x, "cos": cos, "sin": sin},
                       variant="interleaved" if interleaved else "neox",
                       interleaved=bool(interleaved), head_dim=head_dim, rotation=rotation, producer=producer)


# ------------------------------------------------------------------ builds
def _halves(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> tuple[Any, Any, dict]:
    """The halves to write and the writeback's geometry: the model's, or computed from x."""
    if t.get("first") is not None:
        return t["first"], t["second"], dict(p)
    x = t["x"]
    d = int(p["head_dim"])
    interleaved = bool(p["interleaved"])
    a, b = rope_aten.rotate(emit, x, t["cos"], t["sin"], interleaved=interleaved, head_dim=d)
    shape = list(x.shape)
    half = shape[:-1] + [d // 2]
    geometry = dict(p, dim=len(shape) - 1, split=d // 2, shape=shape, dtype=x.dtype,
                    first_meta=(torch.float32, half), second_meta=(torch.float32, half))
    return a, b, geometry


def _dtype(value: Any) -> torch.dtype:
    return getattr(torch, value) if isinstance(value, str) else value


def _meta(value: Any) -> tuple[torch.dtype, list[int]]:
    return _dtype(value[0]), list(value[1])


def build_aten(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> Any:
    a, b, g = _halves(emit, t, p)
    shape, dtype = list(g["shape"]), _dtype(g["dtype"])
    if g["interleaved"]:
        return rope_aten.interleave(emit, a, b, dim=int(g["dim"]), shape=shape, dtype=dtype,
                                    a_meta=_meta(g["first_meta"]), b_meta=_meta(g["second_meta"]))
    return rope_aten.concat_halves(emit, a, b, dim=int(g["dim"]), split=int(g["split"]), shape=shape, dtype=dtype,
                                   a_meta=_meta(g["first_meta"]), b_meta=_meta(g["second_meta"]))


def build_none(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> Any:
    a, b, g = _halves(emit, t, p)
    return rope_aten.writeback(emit, a, b, strided=bool(g["interleaved"]), dim=int(g["dim"]),
                               split=int(g["split"]), shape=list(g["shape"]), dtype=_dtype(g["dtype"]))


def build_triton(emit: Emit, t: Mapping[str, Any], p: Mapping[str, Any]) -> Any:
    return emit(torch.ops.fusewright.rope.default, t["x"], t["cos"], t["sin"], bool(p["interleaved"]))


# ------------------------------------------------------------------ supports
def _writeback_ok(call: OpCall) -> str | None:
    x = call.tensor("x")
    if x is None or not x.dtype.is_floating_point:
        return "the written tensor is not floating point"
    return None


def _triton_ok(call: OpCall) -> str | None:
    problem = _writeback_ok(call)
    if problem:
        return problem
    rotation = dict(call.params).get("rotation", "not_identified")
    if rotation != "f32":
        return ROTATION_PROBLEMS.get(rotation, rotation)
    x = call.tensor("x")
    if x is None or not x.shape or x.shape[-1] % 2:
        return "x's last dim is not even"
    for role in ("cos", "sin"):
        t = call.tensor(role)
        if t is None or not t.dtype.is_floating_point:
            return f"{role} is not a floating-point tensor"
    return None


def _register() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    aten_src = (os.path.join(here, "rope_lowering.py"), os.path.join(here, "rope_aten.py"))
    register("rope", "none", build_none, supports=_writeback_ok, source=aten_src, replace=True)
    register("rope", "aten", build_aten, supports=_writeback_ok, source=aten_src, replace=True)
    # the build, the op around the kernel, and the kernel all decide what a triton lowering runs
    kernel_srcs = tuple(os.path.join(here, f) for f in ("rope_lowering.py", "rope_ops.py", "rope_triton.py"))
    register("rope", "triton", build_triton, supports=_triton_ok, source=kernel_srcs, replace=True)


_register()


def is_builtin_triton(impl: Any) -> bool:
    """The shipped fused op (the pass may pair q and k into one `rope_qk` launch for it)."""
    return getattr(impl, "build", None) is build_triton


# ------------------------------------------------------------------ auto's shipped table
@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    with open(TABLE_PATH) as f:
        return json.load(f)


def _elements(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        if s < 0:
            return -1
        n *= s
    return n


def shipped_choice_for_call(call: OpCall, device_name: str,
                            candidates: Sequence[str] = ()) -> tuple[str, str] | None:
    """(implementation, why) from `rope_auto.json` for this call, or None when it does not cover it.

    `candidates`: the supported implementations. A candidate the table never measured
    (a user's) means no answer: `auto` measures instead.
    """
    if call.op != "rope":
        return None
    candidates = tuple(candidates) or TABLE_OPTIONS
    if any(c not in TABLE_OPTIONS for c in candidates):
        return None
    if dict(call.params).get("producer") == "fusible" and "aten" in candidates:
        # The table times the rotation alone, from x in memory. In a graph where x is still
        # being computed (an RMSNorm), the aten lowering lets Inductor compute norm and
        # rotation in one kernel, and nothing the table measured applies.
        return "aten", ("x is computed by ops Inductor fuses into the aten lowering, so the fused kernel "
                        "would re-read it from memory (Wan2.2 attention block, H100: norm/RoPE kernel time "
                        "cut 41.5% with aten, 29.9% with the fused kernel; docs/benchmarks.md)")
    x = call.tensor("x")
    n = _elements(x.shape) if x is not None else -1
    table = load_table()
    rows = table.get("measured", {}).get(device_name)
    if rows and n > 0:
        from .auto import TOLERANCE, pick_measured

        row = min(rows, key=lambda r: abs(math.log(max(1, r["elements"])) - math.log(n)))
        times = {c: float(row["us"][c]) for c in candidates if c in row.get("us", {})}
        if times:
            order = semantic_op("rope").rule_for(call.device_type)
            winner = pick_measured(times, order)
            shown = ", ".join(f"{c} {times[c]}us" for c in sorted(times, key=times.get))
            return winner, (f"measured on {device_name} at {row['elements']} elements: {shown}; "
                            f"within {TOLERANCE:.0%} the rule order {','.join(order)} decides (rope_auto.json)")
    rule = table.get("rules", {}).get(call.device_type)
    if rule is None:
        return None
    pick = rule["with_kernel"] if "triton" in candidates else rule["without_kernel"]
    if pick not in candidates:
        return None
    return pick, f"rule for {call.device_type} (rope_auto.json): {rule['why']}"


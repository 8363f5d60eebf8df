"""`auto` for `rms_norm_quant`: Triton kernel or aten sequence, from shipped measurements.

`norm_quant_auto.json` (next to this module) holds rows measured by
`fusewright bench norm-quant --write-choice PATH`: for one device, per variant family
(see :func:`family`), token count and hidden size, the Triton kernel's time and stock
Inductor's time for the unfused graph, measured in the same run. :func:`shipped_choice`
answers from the row of the same device and family nearest to the call's shape (token
count in log scale first, then hidden size); it answers only inside the measured token
range of that family (a small-T row says nothing about T = 16384) and returns None
otherwise, so the caller falls back to measuring once and caching on disk
(:mod:`fusewright.lowering.auto`) or to the op's rule.

A row only counts as a measurement when the bench's timer was sound for it: the table
records the timer; rows timed with the host-overhead-prone direct-event timer of the
first H100 run are not shipped (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

from .norm_quant_spec import NormQuantSpec

CHOICE_PATH = os.path.join(os.path.dirname(__file__), "norm_quant_auto.json")
# Triton must win by this much to be picked: within it the aten sequence, which Inductor
# can fuse with its neighbours, is kept.
MARGIN = 1.03


def family(spec: NormQuantSpec) -> str:
    """Variant family for the table: quant kind (+ group size, col-major, ue8m0) + residual."""
    q = spec.quant
    if q.kind == "fp8_per_group":
        name = f"group{q.group_size}" + ("_col" if q.col_major else "") + ("_ue8m0" if q.ue8m0 else "")
    else:
        name = {"fp8_static": "static", "fp8_per_token": "token", "int8_per_token": "int8_token"}[q.kind]
    return ("add_" if spec.norm.residual != "none" else "") + name


@functools.lru_cache(maxsize=4)
def load_table(path: str = CHOICE_PATH) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"rows": []}


def shipped_choice(spec: NormQuantSpec, tokens: int, hidden: int, device_name: str,
                   table: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """("triton" | "aten", why) from the shipped rows, or None when they do not cover the call."""
    table = load_table() if table is None else table
    fam = family(spec)
    rows = [r for r in table.get("rows", []) if r.get("device") == device_name and r.get("family") == fam]
    if not rows:
        return None
    t_lo = min(r["T"] for r in rows)
    t_hi = max(r["T"] for r in rows)
    # inside the measured range, with a factor-2 reach at either end
    if not (t_lo / 2 <= max(tokens, 1) <= t_hi * 2):
        return None
    lt = math.log2(max(tokens, 1))
    row = min(rows, key=lambda r: (abs(math.log2(r["T"]) - lt), abs(r["H"] - hidden)))
    speedup = row["inductor_us"] / row["triton_us"]
    pick = "triton" if speedup >= MARGIN else "aten"
    return pick, (f"{fam} at T={row['T']} H={row['H']} on {device_name}: triton {row['triton_us']}us, "
                  f"inductor {row['inductor_us']}us ({row['timer']}, norm_quant_auto.json)")


def shipped_choice_for_call(call: Any, device_name: str) -> tuple[str, str] | None:
    """`shipped_choice` for a registry `OpCall` of `rms_norm_quant` (variant = spec string):
    the hook for `lowering/auto.py` to consult before measuring. None when the rows do not
    cover the call (a token count without a hint, -1, is not covered)."""
    if getattr(call, "op", None) != "rms_norm_quant" or not call.variant:
        return None
    x = call.tensor("x")
    if x is None or not x.shape or x.rows <= 0 or x.shape[-1] <= 0:
        return None
    return shipped_choice(NormQuantSpec.from_str(call.variant), x.rows, x.shape[-1], device_name)

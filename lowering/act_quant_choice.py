"""`auto` for `act_quant`: the fused op or the model's own nodes, from shipped measurements.

`act_quant_auto.json` (next to this module) holds rows measured by
`fusewright bench act-quant --write-choice PATH` on a device: per variant family
(:func:`family`), token count and width, the fused op's time (`triton`) and stock
Inductor's for the model's spelling (`none`), measured in the same run. The row of the
same device and family nearest to the call (token count in log scale, then width)
decides with the registry's 3% band and rule order; a call outside the measured token
range (with a factor-2 reach), or on another device, gets the file's rule for its
device type, which cites the measurements behind it. The hook answers only when every
candidate is `triton` or `none`, so a user's implementation is measured instead.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Sequence

from .act_quant_spec import ActQuantSpec

CHOICE_PATH = os.path.join(os.path.dirname(__file__), "act_quant_auto.json")
OPTIONS = ("triton", "none")


def family(spec: ActQuantSpec) -> str:
    """`<prologue>_<kind>`, e.g. `silu_mul_token`, `identity_group128_col`."""
    q = spec.quant
    if q.kind == "fp8_per_group":
        kind = f"group{q.group_size}" + ("_col" if q.col_major else "") + ("_ue8m0" if q.ue8m0 else "")
    else:
        kind = {"fp8_per_token": "token", "int8_per_token": "int8_token"}[q.kind]
    return f"{spec.prologue}_{kind}"


@functools.lru_cache(maxsize=4)
def load_table(path: str = CHOICE_PATH) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def shipped_choice_for_call(call: Any, device_name: str, candidates: Sequence[str] = (),
                            table: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """(implementation, why) for a registry `OpCall` of `act_quant`, or None when the table
    does not cover it."""
    if getattr(call, "op", None) != "act_quant" or not call.variant:
        return None
    candidates = tuple(candidates) or OPTIONS
    if any(c not in OPTIONS for c in candidates):
        return None
    table = load_table() if table is None else table
    spec = ActQuantSpec.from_str(call.variant)
    fam = family(spec)
    x = call.tensor("x")
    tokens = x.rows if x is not None else -1
    width = x.shape[-1] if x is not None and x.shape and isinstance(x.shape[-1], int) else -1
    rows = [r for r in table.get("measured", {}).get(device_name, []) if r.get("family") == fam]
    if rows and tokens > 0:
        t_lo, t_hi = min(r["T"] for r in rows), max(r["T"] for r in rows)
        if t_lo / 2 <= tokens <= t_hi * 2:
            from .auto import TOLERANCE, pick_measured
            from .registry import semantic_op

            lt = math.log2(tokens)
            row = min(rows, key=lambda r: (abs(math.log2(r["T"]) - lt), abs(r["H"] - width)))
            times = {c: float(row["us"][c]) for c in candidates if c in row.get("us", {})}
            if times:
                order = semantic_op("act_quant").rule_for(call.device_type)
                winner = pick_measured(times, order)
                shown = ", ".join(f"{c} {times[c]}us" for c in sorted(times, key=times.get))
                return winner, (f"{fam} measured on {device_name} at T={row['T']} H={row['H']}: {shown}; "
                                f"within {TOLERANCE:.0%} the rule order {','.join(order)} decides (act_quant_auto.json)")
    rule = table.get("rules", {}).get(call.device_type)
    if rule is None or rule.get("pick") not in candidates:
        return None
    return rule["pick"], f"rule for {call.device_type} (act_quant_auto.json): {rule['why']}"

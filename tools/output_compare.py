"""Comparing a compiled model's outputs with and without the rewrites, for graph-diff.

`compare_outputs(ref, new)` walks both output pytrees and returns :class:`Numerics`: the
largest absolute difference (NaN in the same places counts as equal), whether every
output is within tolerance (torch.testing's per-dtype defaults, one e4m3 step for fp8,
or the rtol/atol given), whether they are bitwise equal, and the first reason they are
not ok.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


# ----------------------------------------------------------------------------- numerics
# (rtol, atol) per output dtype: torch.testing's defaults; fp8 one e4m3 step
_TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
               torch.float64: (1e-7, 1e-7), torch.complex64: (1.3e-6, 1e-5)}
_FP8_TOL = (0.125, 1e-3)


@dataclasses.dataclass
class Numerics:
    max_abs_diff: float | None
    ok: bool | None
    bitwise: bool | None = None
    detail: str | None = None  # why not ok
    rtol: float | None = None
    atol: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "ok": self.ok, "bitwise": self.bitwise,
                "detail": self.detail, "rtol": self.rtol, "atol": self.atol}


def compare_outputs(ref: Any, new: Any, rtol: float | None = None, atol: float | None = None) -> Numerics:
    """max |ref - new| over all floating outputs, and whether every output is within tolerance."""
    ref_leaves, ref_spec = torch.utils._pytree.tree_flatten(ref)
    new_leaves, new_spec = torch.utils._pytree.tree_flatten(new)
    if ref_spec != new_spec:
        return Numerics(None, False, False, "outputs differ in structure", rtol, atol)
    worst, ok, bitwise, detail = 0.0, True, True, None
    for i, (x, y) in enumerate(zip(ref_leaves, new_leaves)):
        if not isinstance(x, torch.Tensor):
            if x != y:
                ok = bitwise = False
                detail = detail or f"output {i}: {x!r} != {y!r}"
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
            ok = bitwise = False
            detail = detail or f"output {i}: {tuple(x.shape)} {x.dtype} vs " + (
                f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__)
            continue
        xs, ys = x.detach().cpu(), y.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize == 1:
            xs, ys = xs.float(), ys.float()
            r, a = _FP8_TOL
        else:
            r, a = _TOLERANCES.get(x.dtype, (0.0, 0.0))
        r, a = (rtol if rtol is not None else r), (atol if atol is not None else a)
        if not (xs.is_floating_point() or xs.is_complex()):
            equal = torch.equal(xs, ys)
            bitwise &= equal
            if not equal:
                ok = False
                detail = detail or f"output {i}: integer values differ"
                worst = max(worst, float((xs.long() - ys.long()).abs().max()))
            continue
        xf, yf = xs.double(), ys.double()
        nan_x, nan_y = xf.isnan(), yf.isnan()
        same = torch.equal(xs.view(torch.uint8) if xs.dtype.itemsize == 1 else xs, ys.view(torch.uint8)
                           if ys.dtype.itemsize == 1 else ys) or bool(((xf == yf) | (nan_x & nan_y)).all())
        bitwise &= same
        if not torch.equal(nan_x, nan_y):
            ok = False
            detail = detail or f"output {i}: NaN in different places"
        diff = (xf - yf).abs().masked_fill(nan_x & nan_y, 0).nan_to_num(nan=float("inf"))
        if diff.numel():
            worst = max(worst, float(diff.max()))
            bad = diff > a + r * yf.abs().nan_to_num(nan=0.0)
            if bool(bad.any()):
                ok = False
                detail = detail or f"output {i}: {int(bad.sum())} of {diff.numel()} elements beyond rtol={r:g} atol={a:g}"
    return Numerics(worst, ok, bitwise, detail, rtol, atol)


"""The contract of a fused activation -> dynamic quantization: what one matched spelling computes.

The quantization in front of a linear whose input is not an RMSNorm's output: the
down projection's input ``silu(gate) * up`` in a gated MLP, or the output projection's
input (the attention output). Stock Inductor computes a dynamic (per-token or
per-group) quantization of a row wider than 1024 in one kernel with two loops: the
first finds the row's amax, the second reads the row again (recomputing the activation)
to quantize it. The fused op reads each input once.

An :class:`ActQuantSpec` is frozen and hashable; the pass hands it to the fused op as
the string from :meth:`to_str`. Computation for inputs of shape ``[..., H]``
(``f32(t)`` an exact upcast, ``rnd(t, d)`` a round-to-nearest-even cast to ``d``):

1. The activation ``h`` (``prologue``):
   * ``"identity"``: ``h = x`` (already in memory: a GEMM or attention output);
   * ``"silu_mul"``: ``g = f32(x)``; ``a = rnd(g / (1 + exp(-g)), act_dtype)``;
     ``h = rnd(f32(a) * f32(up), h_dtype)`` - the post-grad form of
     ``F.silu(gate) * up`` (Llama, Qwen, Mistral, DeepSeek MLPs). In bf16 models both
     roundings are to bf16; a model computing in f32 has ``act_dtype = h_dtype = f32``.
2. Quantization of ``f32(h)``: exactly step 4 of
   :mod:`fusewright.lowering.norm_quant_spec` (``quant``, a dynamic kind: per-token
   FP8 or INT8, per-group FP8 with row- or column-major scales, ue8m0).

Numerics (``numerics``): ``"exact"`` follows every step. ``exp`` is the one step no two
backends round alike (eager CPU, CUDA's libdevice and Triton's interpreter may differ
in the last f32 bit), so for ``silu_mul`` "exact" means every rounding the spelling
makes is made, not bitwise equality with another backend's exp; ``identity`` is
bitwise. ``"fast"`` may quantize by multiplying with the f32 reciprocal of the scale
(as norm_quant's fast mode); the activation's roundings stay (they are what amax and
the scale are computed from).

Outputs (:meth:`output_names`): ``q`` (``x.shape``, contiguous, the quant's out dtype)
and ``scale`` (per token ``[..., 1]``, per group ``[..., H // group_size]``, f32,
column-major groups as a permuted view, the layout of norm_quant's scale).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch

from .norm_quant_spec import _DTYPE_NAMES, _NAME_DTYPES, NUMERICS, QuantSpec, SpecError, _check

PROLOGUES = ("identity", "silu_mul")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class ActQuantSpec:
    """One fused activation -> dynamic quantization, as matched; see the module docstring."""

    prologue: str
    input_dtype: torch.dtype  # x (and up) as stored
    quant: QuantSpec
    act_dtype: torch.dtype = torch.float32  # silu_mul: silu's result is rounded to this
    h_dtype: torch.dtype = torch.float32  # the activation that is quantized (identity: input_dtype)
    numerics: str = "exact"

    def __post_init__(self) -> None:
        _check(self.prologue in PROLOGUES, f"prologue {self.prologue!r} not in {PROLOGUES}")
        _check(self.numerics in NUMERICS, f"numerics {self.numerics!r} not in {NUMERICS}")
        for name in ("input_dtype", "act_dtype", "h_dtype"):
            dt = getattr(self, name)
            _check(dt in _FLOATS, f"{name} must be one of float32, bfloat16, float16; got {dt}")
        _check(self.quant.dynamic, "act_quant fuses dynamic quantization only (a static scale needs no "
                                   "reduction: Inductor already quantizes in the activation's kernel)")
        if self.prologue == "identity":
            _check(self.h_dtype == self.input_dtype, "identity: h_dtype must equal input_dtype")

    # ------------------------------------------------------------------ outputs
    def output_names(self) -> tuple[str, ...]:
        return ("q", "scale")

    def inputs(self) -> tuple[str, ...]:
        return ("x", "up") if self.prologue == "silu_mul" else ("x",)

    def scale_shape(self, x_shape: Any) -> tuple:
        lead = tuple(x_shape[:-1])
        if self.quant.kind == "fp8_per_group":
            return lead + (x_shape[-1] // self.quant.group_size,)
        return lead + (1,)

    def check_hidden(self, hidden: int) -> None:
        gs = self.quant.group_size
        if self.quant.kind == "fp8_per_group" and hidden % gs != 0:
            raise SpecError(f"hidden size {hidden} is not divisible by the group size {gs}")

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        quant = {f.name: getattr(self.quant, f.name) for f in dataclasses.fields(self.quant)}
        quant = {k: _DTYPE_NAMES[v] if isinstance(v, torch.dtype) else v for k, v in quant.items()}
        return {
            "prologue": self.prologue,
            "input_dtype": _DTYPE_NAMES[self.input_dtype],
            "act_dtype": _DTYPE_NAMES[self.act_dtype],
            "h_dtype": _DTYPE_NAMES[self.h_dtype],
            "quant": quant,
            "numerics": self.numerics,
        }

    def to_str(self) -> str:
        """Canonical string form (the op argument); `from_str(s.to_str()) == s`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActQuantSpec":
        _check(isinstance(data, dict), f"an ActQuantSpec is a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        _check(not unknown, f"unknown ActQuantSpec fields: {sorted(unknown)}; accepted: {sorted(known)}")

        def dtype(key: str, default: torch.dtype | None = None) -> torch.dtype:
            v = data.get(key)
            if v is None and default is not None:
                return default
            _check(v in _NAME_DTYPES, f"unknown dtype {v!r} for {key}")
            return _NAME_DTYPES[v]

        q = dict(data.get("quant") or {})
        qnames = {f.name for f in dataclasses.fields(QuantSpec)}
        _check(not set(q) - qnames, f"unknown QuantSpec fields: {sorted(set(q) - qnames)}")
        for k, v in list(q.items()):
            if k.endswith("dtype") and isinstance(v, str):
                _check(v in _NAME_DTYPES, f"unknown dtype {v!r} for quant.{k}")
                q[k] = _NAME_DTYPES[v]
            elif k in ("scale_const", "clamp_lo", "clamp_hi") or (k in ("floor", "amax_ub") and v is not None):
                q[k] = float(v)
        return cls(
            prologue=data.get("prologue"),
            input_dtype=dtype("input_dtype"),
            quant=QuantSpec(**q),
            act_dtype=dtype("act_dtype", torch.float32),
            h_dtype=dtype("h_dtype", torch.float32),
            numerics=data.get("numerics", "exact"),
        )

    @classmethod
    def from_str(cls, text: str) -> "ActQuantSpec":
        return _parse(text)

    def replace(self, **changes: Any) -> "ActQuantSpec":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Short human label, used in reports (`detail=` of the pass)."""
        q = self.quant
        kind = q.kind + (f"{q.group_size}" if q.group_size else "") + ("_col" if q.col_major else "") + ("_ue8m0" if q.ue8m0 else "")
        return f"{self.prologue}->{kind}"


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> ActQuantSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"not an ActQuantSpec string: {exc.msg}: {text[:80]!r}") from None
    return ActQuantSpec.from_dict(data)

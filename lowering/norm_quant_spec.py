"""The contract of a fused RMSNorm -> quantization: what one matched spelling computes.

A :class:`NormQuantSpec` is frozen and hashable; it is what the matcher (patterns/)
produces, what the pass hands to the fused op (as the string from :meth:`to_str`), and
what every implementation (CPU reference, aten sequence, Triton kernel) must follow.

Computation, step by step, for an input ``x`` of shape ``[..., H]`` in
``norm.input_dtype`` (``f32(t)`` is an exact upcast, ``rnd(t, d)`` a round-to-nearest-even
cast to dtype ``d``; every arithmetic op below is IEEE f32 unless said otherwise):

1. Residual (``norm.residual``):
   * ``"none"``:        ``h = f32(x)``
   * ``"input_dtype"``: ``s = rnd(f32(x) + f32(residual), input_dtype)``;
     ``new_residual = s``; ``h = f32(s)``       (``x + residual`` in bf16, as Llama writes it)
   * ``"f32"``:         ``h = f32(x) + f32(residual)``;
     ``new_residual = rnd(h, input_dtype)``     (vLLM's native fused-add form; the
     norm reads the *unrounded* f32 sum)
2. ``v = mean(h * h, -1) + f32(eps)`` (``eps`` is applied as an f32 value: eager
   rounds a Python float through f32 when adding it to an f32 tensor), then
   ``hr = h * r`` where, by ``norm.inv``:
   * ``"rsqrt"``:      ``hr = h * rsqrt(v)`` (``torch.rsqrt`` and ``pow(v, -0.5)``,
     bitwise the same in eager; note eager CPU ``rsqrt`` is *not* ``1/sqrt``)
   * ``"recip_sqrt"``: ``hr = h * (1 / sqrt(v))`` (reciprocal rounded to f32 first)
   * ``"div_sqrt"``:   ``hr = h / sqrt(v)`` (ImageGPT)
3. Normalised output ``y`` (``norm.weight``), ``w`` the weight tensor:
   * ``"none"``:        ``y = rnd(h * r, out_dtype)``
   * ``"after_cast"``:  ``n = rnd(h * r, cast_dtype)``; ``y = rnd(f32(n) * f32(w), out_dtype)``
     where ``out_dtype = promote(cast_dtype, weight_dtype)`` (Llama family, T5 with a
     bf16 weight)
   * ``"before_cast"``: ``y = rnd((h * r) * f32(w), out_dtype)`` (Olmo2, ``F.rms_norm``
     decomposition; implicit promotion - T5/diffusers with an f32 weight and no cast
     back - is this style with ``out_dtype = float32``)
   * ``"one_plus"``:    ``y = rnd((h * r) * (1 + f32(w)), out_dtype)`` (Gemma; the
     ``1 +`` is done in f32. A model that adds 1 in bf16 is matched as
     ``"before_cast"`` with the computed ``1 + w`` as the weight tensor.)
   (``h * r`` above means ``hr``.) The multiply order ``(h * r) * w`` is fixed (it is what every matched spelling does).
4. Quantization of ``v = f32(y)`` (``quant``):
   * amax ``a`` over the last dim (per token) or over each group of ``group_size``
     consecutive elements of the last dim (per group); amax is exact in any order, so
     reading it from ``y`` or from ``v`` gives the same value (``amax_on_f32`` only
     records what the spelling wrote).
   * ``a = rnd(a, scale_math_dtype)``; ``a = min(a, amax_ub)`` if set;
     ``a = max(a, floor)`` if ``floor_on == "amax"``
   * ``scale_form == "amax_div"``: ``s = a / scale_const`` (a divisor, vLLM/torchao
     inference); ``"const_div"``: ``s = (1 / a) * scale_const`` (a multiplier,
     torchao training / BitNet int8), rounded twice: eager evaluates ``C / tensor``
     as ``tensor.reciprocal() * C``, and so does the reference. Computed in
     ``scale_math_dtype``.
   * ``s = max(s, floor)`` if ``floor_on == "scale"``; ``ue8m0``: ``s = exp2(ceil(log2(s)))``
   * ``s = rnd(s, scale_dtype)`` (the returned scale, float32)
   * ``kind == "fp8_static"``: ``s`` is the given scale tensor (one element, f32).
   * ``apply``: ``"div"``: ``t = v / s``; ``"mul_recip"``: ``t = v * (1 / s)`` (the
     reciprocal rounded to f32 first); ``"mul"``: ``t = v * s``.
   * int8 (``round_int``): ``t = round_half_even(t)``
   * ``q = rnd(clamp(t, clamp_lo, clamp_hi), out_dtype)``
   ``floor`` and ``amax_ub`` are stored as the *effective* values, already rounded
   to the dtype the spelling applied them in (a ``clamp(min=1e-10)`` on a bf16 amax
   applies ``bf16(1e-10)``), so implementations apply them as plain f32 max/min.

Numerics (``numerics``): ``"exact"`` follows every step above. ``"fast"`` computes
amax and scales exactly as above (so scales agree), but quantizes ``f32`` ``(h*r)*w``
without the intermediate rounding to ``cast_dtype``/``out_dtype`` and may replace
``"div"`` by multiplication with the f32 reciprocal: up to one FP8/INT8 step apart on
a few elements (docs/numerics.md). The returned normalised tensor and new residual are
exact in both modes.

Not part of the contract: the summation order of ``mean(h*h)`` (implementations may
reduce in any order; the reference uses eager ``torch.mean``). Everything elementwise,
the amax, and the constants are exact.

Outputs of every implementation, in this order (:meth:`NormQuantSpec.output_names`):

* ``q``: ``x.shape`` in ``quant.out_dtype`` (contiguous)
* ``scale`` (dynamic kinds only): per token ``[..., 1]`` f32; per group ``[..., H // group_size]``
  f32, row-major (contiguous) or, with ``col_major``, stored as a contiguous
  ``[H // group_size, ...]`` buffer and returned as its permuted view (strides of a
  transposed matrix for 2-D inputs, the layout DeepGEMM reads)
* ``residual`` (when ``norm.residual != "none"``): the new residual, ``x.shape`` in ``input_dtype``
* ``normalized`` (when ``return_normalized``): ``y``, ``x.shape`` in ``norm.out_dtype``
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch

INV_FORMS = ("rsqrt", "recip_sqrt", "div_sqrt")
WEIGHT_STYLES = ("none", "after_cast", "before_cast", "one_plus")
RESIDUAL_MODES = ("none", "input_dtype", "f32")
QUANT_KINDS = ("fp8_static", "fp8_per_token", "fp8_per_group", "int8_per_token")
SCALE_FORMS = ("amax_div", "const_div")
APPLY_MODES = ("div", "mul_recip", "mul")
FLOOR_ON = ("amax", "scale")
NUMERICS = ("exact", "fast")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.int8: "int8",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class SpecError(ValueError):
    """A NormQuantSpec whose fields do not describe a computation fusewright supports."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """The RMSNorm part (steps 1-3 of the module docstring)."""

    eps: float
    weight: str = "after_cast"
    input_dtype: torch.dtype = torch.bfloat16
    # after_cast: the dtype h*r is rounded to before the weight multiply; other
    # styles: equal to out_dtype.
    cast_dtype: torch.dtype = torch.bfloat16
    out_dtype: torch.dtype = torch.bfloat16
    weight_dtype: torch.dtype | None = torch.bfloat16
    residual: str = "none"
    inv: str = "rsqrt"

    def __post_init__(self) -> None:
        _check(self.inv in INV_FORMS, f"inv form {self.inv!r} not in {INV_FORMS}")
        _check(isinstance(self.eps, float) and self.eps >= 0.0, f"eps must be a float >= 0, got {self.eps!r}")
        _check(self.weight in WEIGHT_STYLES, f"weight style {self.weight!r} not in {WEIGHT_STYLES}")
        _check(self.residual in RESIDUAL_MODES, f"residual mode {self.residual!r} not in {RESIDUAL_MODES}")
        for field in ("input_dtype", "cast_dtype", "out_dtype"):
            _check(getattr(self, field) in _FLOAT_DTYPES, f"{field} must be one of {_FLOAT_DTYPES}, got {getattr(self, field)}")
        if self.weight == "none":
            _check(self.weight_dtype is None, "weight style 'none' takes no weight_dtype")
        else:
            _check(self.weight_dtype in _FLOAT_DTYPES, f"weight_dtype must be one of {_FLOAT_DTYPES}, got {self.weight_dtype}")
        if self.weight == "after_cast":
            expect = torch.promote_types(self.cast_dtype, self.weight_dtype)
            _check(self.out_dtype == expect, f"after_cast: out_dtype must be promote(cast_dtype, weight_dtype) = {expect}, got {self.out_dtype}")
        else:
            _check(self.cast_dtype == self.out_dtype, f"weight style {self.weight!r}: cast_dtype must equal out_dtype")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """The quantization tail (step 4 of the module docstring)."""

    kind: str = "fp8_per_token"
    group_size: int = 0  # per-group only: 64 or 128 (any positive size is accepted)
    col_major: bool = False  # per-group only: scales stored transposed
    ue8m0: bool = False  # scales rounded up to a power of two
    scale_form: str = "amax_div"
    scale_const: float = FP8_MAX
    apply: str = "mul_recip"
    clamp_lo: float = -FP8_MAX
    clamp_hi: float = FP8_MAX
    floor: float | None = None
    floor_on: str = "scale"
    amax_ub: float | None = None
    amax_on_f32: bool = False
    scale_math_dtype: torch.dtype = torch.float32
    scale_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = FP8

    def __post_init__(self) -> None:
        _check(self.kind in QUANT_KINDS, f"quant kind {self.kind!r} not in {QUANT_KINDS}")
        _check(self.apply in APPLY_MODES, f"apply {self.apply!r} not in {APPLY_MODES}")
        _check(self.scale_form in SCALE_FORMS, f"scale_form {self.scale_form!r} not in {SCALE_FORMS}")
        _check(self.floor_on in FLOOR_ON, f"floor_on {self.floor_on!r} not in {FLOOR_ON}")
        _check(self.clamp_lo < self.clamp_hi, "clamp_lo must be below clamp_hi")
        _check(self.scale_dtype == torch.float32, f"scale_dtype must be float32, got {self.scale_dtype}")
        _check(
            self.scale_math_dtype in (torch.float32, torch.float64, torch.bfloat16),
            f"scale_math_dtype must be float32, float64 or bfloat16, got {self.scale_math_dtype}",
        )
        if self.kind == "int8_per_token":
            _check(self.out_dtype == torch.int8, "int8_per_token quantizes to int8")
        else:
            _check(self.out_dtype == FP8, f"{self.kind} quantizes to float8_e4m3fn")
        if self.kind == "fp8_per_group":
            _check(isinstance(self.group_size, int) and self.group_size > 0, "fp8_per_group needs group_size > 0")
        else:
            _check(self.group_size == 0 and not self.col_major, f"{self.kind} has no groups")
        if self.kind == "fp8_static":
            _check(self.apply in ("div", "mul_recip"), "fp8_static divides by the given scale or multiplies by its reciprocal")
            _check(self.floor is None and self.amax_ub is None and not self.ue8m0, "fp8_static has no amax, floor or ue8m0")
        if self.scale_form == "const_div":
            _check(self.apply == "mul", "a const_div scale is a multiplier: apply must be 'mul'")
        elif self.kind != "fp8_static":
            _check(self.apply in ("div", "mul_recip"), "an amax_div scale is a divisor: apply must be 'div' or 'mul_recip'")

    @property
    def dynamic(self) -> bool:
        return self.kind != "fp8_static"


@dataclasses.dataclass(frozen=True)
class NormQuantSpec:
    """One fused RMSNorm -> quantization, as matched; see the module docstring."""

    norm: NormSpec
    quant: QuantSpec
    return_normalized: bool = False
    numerics: str = "exact"

    def __post_init__(self) -> None:
        _check(self.numerics in NUMERICS, f"numerics {self.numerics!r} not in {NUMERICS}")

    # ------------------------------------------------------------------ outputs
    def output_names(self) -> tuple[str, ...]:
        names = ["q"]
        if self.quant.dynamic:
            names.append("scale")
        if self.norm.residual != "none":
            names.append("residual")
        if self.return_normalized:
            names.append("normalized")
        return tuple(names)

    def scale_shape(self, x_shape: Any) -> tuple:
        """Shape of the returned scale for an input of shape `x_shape` (SymInts allowed)."""
        lead = tuple(x_shape[:-1])
        if self.quant.kind == "fp8_per_group":
            return lead + (x_shape[-1] // self.quant.group_size,)
        return lead + (1,)

    def check_hidden(self, hidden: int) -> None:
        """Raise SpecError if a hidden size of `hidden` cannot use this spec."""
        gs = self.quant.group_size
        if self.quant.kind == "fp8_per_group" and hidden % gs != 0:
            raise SpecError(f"hidden size {hidden} is not divisible by the group size {gs}")

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        def enc(obj: Any) -> dict[str, Any]:
            out = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                out[f.name] = _DTYPE_NAMES[v] if isinstance(v, torch.dtype) else v
            return out

        return {
            "norm": enc(self.norm),
            "quant": enc(self.quant),
            "return_normalized": self.return_normalized,
            "numerics": self.numerics,
        }

    def to_str(self) -> str:
        """Canonical string form (the op argument); `from_str(s.to_str()) == s`.

        Floats are written with `repr` through JSON, which round-trips every double.
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormQuantSpec":
        def dec(klass: type, d: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(d) - names
            _check(not unknown, f"unknown {klass.__name__} fields: {sorted(unknown)}")
            kwargs = {}
            for k, v in d.items():
                if k.endswith("dtype") and isinstance(v, str):
                    _check(v in _NAME_DTYPES, f"unknown dtype {v!r} for {k}")
                    v = _NAME_DTYPES[v]
                if k in ("eps", "scale_const", "clamp_lo", "clamp_hi") or (k in ("floor", "amax_ub") and v is not None):
                    v = float(v)
                kwargs[k] = v
            return klass(**kwargs)

        return cls(
            norm=dec(NormSpec, data["norm"]),
            quant=dec(QuantSpec, data["quant"]),
            return_normalized=bool(data.get("return_normalized", False)),
            numerics=data.get("numerics", "exact"),
        )

    @classmethod
    def from_str(cls, text: str) -> "NormQuantSpec":
        return _parse(text)

    def replace(self, **changes: Any) -> "NormQuantSpec":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Short human label, used in reports (`detail=` of the pass)."""
        q = self.quant
        kind = q.kind + (f"{q.group_size}" if q.group_size else "") + ("_col" if q.col_major else "") + ("_ue8m0" if q.ue8m0 else "")
        res = "" if self.norm.residual == "none" else f"+residual_{self.norm.residual}"
        return f"rms_norm[{self.norm.weight}]{res}->{kind}"


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> NormQuantSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"not a NormQuantSpec string: {exc.msg}: {text[:80]!r}") from None
    return NormQuantSpec.from_dict(data)


def f32_round(value: float) -> float:
    """`value` rounded to the nearest f32, as a Python float (how eager applies eps)."""
    return float(torch.tensor(value, dtype=torch.float32).item())


def round_to(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, as a Python float."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).item())

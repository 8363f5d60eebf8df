"""The lowering registry: one semantic op, several implementations, one chosen per call.

A *semantic op* (``rms_norm``, ``fused_add_rms_norm``, ``rms_norm_quant`` with its
variant, ``rope``) is what a pass recognised; an *implementation* is one way to compute
it: ``aten`` (a decomposable sequence Inductor fuses with its neighbours), ``triton``
(a fused fusewright op), or anything a user registers (a vendor CUDA op)::

    from fusewright.lowering import registry

    registry.register(
        "rms_norm", "vendor",
        build=lambda emit, t, p: emit(torch.ops.vendor.rms_norm.default, t["x"], t["weight"], p["eps"]),
        supports=lambda call: call.device_type == "cuda" or "needs CUDA",
        version="vendor-1.2",
    )

An implementation never sees FX: ``build(emit, tensors, params)`` calls
``emit(op, *args)`` for each op it needs, and the pass's ``emit`` turns those into
graph nodes (``eager_emit`` runs them, which is how implementations are measured and
tested). ``supports(call)`` looks only at an :class:`OpCall` (shapes, dtypes, device,
variant) and returns True, or False / a string saying why not.

Choosing (:func:`choose`) walks the config's priority list for the op
(``-cc.lowering.rms_norm=triton,aten``); ``auto`` hands the supported implementations
to :mod:`fusewright.lowering.auto` (measured speed per shape class, cached on disk;
a documented rule where measuring is off). The result carries a human-readable
reason that passes put into their report, so graph-diff can show what each op was
lowered to and why.

Every implementation has a uuid (name, version, digest of its source file); their
combination, :func:`uuid`, is part of the pass manager's uuid, so Inductor's FX graph
cache never serves a graph lowered by an implementation that has since changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import re
import threading
from typing import Any, Callable, Mapping, Sequence

import torch

Emit = Callable[..., Any]
# (emit, tensors by role, params by name) -> the op's outputs (one value or a tuple)
Build = Callable[[Emit, Mapping[str, Any], Mapping[str, Any]], Any]
Supports = Callable[["OpCall"], "bool | str | None"]


def eager_emit(op: Callable, *args: Any) -> Any:
    """The `emit` that runs ops right away: for tests, references and measurements."""
    return op(*args)


# ------------------------------------------------------------------ semantic ops
@dataclasses.dataclass(frozen=True)
class SemanticOp:
    """What an op computes, its tensor roles, and the rule `auto` follows without measurements.

    `rule` maps a device type to implementation names, best first; `auto` uses it where
    it cannot or may not measure, and to break ties between implementations measured
    within 3% of each other.
    """

    name: str
    tensors: tuple[str, ...]
    params: tuple[str, ...]
    doc: str
    rule: tuple[tuple[str, tuple[str, ...]], ...] = (("cuda", ("triton", "aten")), ("default", ("aten",)))

    def rule_for(self, device_type: str) -> tuple[str, ...]:
        rules = dict(self.rule)
        return rules.get(device_type, rules["default"])


SEMANTIC_OPS: dict[str, SemanticOp] = {
    op.name: op
    for op in (
        SemanticOp(
            "rms_norm", ("x", "weight"), ("eps",),
            "y = (f32(x) * rsqrt(mean(f32(x)^2, -1) + eps)).to(x.dtype) * weight  (Llama order; "
            "weight may be None)",
            # Decomposed, Inductor fuses the norm with what follows (a quant tail, a cast);
            # a fused kernel cannot, so the rule prefers aten on every device.
            rule=(("default", ("aten", "triton")),),
        ),
        SemanticOp(
            "fused_add_rms_norm", ("x", "residual", "weight"), ("eps",),
            "s = (x + residual) rounded to x.dtype; returns (rms_norm(s, weight, eps), s)",
            rule=(("default", ("aten", "triton")),),
        ),
        SemanticOp(
            "rms_norm_quant", ("x", "weight", "residual", "scale"), ("spec",),
            "NormQuantSpec (lowering/norm_quant_spec.py); the variant is the spec string",
        ),
        SemanticOp(
            "act_quant", ("x", "up"), ("spec",),
            "ActQuantSpec (lowering/act_quant_spec.py): an activation (identity or silu(x) * up) "
            "quantized per token / per group; `none` keeps the model's nodes",
            # The fused op reads each input once where Inductor's two-loop reduction reads it
            # twice (docs/benchmarks.md); off CUDA the op is the eager reference: keep the graph.
            rule=(("cuda", ("triton", "none")), ("default", ("none", "triton"))),
        ),
        SemanticOp(
            "rope", ("x", "cos", "sin"), ("interleaved", "head_dim", "rotation", "producer"),
            "o1 = x1*cos - x2*sin, o2 = x1*sin + x2*cos in f32, rounded once, written into a fresh "
            "buffer of x's shape (lowering/rope_lowering.py; `none` keeps the model's writeback)",
            # Measured on an H100 (rope_auto.json): the fused kernel wins from S=16384 on,
            # aten is within 3% below that and decomposable (Inductor fuses x's producer
            # into it), so ties go to aten; on CPU aten, then the writeback; a backend
            # nobody measured keeps the model's spelling.
            rule=(("cuda", ("aten", "triton", "none")), ("cpu", ("aten", "none", "triton")),
                  ("default", ("none", "aten", "triton"))),
        ),
    )
}


def semantic_op(name: str) -> SemanticOp:
    try:
        return SEMANTIC_OPS[name]
    except KeyError:
        raise KeyError(f"unknown semantic op {name!r}; known: {', '.join(SEMANTIC_OPS)}") from None


# ------------------------------------------------------------------ calls
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype, strides and device of one tensor argument: what `supports` may look at."""

    shape: tuple[int, ...]  # -1 for a dimension without a known size (dynamic, no hint)
    dtype: torch.dtype
    device: str
    stride: tuple[int, ...] = ()

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        """From a real or fake tensor; symbolic sizes become their hint, or -1."""
        return cls(tuple(_concrete(s) for s in t.shape), t.dtype, t.device.type,
                   tuple(_concrete(s) for s in t.stride()))

    @property
    def rows(self) -> int:
        """Product of every dim but the last (tokens), -1 when one is unknown."""
        rows = 1
        for s in self.shape[:-1]:
            if s < 0:
                return -1
            rows *= s
        return rows

    def is_contiguous(self) -> bool:
        expected, strides = 1, []
        for s in reversed(self.shape):
            strides.append(expected)
            expected *= max(s, 1)
        return not self.stride or tuple(reversed(strides)) == self.stride


def _concrete(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else -1


def _bucket(rows: int) -> str:
    # Powers of two: kernels are tuned per size regime, and a per-token count class
    # would measure again for every batch size a server sees.
    if rows < 0:
        return "dyn"
    return str(1 << max(0, (rows - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One occurrence of a semantic op, described without data.

    `variant` distinguishes kinds of the same op that need separate measurements (the
    NormQuantSpec string of rms_norm_quant, interleaved/neox for rope); `params` are
    values the implementation needs but that do not change its speed (eps).
    """

    op: str
    tensors: tuple[tuple[str, TensorInfo | None], ...]
    variant: str = ""
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, op: str, tensors: Mapping[str, Any], variant: str = "", **params: Any) -> "OpCall":
        """From tensors (real, fake or TensorInfo; None for absent optional ones)."""
        semantic_op(op)
        infos = tuple(
            (role, t if isinstance(t, TensorInfo) or t is None else TensorInfo.of(t)) for role, t in tensors.items()
        )
        return cls(op, infos, variant, tuple(sorted(params.items())))

    def tensor(self, role: str) -> TensorInfo | None:
        return dict(self.tensors).get(role)

    @property
    def device_type(self) -> str:
        return next((t.device for _, t in self.tensors if t is not None), "cpu")

    def shape_class(self) -> str:
        """Key of the measurement: rows bucketed to a power of two, every other size exact."""
        parts = [self.op] + ([self.variant] if self.variant else [])
        for role, t in self.tensors:
            if t is None:
                parts.append(f"{role}=none")
                continue
            dtype = str(t.dtype).replace("torch.", "")
            inner = "x".join(str(s) for s in t.shape[-1:])
            parts.append(f"{role}={dtype}[{_bucket(t.rows)}x{inner}]" if t.shape else f"{role}={dtype}[]")
        return ";".join(parts)


# ------------------------------------------------------------------ implementations
@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute a semantic op."""

    op: str
    name: str
    build: Build
    supports_fn: Supports | None = None
    version: str = "1"
    source: str | tuple[str, ...] | None = None  # file(s) whose content decides what `build` emits

    def supports(self, call: OpCall) -> str | None:
        """None when this implementation can compute `call`, else the reason it cannot."""
        if self.supports_fn is None:
            return None
        try:
            answer = self.supports_fn(call)
        except Exception as exc:  # noqa: BLE001 - a broken check must not break compilation
            return f"supports() raised {type(exc).__name__}: {exc}"
        if answer is True or answer is None:
            return None
        return answer if isinstance(answer, str) and answer else "not supported for this call"

    @property
    def module(self) -> str:
        return getattr(self.build, "__module__", "") or ""

    def uuid(self) -> str:
        hasher = hashlib.sha256(f"{self.op}:{self.name}:{self.version}:{self.module}".encode())
        paths = self.source or _source_of(self.build)
        for path in (paths,) if isinstance(paths, str) else paths or ():
            try:
                with open(path, "rb") as f:
                    hasher.update(f.read())
            except OSError:
                pass
        return hasher.hexdigest()[:16]

    def run(self, tensors: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
        """Run eagerly on real tensors (tests, references, measurements)."""
        return self.build(eager_emit, tensors, params)


def _source_of(fn: Callable) -> str | None:
    try:
        return inspect.getsourcefile(fn)
    except TypeError:
        return None


_lock = threading.RLock()
_impls: dict[str, dict[str, Implementation]] = {name: {} for name in SEMANTIC_OPS}
_builtins_loaded = False

# Modules that register built-in implementations when imported. Other lowering
# modules plug in by adding their name here (or by calling `register` at import).
# Listing them (rather than relying on whoever imports them first) keeps `uuid()` the
# same in every process.
BUILTIN_LOWERING_MODULES: tuple[str, ...] = (
    "fusewright.lowering.rms_norm_aten", "fusewright.lowering.norm_quant_ops", "fusewright.lowering.rope_lowering",
    "fusewright.lowering.rms_norm_ops", "fusewright.lowering.act_quant_ops",
)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        _builtins_loaded = True
        for name in BUILTIN_LOWERING_MODULES:
            importlib.import_module(name)


def register(
    op: str,
    name: str,
    build: Build,
    *,
    supports: Supports | None = None,
    version: str = "1",
    source: str | tuple[str, ...] | None = None,
    replace: bool = False,
) -> Implementation:
    """Add implementation `name` of semantic op `op`; returns it.

    `name` is what the config's priority list names (`-cc.lowering.rms_norm=vendor,aten`).
    Registering a name twice raises unless `replace=True` (a reload of the same module).
    Bump `version` when the implementation changes in a way its source file does not show
    (a new binary kernel): it is part of the compile cache key.
    """
    semantic_op(op)
    # built-ins first, whoever is imported first: registration order is the tie-break
    # order of `auto` after the rule, so it must not depend on import order
    _load_builtins()
    if not name or not name.replace("_", "").isalnum() or name == "auto":
        raise ValueError(f"implementation name {name!r}: use letters, digits and '_' (and not 'auto')")
    impl = Implementation(op, name, build, supports, version, source)
    with _lock:
        if name in _impls[op] and not replace:
            raise ValueError(f"{op} already has an implementation named {name!r}; pass replace=True to replace it")
        _impls[op][name] = impl
    return impl


def unregister(op: str, name: str) -> None:
    with _lock:
        _impls[semantic_op(op).name].pop(name, None)


def _order_key(item: tuple[int, Implementation]) -> tuple[int, int]:
    # Built-ins in BUILTIN_LOWERING_MODULES order, then everything else as registered.
    # Registration order alone depends on which built-in module a process imports first
    # (its `register` call loads the others before its own line runs).
    seq, impl = item
    module = impl.module
    if module in BUILTIN_LOWERING_MODULES:
        return (BUILTIN_LOWERING_MODULES.index(module), seq)
    return (len(BUILTIN_LOWERING_MODULES), seq)


def implementations(op: str) -> dict[str, Implementation]:
    """Name -> implementation for `op`: the built-ins in a fixed order, then the others in
    registration order."""
    _load_builtins()
    with _lock:
        items = list(_impls[semantic_op(op).name].values())
    return {impl.name: impl for _, impl in sorted(enumerate(items), key=_order_key)}


def implementation_names(op: str) -> tuple[str, ...]:
    return tuple(implementations(op))


def uuid() -> str:
    """Digest of every registered implementation: part of the pass manager's uuid."""
    _load_builtins()
    hasher = hashlib.sha256()
    with _lock:
        for op in sorted(_impls):
            for name in sorted(_impls[op]):
                hasher.update(f"{op}:{name}:{_impls[op][name].uuid()}\n".encode())
    return hasher.hexdigest()


# ------------------------------------------------------------------ choosing
@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation picked for one call (None: nothing applies) and why."""

    call: OpCall
    impl: Implementation | None
    reason: str

    @property
    def name(self) -> str:
        return self.impl.name if self.impl else "none"

    def detail(self) -> str:
        """One line for the pass report: `rms_norm -> aten (auto: ...)`."""
        return f"{self.call.op}{'[' + self.call.variant + ']' if self.call.variant else ''} -> {self.name} ({self.reason})"


_DETAIL = re.compile(r"^(?:(?P<source>.+?): )?(?P<op>[a-z_]+)(?:\[(?P<variant>[^\]]*)\])? -> "
                     r"(?P<impl>[A-Za-z0-9_]+) \((?P<reason>.*)\)$")


def parse_detail(detail: str) -> dict[str, str] | None:
    """Split a report detail written from :meth:`Choice.detail` (optionally prefixed by
    ``"<source op>: "``) into source, op, variant, impl and reason; None for other details.

    For graph-diff: ``report[pass].details`` maps such strings to how often they happened.
    """
    m = _DETAIL.match(detail)
    if not m or m.group("op") not in SEMANTIC_OPS:
        return None
    return {k: v or "" for k, v in m.groupdict().items()}


def choose(call: OpCall, priority: Sequence[str], *, tuner: Any = None) -> Choice:
    """Walk `priority` (from `LoweringConfig.priority(op)`); the first applicable entry wins.

    A named implementation applies when it is registered and supports the call; `auto`
    applies when any registered implementation supports the call, and asks `tuner`
    (default: :func:`fusewright.lowering.auto.default_tuner`) which one.
    """
    available = implementations(call.op)
    passed: list[str] = []
    for entry in priority:
        if entry == "auto":
            supported = {n: i for n, i in available.items() if i.supports(call) is None}
            if not supported:
                passed.append("auto: no registered implementation supports this call")
                continue
            if tuner is None:
                from .auto import default_tuner

                tuner = default_tuner()
            impl, why = tuner.pick(call, list(supported.values()))
            return Choice(call, impl, _join(passed, f"auto: {why}"))
        impl = available.get(entry)
        if impl is None:
            passed.append(f"{entry}: not registered for {call.op}")
            continue
        problem = impl.supports(call)
        if problem:
            passed.append(f"{entry}: {problem}")
            continue
        return Choice(call, impl, _join(passed, f"priority {','.join(priority)}"))
    return Choice(call, None, "; ".join(passed) or "empty priority list")


def _join(passed: list[str], last: str) -> str:
    return "; ".join(passed + [last]) if passed else last

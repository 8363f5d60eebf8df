"""`auto` lowering: the implementation measured fastest for the shape class, cached on disk.

:meth:`Tuner.pick` gets the implementations that support a call and returns one:

0. A *shipped* measurement for the op, when one covers the call on this device (a
   hook per op, :func:`register_shipped`; `rms_norm_quant` consults
   `norm_quant_choice.shipped_choice_for_call` and its `norm_quant_auto.json`, `rope`
   `rope_lowering.shipped_choice_for_call` and its `rope_auto.json`), decides
   without measuring; the hook applies the same 3% rule.
1. If measuring is on for the call's device, the times for its shape class come from
   the cache file, or are measured once (by `measure`, by default in a subprocess:
   see :mod:`fusewright.lowering.auto_measure`) and written there.
   The fastest time ``t_min`` sets a 3% band: among implementations measured within
   ``t_min * 1.03``, the one first in the op's rule order wins (on ties the
   decomposable aten sequence, which Inductor fuses with its neighbours, is preferred).
   So `auto` never picks an implementation measured more than 3% slower than another;
   one that failed to run is never picked.
2. Otherwise (measuring off, impossible, or every measurement failed) the op's
   documented rule decides: the first supported implementation in
   ``SemanticOp.rule_for(device)`` (``rms_norm``, ``fused_add_rms_norm``: aten, then
   triton; ``rms_norm_quant``: triton, then aten on CUDA, aten elsewhere; ``rope``:
   aten, triton, none on CUDA, aten, none, triton on CPU, none first elsewhere),
   then any other supported one in registration order.

Measuring is on for CUDA and off elsewhere (CPU CI); ``FUSEWRIGHT_AUTO_MEASURE=0``
turns it off everywhere, ``=1`` on everywhere.

Cache: one JSON file per key in ``$FUSEWRIGHT_CACHE_DIR/lowering-auto/`` (default
``$XDG_CACHE_HOME/fusewright`` or ``~/.cache/fusewright``). The key covers the device
name, torch, triton, CUDA and fusewright versions, the shape class, and the uuid of
each candidate implementation, so a changed kernel is measured again. Several
processes compiling at once: readers see either no file or a complete one (written to
a temporary file, then renamed); a process that has to measure takes an exclusive
lock on ``<key>.lock`` and reads the file again first, so each key is measured once.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .registry import Implementation, OpCall, semantic_op

TOLERANCE = 0.03
ENV_MEASURE = "FUSEWRIGHT_AUTO_MEASURE"
ENV_CACHE_DIR = "FUSEWRIGHT_CACHE_DIR"

# (call, implementations) -> {name: seconds per call, or an error message (str)}
Measurer = Callable[[OpCall, Sequence[Implementation]], dict[str, "float | str"]]


# (call, plain device name as torch.cuda.get_device_name gives it[, names of the supported
# candidates]) -> (implementation name, why) or None
ShippedHook = Callable[[OpCall, str], "tuple[str, str] | None"]
_shipped: dict[str, "ShippedHook | str"] = {
    # "module:function", imported when first needed (a missing module is no hook)
    "rms_norm_quant": "fusewright.lowering.norm_quant_choice:shipped_choice_for_call",
    "rope": "fusewright.lowering.rope_lowering:shipped_choice_for_call",
    "rms_norm": "fusewright.lowering.rms_norm_ops:shipped_choice_for_call",
    "fused_add_rms_norm": "fusewright.lowering.rms_norm_ops:shipped_choice_for_call",
    "act_quant": "fusewright.lowering.act_quant_choice:shipped_choice_for_call",
}


def register_shipped(op: str, hook: "ShippedHook | str | None") -> "ShippedHook | str | None":
    """Let `hook` answer `auto` for `op` from measurements shipped with the package (None removes it).

    Returns the hook it replaces (to put back)."""
    previous = _shipped.get(op)
    if hook is None:
        _shipped.pop(op, None)
    else:
        _shipped[op] = hook
    return previous


def _shipped_hook(op: str) -> ShippedHook | None:
    hook = _shipped.get(op)
    if isinstance(hook, str):
        import importlib

        module, _, name = hook.partition(":")
        try:
            hook = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            hook = None
        _shipped[op] = hook
    return hook


def _ask(hook: ShippedHook, call: OpCall, device: str, candidates: tuple[str, ...]) -> "tuple[str, str] | None":
    """Call `hook`; one taking a third argument also gets the supported candidates' names
    (so it can decline when a candidate, e.g. a user's implementation, was never measured)."""
    import inspect

    try:
        takes_candidates = len(inspect.signature(hook).parameters) >= 3
    except (TypeError, ValueError):
        takes_candidates = False
    return hook(call, device, candidates) if takes_candidates else hook(call, device)


def plain_device_name(device_type: str) -> str:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return device_name(device_type)


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE_DIR)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fusewright")
    return Path(root) / "lowering-auto"


def device_name(device_type: str) -> str:
    if device_type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    return f"{device_type}:{platform.machine()}:{platform.processor() or 'unknown'}"


def versions() -> dict[str, str]:
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no triton is a version too
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version,
            "cuda": str(torch.version.cuda), "fusewright": __version__}


def cache_key(call: OpCall, impls: Sequence[Implementation]) -> dict[str, Any]:
    return {
        "device": device_name(call.device_type),
        **versions(),
        "shape_class": call.shape_class(),
        "impls": {impl.name: impl.uuid() for impl in sorted(impls, key=lambda i: i.name)},
    }


def pick_measured(times: dict[str, float], order: Sequence[str], tolerance: float = TOLERANCE) -> str:
    """The winner among measured `times` (seconds): rule order decides within the band."""
    fastest = min(times.values())
    band = [name for name, t in times.items() if t <= fastest * (1 + tolerance)]
    return min(band, key=lambda n: (order.index(n) if n in order else len(order), times[n]))


class Tuner:
    """Picks among supported implementations; see the module docstring for the policy.

    `measure` is injectable (tests pass a fake timer); None disables measuring.
    `enabled` overrides the per-device default and the environment variable.
    """

    def __init__(self, measure: Measurer | None | str = "default", directory: str | os.PathLike | None = None,
                 enabled: bool | None = None, shipped: bool = True) -> None:
        if measure == "default":
            from .auto_measure import measure_in_subprocess

            measure = measure_in_subprocess
        self.measure = measure
        self.directory = Path(directory) if directory is not None else None
        self.enabled = enabled
        self.shipped = shipped

    def measuring(self, device_type: str) -> bool:
        if self.measure is None:
            return False
        if self.enabled is not None:
            return self.enabled
        env = os.environ.get(ENV_MEASURE, "").strip().lower()
        if env in ("0", "false", "off", "no"):
            return False
        if env in ("1", "true", "on", "yes"):
            return True
        return device_type == "cuda"

    def order(self, call: OpCall, impls: Sequence[Implementation]) -> list[str]:
        rule = semantic_op(call.op).rule_for(call.device_type)
        names = [i.name for i in impls]
        return [n for n in rule if n in names] + [n for n in names if n not in rule]

    def pick(self, call: OpCall, impls: Sequence[Implementation]) -> tuple[Implementation, str]:
        if not impls:
            raise ValueError("pick() needs at least one supported implementation")
        by_name = {i.name: i for i in impls}
        order = self.order(call, impls)
        if len(impls) == 1:
            return impls[0], "the only supported implementation"
        hook = _shipped_hook(call.op) if self.shipped else None
        if hook is not None:
            try:
                answer = _ask(hook, call, plain_device_name(call.device_type), tuple(by_name))
            except Exception:  # noqa: BLE001 - a broken table is no answer
                answer = None
            if answer is not None and answer[0] in by_name:
                # a hook answering from a documented rule says so ("rule ..."); else it cites rows
                why = answer[1] if answer[1].startswith("rule") else f"shipped measurement: {answer[1]}"
                return by_name[answer[0]], why
        note = "measuring is off for this device"
        if self.measuring(call.device_type):
            try:
                entry = self.lookup(call, impls)
            except OSError as exc:  # a read-only or full cache directory must not fail the compile
                return by_name[order[0]], f"rule for {call.device_type}: {','.join(order)} (cache unusable: {exc})"
            times = {n: t for n, t in entry["seconds"].items() if isinstance(t, (int, float)) and n in by_name}
            if times:
                winner = pick_measured(times, order)
                shown = ", ".join(f"{n} {times[n] * 1e6:.1f}us" for n in sorted(times, key=times.get))
                failed = [n for n in by_name if n not in times]
                return by_name[winner], (
                    f"measured for {call.shape_class()} on {entry['key']['device']}: {shown}"
                    + (f"; within {TOLERANCE:.0%} the rule order {','.join(order)} decides" if len(times) > 1 else "")
                    + (f"; not measurable: {', '.join(failed)}" if failed else "")
                )
            note = "no implementation could be measured: " + "; ".join(
                f"{n}: {e}" for n, e in entry["seconds"].items())
        return by_name[order[0]], f"rule for {call.device_type}: {','.join(order)} ({note})"

    # ------------------------------------------------------------ the cache
    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return (self.directory or cache_dir()) / f"{digest}.json"

    def lookup(self, call: OpCall, impls: Sequence[Implementation]) -> dict[str, Any]:
        """The cache entry for this call's key, measured and written first if missing."""
        key = cache_key(call, impls)
        path = self.path(key)
        entry = _read(path, key)
        if entry is not None:
            return entry
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.with_suffix(".lock")):
            entry = _read(path, key)  # another process may have measured while we waited
            if entry is not None:
                return entry
            try:
                seconds = dict(self.measure(call, impls))
            except Exception as exc:  # noqa: BLE001 - a failed measurement falls back to the rule
                seconds = {i.name: f"{type(exc).__name__}: {exc}" for i in impls}
            entry = {
                "key": key,
                "seconds": {n: (float(v) if isinstance(v, (int, float)) else str(v)) for n, v in seconds.items()},
                "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_atomic(path, entry)
        return entry


def _read(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    return entry if entry.get("key") == key else None  # a digest collision must not mislead


def _write_atomic(path: Path, entry: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic renames still keep the file whole
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_default: Tuner | None = None


def default_tuner() -> Tuner:
    global _default
    if _default is None:
        _default = Tuner()
    return _default


def set_default_tuner(tuner: Tuner | None) -> Tuner | None:
    """Replace the tuner `choose` uses (tests: a fake timer); returns the previous one."""
    global _default
    previous, _default = _default, tuner
    return previous

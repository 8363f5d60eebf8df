"""`PassConfig`: what fusewright does, built from dicts, JSON, dotted flags or the environment.

Every input form funnels into :meth:`PassConfig.from_dict`, so validation and error
messages are the same whichever way a user spells the configuration:

    PassConfig.from_dict({"fuse_norm_quant": False, "lowering": {"rms_norm": "triton,aten"}})
    PassConfig.from_json('{"numerics": "fast"}')
    PassConfig.from_cli(["-cc.fuse_norm_quant=false", "-cc.lowering.default=aten"])
    FUSEWRIGHT_CONFIG='{"strict": true}'  ->  PassConfig.from_env()

An unknown key or a bad value raises :class:`ConfigError`, naming the key, the value
given and what is accepted, with a close-match suggestion for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping

ENV_VAR = "FUSEWRIGHT_CONFIG"

LOWERING_CHOICES = ("auto", "triton", "aten")
NUMERICS_CHOICES = ("exact", "fast")
# Semantic ops whose implementation can be chosen per op (`-cc.lowering.rope=aten`).
LOWERED_OPS = ("rms_norm_quant", "rope", "rms_norm", "fused_add_rms_norm", "act_quant")
# Semantic ops an opaque custom op can be mapped to (`-cc.deopaque.mylib::rms_norm=rms_norm`).
DEOPAQUE_OPS = ("rms_norm", "fused_add_rms_norm")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A configuration key or value that fusewright does not accept."""


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(
        f"config key '{key}': got {value!r}; accepted: true or false "
        f"(or one of {', '.join(_TRUE + _FALSE)})"
    )


def _parse_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    hint = _suggest(str(value), choices) if isinstance(value, str) else ""
    raise ConfigError(
        f"config key '{key}': got {value!r}; accepted: {', '.join(choices)}{hint}"
    )


def _registered_impls(op: str) -> tuple[str, ...]:
    """Implementations users registered for `op` (lowering/registry.py), besides auto/triton/aten."""
    from ..lowering.registry import implementation_names

    return tuple(n for n in implementation_names(op) if n not in LOWERING_CHOICES)


def _parse_priority(key: str, value: Any, op: str | None = None) -> tuple[str, ...]:
    """`"triton,aten"` or `["triton", "aten"]` -> ("triton", "aten")."""
    choices = LOWERING_CHOICES + (_registered_impls(op) if op else ())
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(
            f"config key '{key}': got {value!r}; accepted: one of {', '.join(choices)} "
            "or a comma-separated priority list such as 'triton,aten'"
        )
    return tuple(_parse_choice(key, item, choices) for item in items)


def _flatten_op_names(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`-cc.deopaque.mylib::rms_norm.default=rms_norm` arrives split at the dots: join them back."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, Mapping):
            flat.update(_flatten_op_names(item, name))
        else:
            flat[name] = item
    return flat


_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def _parse_deopaque(value: Any, base: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """`{"mylib::rms_norm": "rms_norm"}` -> (("mylib::rms_norm", "rms_norm"),); null removes an entry."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"config key 'deopaque': got {value!r}; accepted: a mapping of custom op names to semantic "
            f"ops, e.g. {{\"mylib::rms_norm\": \"rms_norm\"}} or -cc.deopaque.mylib::rms_norm=rms_norm"
        )
    merged = dict(base)
    for name, semantic in _flatten_op_names(value).items():
        key = f"deopaque.{name}"
        if not _OP_NAME.match(name):
            raise ConfigError(
                f"config key '{key}': {name!r} is not a custom op name; accepted: 'namespace::op' or "
                "'namespace::op.overload', e.g. '_C::rms_norm'"
            )
        if semantic is None or (isinstance(semantic, str) and semantic.strip().lower() in ("", "none", "null")):
            merged.pop(name, None)
            continue
        merged[name] = _parse_choice(key, semantic, DEOPAQUE_OPS)
    return tuple(sorted(merged.items()))


@dataclasses.dataclass(frozen=True)
class LoweringConfig:
    """How fused ops are implemented: a default preference and per-op priority lists."""

    default: str = "auto"
    per_op: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def priority(self, op: str) -> tuple[str, ...]:
        """Implementations to try for `op`, best first (`auto` means: by measurement)."""
        return dict(self.per_op).get(op, (self.default,))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"default": self.default}
        out.update({op: ",".join(prio) for op, prio in self.per_op})
        return out

    @classmethod
    def from_value(cls, value: Any) -> "LoweringConfig":
        if isinstance(value, LoweringConfig):
            return value
        if isinstance(value, str):
            return cls(default=_parse_choice("lowering", value, LOWERING_CHOICES))
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config key 'lowering': got {value!r}; accepted: one of "
                f"{', '.join(LOWERING_CHOICES)}, or a mapping with keys "
                f"{', '.join(('default',) + LOWERED_OPS)}"
            )
        default = "auto"
        per_op: dict[str, tuple[str, ...]] = {}
        for op, prio in value.items():
            if op == "default":
                default = _parse_choice("lowering.default", prio, LOWERING_CHOICES)
            elif op in LOWERED_OPS:
                per_op[op] = _parse_priority(f"lowering.{op}", prio, op)
            else:
                accepted = ("default",) + LOWERED_OPS
                raise ConfigError(
                    f"unknown config key 'lowering.{op}' (value {prio!r}); accepted keys under "
                    f"'lowering': {', '.join(accepted)}{_suggest(op, accepted)}"
                )
        return cls(default=default, per_op=tuple(sorted(per_op.items())))


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Configuration of the fusewright passes. Immutable; build variants with :meth:`replace`.

    Attributes:
        fuse_norm_quant: rewrite RMSNorm -> quantization into one fused op.
        fuse_act_quant: rewrite the dynamic quantization of an activation (silu(x) * up,
            or one already in memory) into one fused op that reads it once.
        eliminate_noop_casts: remove dtype conversions that cannot change a value.
        rewrite_rope: rewrite strided RoPE writebacks.
        lowering: `auto` (choose by measurement), `triton` or `aten`; or a mapping
            with `default` and per-op priority lists (`{"rope": "triton,aten"}`).
        numerics: `exact` reproduces every rounding of the matched spelling; `fast`
            may skip intermediate bf16 roundings (see docs/numerics.md).
        verify: after each pass, run the graph before and after on random sample
            inputs and compare; a mismatch undoes the pass (raises when strict).
        strict: re-raise pass failures instead of warning and leaving the graph as is.
        dump_dir: if set, write each graph before and after every pass there.
        deopaque: custom op name -> semantic op (`{"_C::rms_norm": "rms_norm"}`): those
            opaque ops are replaced by a decomposable implementation (docs/lowering.md).
            The de-opaquing pass runs only when this mapping is not empty.
    """

    fuse_norm_quant: bool = True
    fuse_act_quant: bool = True
    eliminate_noop_casts: bool = True
    rewrite_rope: bool = True
    lowering: LoweringConfig = LoweringConfig()
    numerics: str = "exact"
    verify: bool = False
    strict: bool = False
    dump_dir: str | None = None
    deopaque: tuple[tuple[str, str], ...] = ()

    # ----------------------------------------------------------------- building
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "PassConfig | None" = None) -> "PassConfig":
        """Build from a (possibly nested) mapping; keys not given keep `base`'s values."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"fusewright config must be a mapping of keys to values, got {type(data).__name__}: {data!r}"
            )
        base = base or cls()
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in cls.keys():
                raise ConfigError(
                    f"unknown config key '{key}' (value {value!r}); accepted keys: "
                    f"{', '.join(cls.keys())}{_suggest(str(key), cls.keys())}"
                )
            values[key] = cls._parse_value(key, value, base)
        return dataclasses.replace(base, **values)

    @classmethod
    def _parse_value(cls, key: str, value: Any, base: "PassConfig") -> Any:
        if key in ("fuse_norm_quant", "fuse_act_quant", "eliminate_noop_casts", "rewrite_rope", "verify", "strict"):
            return _parse_bool(key, value)
        if key == "numerics":
            return _parse_choice(key, value, NUMERICS_CHOICES)
        if key == "lowering":
            if isinstance(value, Mapping):
                # Nested keys update the current lowering config rather than resetting it.
                merged = base.lowering.to_dict()
                merged.update(value)
                value = merged
            return LoweringConfig.from_value(value)
        if key == "deopaque":
            # Like `lowering`, nested keys update the mapping rather than resetting it.
            return _parse_deopaque(value, base.deopaque)
        if key == "dump_dir":
            if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
                return None
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
            raise ConfigError(f"config key 'dump_dir': got {value!r}; accepted: a directory path or null")
        raise AssertionError(key)  # keys() and this function must list the same keys

    @classmethod
    def from_json(cls, text: str, base: "PassConfig | None" = None) -> "PassConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--compilation-config is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}; "
                'accepted: a JSON object such as \'{"fuse_norm_quant": false}\''
            ) from None
        return cls.from_dict(data, base)

    @classmethod
    def from_dotted(cls, items: Iterable[str], base: "PassConfig | None" = None) -> "PassConfig":
        """Build from `key=value` items with dotted nested keys (`lowering.rope=aten`)."""
        nested: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"config flag {item!r} has no '=': accepted form is -cc.KEY=VALUE, "
                    "e.g. -cc.fuse_norm_quant=false or -cc.lowering.rope=aten"
                )
            parts = key.split(".")
            cursor = nested
            for part in parts[:-1]:
                cursor = cursor.setdefault(part, {})
                if not isinstance(cursor, dict):
                    raise ConfigError(f"config flag {item!r}: '{part}' is not a nested section")
            cursor[parts[-1]] = value
        return cls.from_dict(nested, base)

    @classmethod
    def from_cli(cls, argv: Iterable[str], base: "PassConfig | None" = None) -> "PassConfig":
        config, rest = split_cli_config(argv, base)
        if rest:
            raise ConfigError(f"unrecognised config arguments: {' '.join(rest)}")
        return config

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PassConfig":
        """The config in `FUSEWRIGHT_CONFIG`: a JSON object, or `key=value` items split by commas."""
        text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
        if not text:
            return cls()
        try:
            if text.startswith("{"):
                return cls.from_json(text)
            return cls.from_dotted(item.strip() for item in text.split(",") if item.strip())
        except ConfigError as exc:
            raise ConfigError(f"in environment variable {ENV_VAR}: {exc}") from None

    @classmethod
    def resolve(cls, config: "PassConfig | Mapping[str, Any] | str | None" = None) -> "PassConfig":
        """The effective config: the environment's, overridden by what is given explicitly.

        A `PassConfig` instance is taken as complete and used as is; a dict or a JSON
        string updates the environment's config key by key.
        """
        if isinstance(config, PassConfig):
            return config
        base = cls.from_env()
        if config is None:
            return base
        if isinstance(config, str):
            return cls.from_json(config, base)
        return cls.from_dict(config, base)

    def replace(self, **changes: Any) -> "PassConfig":
        return self.from_dict(changes, self)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lowering"] = self.lowering.to_dict()
        out["deopaque"] = dict(self.deopaque)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        """Stable across processes and Python versions (unlike `hash()`)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def pass_enabled(self, name: str) -> bool:
        """A built-in pass runs when its flag is true; a pass with no flag of its own always runs."""
        return bool(getattr(self, name)) if name in self.keys() else True


def split_cli_config(
    argv: Iterable[str], base: PassConfig | None = None
) -> tuple[PassConfig, list[str]]:
    """Take the config arguments out of a command line; return the config and the rest.

    Accepted: `--compilation-config JSON`, `--compilation-config=JSON`, `-cc JSON`,
    `-cc.KEY=VALUE` (nested keys with dots). Later arguments override earlier ones.
    """
    argv = list(argv)
    rest: list[str] = []
    config = PassConfig.resolve(None) if base is None else base
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--compilation-config", "-cc"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a JSON object after it, e.g. {arg} '{{\"numerics\": \"fast\"}}'")
            config = PassConfig.from_json(argv[i + 1], config)
            i += 2
            continue
        if arg.startswith("--compilation-config="):
            config = PassConfig.from_json(arg.split("=", 1)[1], config)
        elif arg.startswith("-cc."):
            config = PassConfig.from_dotted([arg[len("-cc."):]], config)
        else:
            rest.append(arg)
        i += 1
    return config, rest

"""The built-in passes, in the order they run."""

from __future__ import annotations

import importlib

from .base import GraphPass

# Modules that define a `PASS` attribute (a GraphPass instance). Imported lazily so
# that `import fusewright` stays cheap.
BUILTIN_PASS_MODULES: tuple[str, ...] = ("fusewright.passes.deopaque", "fusewright.passes.norm_quant", "fusewright.passes.act_quant", "fusewright.passes.rope", "fusewright.passes.noop_casts")


def builtin_passes() -> list[GraphPass]:
    passes = [importlib.import_module(name).PASS for name in BUILTIN_PASS_MODULES]
    return sorted(passes, key=lambda p: p.order)

"""The pass manager: the object Inductor calls with each captured graph.

It is an Inductor `CustomGraphPass`, so Inductor's FX graph cache keys compiled
graphs by its `uuid()`: the package version, the stage, the config hash and the
source of every enabled pass (and of the manager itself), plus the uuid of a pass
the user had already installed on the same hook, which it chains rather than
replaces.

Safety: the graph is snapshotted once before the passes run. If a pass raises, leaves
a graph that does not lint, or (with `verify`) changes the outputs, the graph is put
back exactly as it was before that pass (the snapshot, replayed through the passes that
succeeded) and one `FusewrightWarning` names the pass, the error and the model source
line involved; with `strict` the error propagates instead.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .base import GraphPass, PassContext, Stage
from ..lowering.registry import uuid as lowering_uuid
from .config import PassConfig
from .graph_utils import restore, snapshot, source_line
from .registry import builtin_passes
from .report import PassStats, Report, log, record_graph
from .verify import VerificationError, verify_rewrite

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_CORE_FILES = ("base.py", "manager.py", "graph_utils.py", "verify.py", "config.py")


class FusewrightWarning(UserWarning):
    """A fusewright pass hit something unexpected and left the graph unchanged."""


def _package_version() -> str:
    from .. import __version__

    return __version__


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FusewrightPassManager(CustomGraphPass):
    """Runs the enabled fusewright passes of one Inductor stage on a graph."""

    def __init__(
        self,
        config: PassConfig | dict | str | None = None,
        stage: Stage = "post_grad_post",
        chained: Callable[[fx.Graph], None] | None = None,
        passes: Sequence[GraphPass] | None = None,
    ) -> None:
        self.config = PassConfig.resolve(config)
        self.stage = stage
        # Installing fusewright twice must not run its passes twice: take over the
        # pass the earlier manager had chained instead of chaining that manager.
        if isinstance(chained, FusewrightPassManager):
            chained = chained.chained
        self.chained = chained
        candidates = builtin_passes() if passes is None else list(passes)
        self.passes = sorted(
            (p for p in candidates if p.stage == stage and self.config.pass_enabled(p.name)),
            key=lambda p: p.order,
        )

    # ------------------------------------------------------------ cache key
    def uuid(self) -> str | None:
        chained_uuid: Any = ""
        if self.chained is not None:
            # Duck-typed rather than isinstance(CustomPassBase), which torch 2.11 lacks.
            chained_key = getattr(self.chained, "uuid", None)
            if not callable(chained_key):
                # A plain callable has no cache key: returning None makes Inductor bypass
                # its FX graph cache, the only safe choice.
                return None
            chained_uuid = chained_key()
            if chained_uuid is None:
                return None
        hasher = hashlib.sha256()
        files = {str(_PACKAGE_ROOT / "passes" / name) for name in _CORE_FILES}
        for graph_pass in self.passes:
            hasher.update(f"pass:{graph_pass.name}:{type(graph_pass).__qualname__}\n".encode())
            files.update(graph_pass.source_files())
        for path in sorted(files):
            # Key by path relative to the package so two checkouts of the same source agree.
            try:
                name = str(Path(path).resolve().relative_to(_PACKAGE_ROOT))
            except ValueError:
                name = os.path.basename(path)
            hasher.update(f"{name}:{_file_digest(path)}\n".encode())
        hasher.update(f"version:{_package_version()}\nstage:{self.stage}\n".encode())
        hasher.update(f"config:{self.config.hash()}\nchained:{chained_uuid!r}\n".encode())
        # What each semantic op may be lowered to (lowering/registry.py, user implementations included).
        hasher.update(f"lowering:{lowering_uuid()}\n".encode())
        return hasher.hexdigest()

    # ------------------------------------------------------------ running
    def __call__(self, graph: fx.Graph) -> None:
        if self.chained is not None:
            self.chained(graph)
        report = Report()
        report.graphs = 1
        start = time.perf_counter()
        # One snapshot for all the passes: a failing pass is undone by restoring it and
        # replaying the passes that succeeded before it (they are deterministic). Copying
        # the graph before every pass instead costs ~40 us a node each time, and failures
        # are rare.
        saved = snapshot(graph) if self.passes else None
        report.overhead_seconds = time.perf_counter() - start
        done: list[GraphPass] = []
        for graph_pass in self.passes:
            if self._run_pass(graph_pass, graph, report.stats(graph_pass.name), saved, done):
                done.append(graph_pass)
        record_graph(report)

    def _undo(self, graph: fx.Graph, saved: fx.Graph, done: list[GraphPass]) -> None:
        """Put `graph` back to its state after the passes in `done`."""
        restore(graph, saved)
        for graph_pass in done:
            graph_pass.run(graph, PassContext(self.config, PassStats()))

    def _run_pass(self, graph_pass: GraphPass, graph: fx.Graph, stats: PassStats, saved: fx.Graph,
                  done: list[GraphPass]) -> bool:
        """Run one pass; on failure undo it and warn (or raise, when strict). True if it stands."""
        local = PassStats()
        ctx = PassContext(self.config, local)
        start = time.perf_counter()
        before = snapshot(graph) if self.config.verify else None
        self._dump(graph, graph_pass, "before")
        try:
            graph_pass.run(graph, ctx)
            graph.lint()
            if before is not None and local.rewritten:
                problem = verify_rewrite(before, graph, exact=self.config.numerics == "exact")
                if problem:
                    raise VerificationError(f"verify: {problem}")
        except Exception as exc:
            self._undo(graph, saved, done)
            where = source_line(ctx.current_node)
            message = (
                f"fusewright pass '{graph_pass.name}' failed and was undone; the graph is unchanged. "
                f"{type(exc).__name__}: {exc}" + (f" [at {where}]" if where else "")
            )
            stats.errors.append(message)
            stats.seconds += time.perf_counter() - start
            if self.config.strict:
                raise
            warnings.warn(message + " (set strict=true to raise instead)", FusewrightWarning, stacklevel=2)
            log.warning(message)
            return False
        self._dump(graph, graph_pass, "after")
        local.seconds = time.perf_counter() - start
        stats.merge(local)
        return True

    def _dump(self, graph: fx.Graph, graph_pass: GraphPass, when: str) -> None:
        if not self.config.dump_dir:
            return
        directory = Path(self.config.dump_dir)
        directory.mkdir(parents=True, exist_ok=True)
        index = len(list(directory.glob(f"*-{graph_pass.name}-{when}.txt")))
        (directory / f"{index:03d}-{graph_pass.name}-{when}.txt").write_text(str(graph))

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.passes) or "no passes"
        return f"FusewrightPassManager({self.stage}: {names})"

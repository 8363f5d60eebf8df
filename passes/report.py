"""What the passes did: per-pass counts of matched, rewritten and skipped constructs.

The pass manager records into the module-level report; `fusewright.last_report()`
returns it. The report accumulates over every graph compiled since it was last reset
(a model with graph breaks compiles several graphs), and is reset by
`fusewright.compile`, `fusewright.enabled`, `fusewright.inductor_options` and
`fusewright.reset_report()`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

log = logging.getLogger("fusewright")


@dataclasses.dataclass
class Skip:
    """A construct that was recognised but not rewritten."""

    reason: str
    source: str | None = None  # model source line, from the node's stack trace

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "source": self.source}


@dataclasses.dataclass
class PassStats:
    matched: int = 0
    rewritten: int = 0
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    # Free-form per-pass detail, e.g. {"lowering": {"triton": 2}} or variant counts.
    details: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # wall time spent in the pass (compile-time overhead)

    def merge(self, other: "PassStats") -> None:
        self.matched += other.matched
        self.rewritten += other.rewritten
        self.skipped.extend(other.skipped)
        self.errors.extend(other.errors)
        self.seconds += other.seconds
        for key, value in other.details.items():
            self.details[key] = self.details.get(key, 0) + value

    def to_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "rewritten": self.rewritten,
            "skipped": [s.to_dict() for s in self.skipped],
            "errors": list(self.errors),
            "details": dict(self.details),
            "seconds": self.seconds,
        }


class Report(dict):
    """Mapping of pass name -> :class:`PassStats`, plus the number of graphs seen."""

    def __init__(self) -> None:
        super().__init__()
        self.graphs = 0
        self.overhead_seconds = 0.0  # the manager's own time (the undo snapshot), outside any pass

    def stats(self, name: str) -> PassStats:
        return self.setdefault(name, PassStats())

    def rewrites(self) -> dict[str, int]:
        return {name: stats.rewritten for name, stats in self.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "overhead_seconds": self.overhead_seconds,
                "passes": {name: s.to_dict() for name, s in self.items()}}

    def summary(self) -> str:
        parts = [
            f"{name}: matched {s.matched}, rewritten {s.rewritten}, skipped {len(s.skipped)}"
            + (f", failed {len(s.errors)}" if s.errors else "")
            for name, s in self.items()
        ]
        return f"fusewright ({self.graphs} graph(s)): " + ("; ".join(parts) or "no passes ran")


_lock = threading.Lock()
_report = Report()


def reset_report() -> None:
    global _report
    with _lock:
        _report = Report()


def last_report() -> Report:
    """Per-pass counts over all graphs compiled since the last reset."""
    return _report


def record_graph(graph_report: Report) -> None:
    """Fold one graph's report into the module report and log it."""
    with _lock:
        _report.graphs += graph_report.graphs
        _report.overhead_seconds += graph_report.overhead_seconds
        for name, stats in graph_report.items():
            _report.stats(name).merge(stats)
    log.info(graph_report.summary())
    for name, stats in graph_report.items():
        for skip in stats.skipped:
            log.info("fusewright %s skipped: %s%s", name, skip.reason, f" ({skip.source})" if skip.source else "")

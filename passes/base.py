"""The interface every fusewright pass implements, and the context it runs in."""

from __future__ import annotations

import contextlib
import inspect
from typing import ClassVar, Iterator, Literal

import torch.fx as fx

from .config import PassConfig
from .graph_utils import source_line
from .report import PassStats, Skip

# Where a pass runs in Inductor:
#   pre_grad        torch IR before AOT autograd (config.pre_grad_custom_pass)
#   post_grad_pre   aten IR, before Inductor's own post-grad passes
#   post_grad_post  aten IR, after them: the default, and what most rewrites want
Stage = Literal["pre_grad", "post_grad_pre", "post_grad_post"]
STAGES: tuple[Stage, ...] = ("pre_grad", "post_grad_pre", "post_grad_post")


class PassContext:
    """Handed to a pass: the config, a stats recorder, and the node being worked on."""

    def __init__(self, config: PassConfig, stats: PassStats) -> None:
        self.config = config
        self.stats = stats
        self.current_node: fx.Node | None = None

    @contextlib.contextmanager
    def at(self, node: fx.Node) -> Iterator[None]:
        """Mark `node` as the one being rewritten, so a failure can name its source line."""
        previous, self.current_node = self.current_node, node
        yield
        # Not in a `finally`: on an exception the failing node stays current, so the
        # manager's warning can name its source line.
        self.current_node = previous

    def matched(self, n: int = 1) -> None:
        self.stats.matched += n

    def rewritten(self, n: int = 1, detail: str | None = None) -> None:
        self.stats.rewritten += n
        if detail:
            self.stats.details[detail] = self.stats.details.get(detail, 0) + n

    def skipped(self, reason: str, node: fx.Node | None = None) -> None:
        self.stats.skipped.append(Skip(reason, source_line(node or self.current_node)))


class GraphPass:
    """Base class of a rewrite pass.

    Subclasses set `name` (also the `PassConfig` flag that enables it), optionally
    `stage` and `order` (lower runs first; the no-op cast cleanup runs last because
    the other rewrites create casts), and implement `run`. `run` mutates the graph in
    place and reports through `ctx`; the manager handles linting, undo on failure,
    verification and the Inductor cache key.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage] = "post_grad_post"
    order: ClassVar[int] = 50

    def run(self, graph: fx.Graph, ctx: PassContext) -> None:
        raise NotImplementedError

    def source_files(self) -> list[str]:
        """Files whose content decides what this pass does: they go into the cache key.

        By default the module defining the pass class and those of its base classes
        inside fusewright; passes that delegate to `patterns/` or `lowering/` modules
        list those too (`extra_source_modules`).
        """
        files = []
        for klass in type(self).__mro__:
            if klass.__module__.startswith("fusewright") or klass is type(self):
                try:
                    files.append(inspect.getsourcefile(klass))
                except TypeError:
                    pass
        for module in getattr(self, "extra_source_modules", ()):
            files.append(inspect.getsourcefile(module))
        return sorted({f for f in files if f})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} @{self.stage}>"

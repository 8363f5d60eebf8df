"""User entry points: `inductor_options`, `enabled`, `compile`."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .base import STAGES
from .config import PassConfig
from .manager import FusewrightPassManager
from .registry import builtin_passes
from .report import reset_report

# Inductor config attribute of each stage.
STAGE_HOOKS = {
    "pre_grad": "pre_grad_custom_pass",
    "post_grad_pre": "post_grad_custom_pre_pass",
    "post_grad_post": "post_grad_custom_post_pass",
}


def inductor_options(config: PassConfig | dict | str | None = None) -> dict[str, Any]:
    """Inductor options that install fusewright: `torch.compile(m, options=inductor_options())`.

    The post-grad manager is always installed (so `last_report()` sees every graph);
    other stages only when an enabled pass needs them. A pass already installed on a
    hook in `torch._inductor.config` is chained: it runs first, then fusewright's.
    """
    from torch._inductor import config as inductor_config

    resolved = PassConfig.resolve(config)
    passes = builtin_passes()
    reset_report()
    options: dict[str, Any] = {}
    for stage in STAGES:
        manager = FusewrightPassManager(
            resolved, stage, chained=getattr(inductor_config, STAGE_HOOKS[stage]), passes=passes
        )
        if manager.passes or stage == "post_grad_post":
            options[STAGE_HOOKS[stage]] = manager
    return options


@contextlib.contextmanager
def enabled(config: PassConfig | dict | str | None = None) -> Iterator[PassConfig]:
    """Within the block, every torch.compile with the Inductor backend runs fusewright."""
    from torch._inductor import config as inductor_config

    resolved = PassConfig.resolve(config)
    with inductor_config.patch(inductor_options(resolved)):
        yield resolved


def compile(model: Any = None, config: PassConfig | dict | str | None = None, **kwargs: Any) -> Any:
    """`torch.compile` with fusewright installed. Accepts every torch.compile argument.

    `mode=` and `options=` may both be given (torch.compile itself refuses that): the
    mode's options are expanded and merged with fusewright's and the caller's.
    """
    options = dict(inductor_options(config))
    mode = kwargs.pop("mode", None)
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, kwargs.get("dynamic")), **options}
    options.update(kwargs.pop("options", None) or {})
    backend = kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise ValueError(
            f"fusewright.compile: backend {backend!r} is not supported; fusewright runs inside "
            "Inductor, so backend must be 'inductor' (the default)"
        )
    if model is None:
        return lambda m: torch.compile(m, options=options, **kwargs)
    return torch.compile(model, options=options, **kwargs)

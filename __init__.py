"""fusewright: torch.compile / Inductor graph-rewrite passes for LLM and diffusion serving.

    import fusewright
    compiled = fusewright.compile(model)                       # or:
    compiled = torch.compile(model, options=fusewright.inductor_options({"numerics": "fast"}))
    with fusewright.enabled():                                 # or:
        compiled = torch.compile(model)
    fusewright.last_report()                                   # what the passes did
"""

__version__ = "0.1.0"

# Absolute imports on purpose: this file is also the repo root's __init__.py, and pytest
# imports it as a package of its own (under the checkout's directory name, which may not
# be a valid module name), where relative imports would fail.
from fusewright.passes.api import compile, enabled, inductor_options
from fusewright.passes.config import ConfigError, PassConfig
from fusewright.passes.integrations import vllm_pass, vllm_post_grad_pass
from fusewright.passes.manager import FusewrightPassManager, FusewrightWarning
from fusewright.passes.report import last_report, reset_report

__all__ = [
    "ConfigError",
    "FusewrightPassManager",
    "FusewrightWarning",
    "PassConfig",
    "compile",
    "enabled",
    "inductor_options",
    "last_report",
    "reset_report",
    "vllm_pass",
    "vllm_post_grad_pass",
    "__version__",
]

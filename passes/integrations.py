"""Installing fusewright into serving stacks that own Inductor's pass hooks.

vLLM sets `post_grad_custom_post_pass` itself (its own pass manager) and runs the pass
named in its compilation config's `inductor_passes` after its own passes:

    vllm serve MODEL --compilation-config \
        '{"inductor_passes": {"post_grad_custom_post_pass": "fusewright.vllm_post_grad_pass"}}'

vLLM resolves that name with `__import__("fusewright").__dict__["vllm_post_grad_pass"]`,
so the object must be an attribute of the top-level package, and it wraps any object
that is not one of its own `InductorPass`es in a `CallableInductorPass` whose cache key
is the hash of the object's *class source*: the fusewright config would then not be
part of vLLM's cache key. `vllm_pass()` avoids that by registering fusewright's manager
as a virtual subclass of vLLM's `InductorPass`, so vLLM uses the manager as is and
asks it for its own `uuid()` (package version, config, pass sources).
"""

from __future__ import annotations

import sys

from .config import PassConfig
from .manager import FusewrightPassManager

_VLLM_BASE = "vllm.compilation.inductor_pass"


def register_with_vllm() -> bool:
    """Make vLLM treat fusewright's manager as one of its own passes; True if vLLM is loaded."""
    module = sys.modules.get(_VLLM_BASE)
    if module is None:
        try:
            import importlib

            module = importlib.import_module(_VLLM_BASE)
        except ImportError:
            return False
    module.InductorPass.register(FusewrightPassManager)
    return True


def vllm_pass(config: PassConfig | dict | str | None = None) -> FusewrightPassManager:
    """The fusewright manager for vLLM's `inductor_passes` (Python API form):

        from vllm.config import CompilationConfig
        CompilationConfig(inductor_passes={"post_grad_custom_post_pass": fusewright.vllm_pass()})
    """
    register_with_vllm()
    return FusewrightPassManager(config)


class _EnvConfiguredPass(FusewrightPassManager):
    """The manager behind `fusewright.vllm_post_grad_pass` (the JSON/CLI form).

    It must exist when fusewright is imported (vLLM looks the name up in the package's
    `__dict__`), but reading `FUSEWRIGHT_CONFIG` at import would turn a typo in the
    environment into an import error; so the config is read when vLLM first asks for
    the cache key or runs the pass, and a bad config then raises a clear ConfigError.
    """

    def __init__(self) -> None:  # deliberately not calling super().__init__: see above
        self._manager: FusewrightPassManager | None = None

    def resolve(self) -> FusewrightPassManager:
        if self._manager is None:
            self._manager = FusewrightPassManager(None)
        return self._manager

    def __getattr__(self, name: str):
        if name == "_manager":  # not yet set during unpickling
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def uuid(self) -> str | None:
        return self.resolve().uuid()

    def __call__(self, graph) -> None:
        self.resolve()(graph)

    def __repr__(self) -> str:
        return "fusewright.vllm_post_grad_pass (config from FUSEWRIGHT_CONFIG)"


vllm_post_grad_pass = _EnvConfiguredPass()

# vLLM imports its InductorPass before it resolves "fusewright.vllm_post_grad_pass", so
# when vLLM is what imports fusewright, the registration happens here; importing
# fusewright before vLLM needs `fusewright.vllm_pass()` (or register_with_vllm()).
if _VLLM_BASE in sys.modules:
    register_with_vllm()

"""The snippets of docs/integration.md, run as written wherever they can run here."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import fusewright

DOC = Path(__file__).resolve().parent.parent / "docs" / "integration.md"


def snippets() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    out = {}
    for block in blocks:
        first = block.splitlines()[0]
        match = re.match(r"# snippet: (\w+)", first)
        assert match, f"every python block of {DOC.name} names its snippet: {first!r}"
        out[match.group(1)] = block
    return out


def test_every_stack_has_a_snippet():
    assert set(snippets()) == {"torch_compile", "transformers", "diffusers", "torchao", "vllm"}


def test_torch_compile_snippet():
    exec(snippets()["torch_compile"], {})
    assert fusewright.last_report().graphs == 1


@pytest.mark.models
def test_transformers_snippet():
    pytest.importorskip("transformers")
    exec(snippets()["transformers"], {})
    assert fusewright.last_report().graphs >= 1


@pytest.mark.models
@pytest.mark.slow
def test_diffusers_snippet():
    pytest.importorskip("diffusers")
    exec(snippets()["diffusers"], {})
    report = fusewright.last_report()
    assert report.graphs >= 1


@pytest.mark.gpu
def test_torchao_snippet():
    pytest.importorskip("torchao")
    exec(snippets()["torchao"], {})


# ------------------------------------------------------------------ vLLM
class _StandInVllm:
    """What vLLM's config code does with `inductor_passes`, reduced to the behaviour
    fusewright relies on: resolve a qualified name with `__import__(module).__dict__`,
    use its own InductorPass instances as they are, wrap anything else in a
    CallableInductorPass keyed by the hash of the object's class source."""

    def __init__(self):
        self.module = types.ModuleType("vllm.compilation.inductor_pass")

        class InductorPass(CustomGraphPass):
            pass

        class CallableInductorPass(InductorPass):
            def __init__(self, fn):
                self.fn = fn

            def __call__(self, graph):
                self.fn(graph)

            def uuid(self):
                return "hash-of-class-source"

        self.module.InductorPass = InductorPass
        self.module.CallableInductorPass = CallableInductorPass

    def install(self, monkeypatch):
        vllm = types.ModuleType("vllm")
        config = types.ModuleType("vllm.config")
        stand_in = self

        class CompilationConfig:
            def __init__(self, inductor_passes):
                self.inductor_compile_config = {}
                for key, value in inductor_passes.items():
                    if isinstance(value, str):
                        names = value.split(".")
                        value = __import__(".".join(names[:-1])).__dict__[names[-1]]
                    base = stand_in.module
                    self.inductor_compile_config[key] = (
                        value if isinstance(value, base.InductorPass) else base.CallableInductorPass(value)
                    )

        config.CompilationConfig = CompilationConfig
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, "vllm.config", config)
        monkeypatch.setitem(sys.modules, "vllm.compilation", types.ModuleType("vllm.compilation"))
        monkeypatch.setitem(sys.modules, "vllm.compilation.inductor_pass", self.module)
        return CompilationConfig


def test_vllm_python_snippet_keeps_fusewrights_cache_key(monkeypatch):
    _StandInVllm().install(monkeypatch)
    namespace = {}
    exec(snippets()["vllm"], namespace)
    installed = namespace["compilation_config"].inductor_compile_config["post_grad_custom_post_pass"]
    assert isinstance(installed, fusewright.FusewrightPassManager)  # used as is, not wrapped
    assert installed.uuid() == fusewright.FusewrightPassManager({"numerics": "exact"}).uuid()


def test_vllm_qualified_name_form(monkeypatch):
    CompilationConfig = _StandInVllm().install(monkeypatch)
    fusewright.passes.integrations.register_with_vllm()  # what importing fusewright after vLLM does
    monkeypatch.setenv("FUSEWRIGHT_CONFIG", '{"numerics": "fast"}')
    fusewright.vllm_post_grad_pass._manager = None
    config = CompilationConfig({"post_grad_custom_post_pass": "fusewright.vllm_post_grad_pass"})
    installed = config.inductor_compile_config["post_grad_custom_post_pass"]
    assert installed is fusewright.vllm_post_grad_pass
    assert installed.uuid() == fusewright.FusewrightPassManager({"numerics": "fast"}).uuid()
    assert installed.config.numerics == "fast"
    fusewright.vllm_post_grad_pass._manager = None


def test_env_configured_pass_reports_bad_config_on_use_not_import(monkeypatch):
    monkeypatch.setenv("FUSEWRIGHT_CONFIG", '{"numerix": "fast"}')
    fusewright.vllm_post_grad_pass._manager = None
    with pytest.raises(fusewright.ConfigError, match="did you mean 'numerics'"):
        fusewright.vllm_post_grad_pass.uuid()
    fusewright.vllm_post_grad_pass._manager = None

"""Entry points: inductor_options, enabled, compile, the CLI and the embedded example."""

import json
import subprocess
import sys

import pytest
import torch

import fusewright
from fusewright import FusewrightPassManager
from fusewright.tools.cli import main

pytestmark = pytest.mark.usefixtures("no_env_config")


def fn(x):
    return torch.relu(x * 2) + 1


def test_inductor_options_installs_the_post_grad_manager():
    options = fusewright.inductor_options({"numerics": "fast"})
    manager = options["post_grad_custom_post_pass"]
    assert isinstance(manager, FusewrightPassManager)
    assert manager.stage == "post_grad_post" and manager.config.numerics == "fast"


def test_enabled_patches_and_restores_inductor_config():
    from torch._inductor import config as inductor_config

    assert inductor_config.post_grad_custom_post_pass is None
    with fusewright.enabled({"verify": True}) as config:
        assert config.verify is True
        assert isinstance(inductor_config.post_grad_custom_post_pass, FusewrightPassManager)
        fusewright.reset_report()
        torch.compile(fn)(torch.randn(8))
        assert fusewright.last_report().graphs == 1
    assert inductor_config.post_grad_custom_post_pass is None


def test_compile_runs_the_manager_and_matches_eager():
    x = torch.randn(16)
    compiled = fusewright.compile(fn, config={"numerics": "exact"})
    torch.testing.assert_close(compiled(x), fn(x), rtol=0, atol=0)
    assert fusewright.last_report().graphs == 1


def test_compile_accepts_mode_and_options_together():
    compiled = fusewright.compile(fn, mode="reduce-overhead", options={"trace.enabled": False})
    x = torch.randn(16)
    torch.testing.assert_close(compiled(x), fn(x))
    assert fusewright.last_report().graphs == 1


def test_compile_as_decorator_and_bad_backend():
    decorated = fusewright.compile(config={})(fn)
    x = torch.randn(4)
    torch.testing.assert_close(decorated(x), fn(x))
    with pytest.raises(ValueError, match="backend 'eager' is not supported"):
        fusewright.compile(fn, backend="eager")


def test_cli_bad_config_exits_2(capsys):
    assert main(["graph-diff", "-cc.numerics=exakt"]) == 2
    err = capsys.readouterr().err
    assert "config key 'numerics'" in err and "did you mean 'exact'?" in err


@pytest.mark.slow
def test_embedded_example_end_to_end_on_cpu(tmp_path):
    """`fusewright graph-diff` with no target: both compiles, a kernel table, rewrite counts."""
    out = tmp_path / "report.json"
    assert main(["graph-diff", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for side in ("before", "after"):
        assert report[side]["kernel_count"] == len(report[side]["kernels"]) > 0
        for kernel in report[side]["kernels"]:
            assert {"name", "kind", "is_noop"} <= set(kernel)
    # The embedded example holds one of each construct, and every pass fires on it.
    assert report["rewrites"] == {"fuse_norm_quant": 1, "rewrite_rope": 1, "eliminate_noop_casts": 1,
                                 # its one quant follows an RMSNorm: the act-quant pass declines it
                                 "fuse_act_quant": 0}
    assert report["numerics"]["ok"] is True and report["numerics"]["max_abs_diff"] == 0
    # What norm->quant was lowered to, and why, is in the report graph-diff prints.
    (detail,) = report["passes"]["passes"]["fuse_norm_quant"]["details"]
    assert " -> aten (auto: " in detail


@pytest.mark.parametrize("module", ["fusewright", "fusewright.tools.cli"])
def test_python_dash_m_entry_point(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "graph-diff" in result.stdout

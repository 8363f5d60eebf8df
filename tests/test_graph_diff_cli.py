"""`fusewright graph-diff` end to end: live mode on a target file (one live diff, 2 compiles),
offline and single-file modes on the H100 fixtures, exit codes, bad input, the pictures,
the CLI dispatcher, and one subprocess run of the installed console script."""

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fusewright.tools.cli import SUBCOMMANDS, main

pytestmark = pytest.mark.usefixtures("no_env_config")

FIXTURES = Path(__file__).parent / "fixtures"
TRITON = FIXTURES / "triton"
TARGET = f"{FIXTURES / 'targets' / 'roundtrip.py'}:factory"


def test_live_target_with_expectations_and_every_output(tmp_path, capsys):
    out = {ext: tmp_path / f"report.{ext}" for ext in ("json", "svg", "html")}
    rc = main(["graph-diff", TARGET, "--device", "cpu", "-cc.fuse_norm_quant=false",
               "--json", str(out["json"]), "--svg", str(out["svg"]), "--html", str(out["html"]),
               "--expect-no-noop", "--expect-fewer-kernels", "--expect-rewrites", "eliminate_noop_casts=1",
               "--expect-close"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "kernels: 4 -> 3 (-1)" in printed.out and "no-op kernels: 1 -> 0" in printed.out
    assert "eliminate_noop_casts" in printed.out and "bitwise equal" in printed.out
    report = json.loads(out["json"].read_text())
    assert {"before", "after", "rewrites", "numerics"} <= set(report)
    assert report["before"]["noop_kernel_count"] == 1 and report["after"]["noop_kernel_count"] == 0
    assert report["config"]["fuse_norm_quant"] is False
    svg = ET.parse(out["svg"]).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    classes = [g.get("class") for g in svg.iter(f"{ns}g") if g.get("class")]
    assert "node removed" in classes and "node added" in classes and "node unchanged" in classes
    html = out["html"].read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html and "roundtrip.py" in html


def test_offline_diff_and_single_file(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["graph-diff", str(TRITON / "roundtrip_view_into_opaque.py"), str(TRITON / "cast_then_compute.py"),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "offline" and report["kernel_diff"]["removed"] == 1
    svg, html = tmp_path / "single.svg", tmp_path / "single.html"
    assert main(["graph-diff", str(TRITON / "debug"), "--svg", str(svg), "--html", str(html)]) == 0
    assert "4 kernel(s) in 2 graph(s); 1 no-op" in capsys.readouterr().out.replace("\n", " ")
    assert ET.parse(svg).getroot().tag.endswith("svg") and "triton_poi_fused__to_copy_view_0" in html.read_text()


def test_show_prints_kernel_sources(capsys):
    assert main(["graph-diff", str(TRITON / "roundtrip_view_into_opaque.py"), "--show", "*noop",
                 "--show", "no_such_kernel"]) == 0
    out = capsys.readouterr().out
    assert "tl.store(in_out_ptr0 + (x0), tmp2, None)" in out and "--show no_such_kernel: no such kernel" in out


@pytest.mark.parametrize("argv, message", [
    ([str(TRITON / "identity_clone.py"), "--expect-no-noop"],
     "--expect-no-noop: 1 no-op kernel(s) remain: triton_poi_fused_clone_0"),
    ([str(TRITON / "identity_clone.py"), str(TRITON / "same_dtype_copy.py"), "--expect-fewer-kernels"],
     "--expect-fewer-kernels: kernels 1 -> 1, not fewer"),
])
def test_unmet_expectations_exit_1(argv, message, capsys):
    assert main(["graph-diff", *argv]) == 1
    assert f"expectation unmet: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["missing.py", "other.py"], "missing.py: no such file or directory"),
    ([str(FIXTURES / "targets" / "roundtrip.py")], "not Inductor output code"),
    (["a", "b", "c"], "expected TARGET, BEFORE AFTER, or CODE; got 3 arguments"),
    (["no_such_pkg.mod:factory"], "cannot import no_such_pkg.mod"),
    ([f"{FIXTURES / 'targets' / 'roundtrip.py'}:wrong_return"], "must return (model_or_fn, example_inputs)"),
    ([f"{FIXTURES / 'targets' / 'roundtrip.py'}:fails_to_compile", "--device", "cpu"],
     "compiling with stock Inductor failed: RuntimeError: boom while tracing"),
    ([str(TRITON / "identity_clone.py"), "--expect-rewrites", "eliminate_noop_casts=1"], "needs live mode"),
    (["--expect-rewrites", "eliminate_noop_casts"], "wants PASS=N"),
    (["--expect-rewrites", "fuse_norm_qaunt=1"], "unknown pass 'fuse_norm_qaunt'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["graph-diff", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(capsys):
    assert main(["graph-diff", "missing.py", "other.py", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unwritable_output_is_exit_2(tmp_path, capsys):
    assert main(["graph-diff", str(TRITON / "identity_clone.py"), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_dispatcher_and_bench_registry(capsys):
    assert set(SUBCOMMANDS) >= {"graph-diff", "bench"}
    assert main(["--help"]) == 0
    assert "graph-diff" in capsys.readouterr().out
    from fusewright.tools.bench import BENCHMARKS

    assert {"norm-quant", "rope", "noop-casts"} <= set(BENCHMARKS)
    assert main(["bench", "--list"]) == 0
    assert main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark 'no-such-bench'" in capsys.readouterr().err


def test_console_script_offline(tmp_path):
    script = shutil.which("fusewright") or str(Path(sys.executable).parent / "fusewright")
    if not Path(script).exists():
        pytest.skip("fusewright console script not installed")
    out = tmp_path / "r.json"
    result = subprocess.run([script, "graph-diff", str(TRITON / "graph_break_output_code.log"),
                             str(TRITON / "debug"), "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["kernel_diff"]["unchanged"] == report["before"]["kernel_count"] == 4

"""`fusewright bench tp` on CPU: two gloo processes under torchrun, tiny shapes.

Covers the benchmark's logic (compiles per token count, kernel roles read from the output
code, outputs compared, per-rank output code dumped for graph-diff) without a GPU. The
timings of a CPU run are not measurements and are not checked.
"""

import json
import os
import subprocess
import sys

import pytest

from fusewright.tools.bench_tp import kernel_counts
from fusewright.tools.output_code import parse_output_code


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_tp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fusewright", "bench", "tp", "--device", "cpu", "--tiny", "--prefill", "32", "--decode", "1",
           "--reps", "1", "--decode-calls", "1", "--json", str(out / "tp.json"), "--dump-dir", str(out / "code")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "tp.json").read_text()), proc.stdout


def test_every_rank_reports_both_variants(bench_run):
    _, result, stdout = bench_run
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["shapes"] == {"hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256}
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    for rank in result["ranks"]:
        assert [(row["phase"], row["T"]) for row in rank["rows"]] == [("prefill", 32), ("decode", 1)]
        for row in rank["rows"]:
            assert row["rewrites"] == {"fuse_norm_quant": 2, "eliminate_noop_casts": 1, "rewrite_rope": 0,
                                      # silu(gate)*up -> FP8 matches; on CPU auto keeps the graph
                                      "fuse_act_quant": 0}
            assert row["bitwise_equal"] and row["max_abs_plugin_vs_stock"] == 0.0
            assert row["stock_rerun_bitwise"] and row["max_abs_stock_rerun"] == 0.0
            # a rank's output vs the single-process layer: FP8 of partial activations, a few steps apart
            assert row["max_abs_vs_single_process"] <= 0.1 * row["reference_absmax"]
            stock, plugin = row["stock_kernels"], row["plugin_kernels"]
            assert len(stock["noop"]) == 1 and plugin["noop"] == []  # the round trip on the all-reduced value
            assert stock["generated"] - plugin["generated"] == 1
            assert stock["collective"] == plugin["collective"] == ["_c10d_functional.all_reduce_",
                                                                  "_c10d_functional.wait_tensor"] * 2
            assert plugin["norm_quant_fused"] == plugin["norm"] == 2
            assert set(row["times"]) == {"stock", "plugin"} and row["timer"].startswith("cpu_wall")
    summary = result["summary"]
    assert summary["bitwise_equal_everywhere"] and summary["noop_gone_everywhere"]
    assert summary["noop_in_stock_everywhere"] and summary["norm_quant_fused_everywhere"]
    assert "rank phase" in stdout  # rank 0's table
    assert not list(bench_run[0].glob("*.partial.json"))  # replaced by the gathered result


def test_dumped_code_gives_one_graph_diff_per_rank(bench_run):
    from fusewright.tools.graph_diff import offline_diff

    out, _, _ = bench_run
    report = offline_diff(str(out / "code" / "stock"), str(out / "code" / "plugin"))
    assert list(report.rank_reports) == ["0", "1"]
    for sub in report.rank_reports.values():
        assert len(sub.before.codes) == 2  # T=1 and T=32
        assert sum(k.is_noop for k in sub.before.kernels) == 2 and not any(k.is_noop for k in sub.after.kernels)
    c = report.collectives()
    assert c["ok"] and c["before_count"] == c["after_count"] == c["unchanged"] == 16


def test_kernel_roles_on_triton_code():
    """Roles read from Triton bodies: the stock norm+quant reduction and fusewright's op."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_graph_diff_tp", Path(__file__).with_name("test_graph_diff_tp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the same synthetic output code as the graph-diff TP tests
    code = module.triton_code()
    counts = kernel_counts(parse_output_code(code).kernels)
    assert counts["noop"] == ["triton_poi_fused__to_copy_view_0"] and counts["triton"] == 2
    assert counts["collective"].count("_c10d_functional.wait_tensor") == 2
    assert counts["norm"] == counts["quant"] == counts["norm_quant_fused"] == 0
    fused = code.replace("buf2 = torch.ops.fw.opaque.default(buf1)",
                         "buf2 = torch.ops.fusewright.rms_norm_quant.default(buf1, arg1_1, None, None, 'spec')")
    counts = kernel_counts(parse_output_code(fused).kernels)
    assert counts["norm_quant_fused"] == counts["norm"] == 1 and counts["fusewright_ops"] == [
        "fusewright.rms_norm_quant"]

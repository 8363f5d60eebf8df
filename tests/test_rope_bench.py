"""`fusewright bench rope` runs end to end on CPU (a smoke test: it measures nothing we assert on)."""

import json

from fusewright.lowering import registry
from fusewright.tools import bench_rope


def test_bench_rope_cpu_rows_and_auto_table(tmp_path):
    out, table = tmp_path / "rows.json", tmp_path / "table.json"
    rc = bench_rope.main(["--device", "cpu", "--seq", "8", "--heads", "2", "--head-dim", "16", "--reps", "1",
                          "--json", str(out), "--table", str(table)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["inductor_strided", "inductor_stack", "fw_aten"]
    # the bench's own spellings agree bitwise with eager on CPU, and the rewrite fired
    assert all(r["ulp_vs_eager"] == 0 for r in rows)
    ((detail, count),) = rows[2]["rope_rewrites"].items()
    assert count == 2 and registry.parse_detail(detail)["impl"] == "aten" and detail.startswith("strided writeback")
    (entry,) = json.loads(table.read_text())["cpu"]
    assert entry["elements"] == 8 * 2 * 16 and entry["best"] in ("none", "aten")
    assert set(entry["us"]) == {"none", "aten"}


def test_min_bytes_counts_q_k_in_and_out_plus_half_tables():
    assert bench_rope.min_bytes(75600, 40, 128) == 4 * 75600 * 40 * 128 * 2 + 2 * 75600 * 64 * 4

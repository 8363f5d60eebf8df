"""CPU checks of `fusewright bench norm-quant`'s arguments (the timings need a GPU)."""

import argparse
import json

import pytest

from fusewright.tools import bench_norm_quant as bnq


def _args(*argv):
    p = argparse.ArgumentParser()
    bnq.add_arguments(p)
    return p.parse_args(list(argv))


def test_sweep_rejects_unknown_family_and_size_before_touching_a_device(capsys):
    assert bnq.main(_args("--sweep", "--families", "token,tokn")) == 2
    err = capsys.readouterr().err
    assert "tokn" in err and "local+col" in err
    assert bnq.main(_args("--sweep", "--sweep-sizes", "mid,huge")) == 2
    assert "huge" in capsys.readouterr().err


def test_flush_modes_and_defaults():
    assert _args().flush == "read"
    assert _args("--flush", "write").flush == "write"
    with pytest.raises(SystemExit):
        _args("--flush", "none")
    assert set(bnq.SWEEP_AT) == set(bnq.SWEEP_SIZES) == set(_args().sweep_sizes.split(","))


def test_every_sweep_family_names_a_variant_of_that_family():
    from fusewright.lowering.norm_quant_plan import tuning_key

    vs = bnq.variants()
    for fam, name in bnq.SWEEP_FAMILIES.items():
        assert tuning_key(vs[name], 4096, 4096).split("/")[0] == fam


def test_write_choice_merges_a_bench_run_into_an_existing_table(tmp_path):
    import json

    dev = "Some GPU"
    old = {"about": "x", "rows": [
        dict(device=dev, family="token", variant="token", T=4096, H=4096, triton_us=25.0, inductor_us=30.0,
             timer="l2_flushed", torch="2.11", triton="3.6", date="old"),
        dict(device=dev, family="static", variant="static", T=4096, H=4096, triton_us=20.0, inductor_us=22.0,
             timer="l2_flushed", torch="2.11", triton="3.6", date="old")]}
    run = {"environment": dict(device=dev, torch="2.11", triton="3.6", date="new"), "rows": [
        dict(variant="token", T=4096, H=4096, timer="l2_flushed", triton_us=21.0, inductor_us=33.0),
        dict(variant="token", T=16, H=4096, timer="cuda_graph", triton_us=2.0),  # no Inductor time: skipped
        dict(variant="group128", T=4096, H=4096, timer="l2_flushed", triton_us=21.0, inductor_us=35.0)]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "run.json").write_text(json.dumps(run))
    out = tmp_path / "auto.json"
    assert bnq.write_choice([str(tmp_path / "old.json"), str(tmp_path / "run.json")], str(out)) == 0
    rows = {(r["variant"], r["T"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("token", 4096), ("static", 4096), ("group128", 4096)}
    assert rows[("token", 4096)]["triton_us"] == 21.0 and rows[("token", 4096)]["date"] == "new"  # later file wins
    assert rows[("static", 4096)]["date"] == "old"  # kept
    assert rows[("group128", 4096)]["family"] == "group128"


def test_sweep_writes_into_an_existing_table_and_keeps_what_it_did_not_measure(tmp_path, monkeypatch):
    """A sweep merges its winners into the table it is given: other entries, the table's
    "about" and earlier runs' keys stay (session 12's first sweep replaced the shipped
    "about" with the generic one and dropped "environment_session2")."""
    def fake_bench_one(timer, bw, name, spec, T, H, cfg, inductor=True):  # CH 2048 wins everywhere
        return dict(variant=name, T=T, H=H, timer="l2_flushed", triton_us=10.0 if cfg.get("CH") == 2048 else 20.0,
                    triton_pct_of_limit=50.0, plan=dict(cfg))

    monkeypatch.setattr(bnq, "bench_one", fake_bench_one)
    monkeypatch.setattr(bnq, "programs_that_fit", lambda spec, T, H, cfg: 3)
    path = tmp_path / "tuning.json"
    kept = {"CH": 512, "num_warps": 2, "ROWS": 1, "source": "earlier"}
    path.write_text(json.dumps({"about": "the shipped table", "environment_session2": {"date": "old"},
                                "environment": {"date": "older"}, "configs": {"token/4096/large": kept}}))
    env = {"date": "now", "l2_flush": "read"}
    bnq.sweep(None, 1.0, ["local+col"], str(path), env, hidden=[4096], sizes=("mid",))
    doc = json.loads(path.read_text())
    assert doc["about"] == "the shipped table" and doc["environment_session2"] == {"date": "old"}
    assert doc["environment"] == env
    assert doc["configs"]["token/4096/large"] == kept
    won = doc["configs"]["local+col/4096/mid"]
    assert won["CH"] == 2048 and won["us"] == 10.0 and won["run"] == "now" and won["measured_at"] == "T=4096"
    # a new table gets the generic description; a file that is not a table is named
    bnq.sweep(None, 1.0, ["local+col"], str(tmp_path / "new.json"), env, hidden=[4096], sizes=("mid",))
    assert "--sweep" in json.loads((tmp_path / "new.json").read_text())["about"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: not a tuning table"):
        bnq.sweep(None, 1.0, ["local+col"], str(tmp_path / "bad.json"), env, hidden=[4096], sizes=("mid",))


def test_flush_l2_reads_or_writes_and_names_bad_modes():
    import torch

    from fusewright.tools.cuda_graph import flush_l2

    buf = torch.full((1024,), 7, dtype=torch.uint8)
    flush_l2(buf)  # read: the buffer is left as it was
    assert int(buf.sum()) == 7 * 1024
    flush_l2(buf, "write")
    assert int(buf.sum()) == 0
    with pytest.raises(ValueError, match=r"one of \('read', 'write'\)"):
        flush_l2(buf, "both")


def test_sweep_shapes_and_their_plans():
    """The shapes a sweep times, in order, and plans that `plan` accepts ("fit" programs per SM
    is resolved on the GPU; 1 stands in for it here)."""
    from fusewright.lowering.norm_quant_plan import plan

    shapes = list(bnq.sweep_shapes(["token", "local+col"], ("mid", "small")))
    assert [(f, v, size, T, H) for f, v, size, T, H, _ in shapes] == [
        ("token", "token", "mid", 4096, 4096), ("token", "token", "mid", 4096, 5120),
        ("token", "token", "mid", 4096, 7168), ("token", "token", "mid", 4096, 8192),
        ("token", "token", "small", 64, 4096), ("token", "token", "small", 64, 7168),
        ("local+col", "group64_col", "mid", 4096, 4096), ("local+col", "group64_col", "mid", 4096, 5120),
        ("local+col", "group64_col", "mid", 4096, 7168), ("local+col", "group64_col", "mid", 4096, 8192),
        ("local+col", "group64_col", "small", 64, 4096), ("local+col", "group64_col", "small", 64, 7168)]
    assert [H for *_, H, _ in bnq.sweep_shapes(["token"], ("large",), [1536])] == [1536]
    vs = bnq.variants()
    for fam, name, size, T, H, cfgs in bnq.sweep_shapes(list(bnq.SWEEP_FAMILIES), bnq.SWEEP_SIZES):
        for cfg in cfgs:
            p = plan(vs[name], H, dict(cfg, PERSIST=1) if cfg.get("PERSIST") == "fit" else cfg, T)
            assert p["ROWS"] == cfg["ROWS"] and (p["PIPE"] == 0 or p["PERSIST"]), (fam, size, cfg)
    mid = {json.dumps(c, sort_keys=True) for c in shapes[0][5]}
    assert any('"PIPE": 3' in c and '"PERSIST": "fit"' in c for c in mid)
    # programs of consecutive rows only where the group scales are column-major
    col_mid = {json.dumps(c, sort_keys=True) for c in shapes[6][5]}
    assert not any('"SEQ"' in c for c in mid) and mid < col_mid
    assert {c for c in col_mid - mid} == {json.dumps(dict(c, ROWS=1), sort_keys=True) for c in bnq.SWEEP_MID_COL}
    assert all('"SEQ"' not in json.dumps(c) for c in shapes[10][5])  # small size class


def test_sweep_compile_workers_argument_and_jobs():
    assert _args("--sweep", "--compile-workers", "0").compile_workers == 0
    assert _args().compile_workers >= 1
    shapes = list(bnq.sweep_shapes(["token"], ("mid",), [4096]))
    jobs = bnq.compile_jobs(shapes)
    # one job per distinct kernel: plans that differ only in programs per SM ("fit" too)
    # compile the same kernel, as PERSIST 1
    kernels = {json.dumps({k: v for k, v in c.items() if k != "PERSIST"} | {"P": bool(c.get("PERSIST"))},
                          sort_keys=True) for c in shapes[0][5]}
    assert len(jobs) == len(kernels) < len(shapes[0][5])
    assert all(j[:3] == ("token", 4096, 4096) and j[3].get("PERSIST", 0) in (0, 1) for j in jobs)
    assert len(bnq.compile_jobs(shapes + shapes)) == len(jobs)


def test_table_row_shows_persistent_plans_and_their_fit(capsys):
    row = dict(variant="token", T=4096, H=8192, triton_us=40.0, triton_pct_of_limit=84.0,
               plan=dict(CH=1024, NCH=8, ROWS=1, num_warps=4, n_regs=168, n_spills=0, PERSIST=8, fit=3, PIPE=0,
                         WPRE=1))
    bnq._print_table([row, dict(row, plan=dict(row["plan"], PERSIST=2, fit=2, PIPE=3, WPRE=0))])
    bnq._print_table([dict(row, plan=dict(row["plan"], PERSIST=0, SEQ=8, WPRE=1))])
    out = capsys.readouterr().out.splitlines()
    assert out[-5].endswith("CH1024x8 R1 w4 regs168 spill0 persist8(fit 3) wpre")
    assert out[-4].endswith("persist2(fit 2) pipe3")
    assert out[-1].endswith("CH1024x8 R1 w4 regs168 spill0 seq8 wpre")

"""`auto` table for rms_norm_quant (lowering/norm_quant_choice.py) and the kernel's tile table."""

from __future__ import annotations

import json

import pytest
import torch

from fusewright.lowering import norm_quant_choice as nqc
from fusewright.lowering import norm_quant_triton as nqt
from fusewright.lowering.norm_quant_spec import NormQuantSpec, NormSpec, QuantSpec

DEV = "NVIDIA H100 80GB HBM3"


def _spec(kind="fp8_per_token", residual="none", **q):
    return NormQuantSpec(NormSpec(eps=1e-6, residual=residual), QuantSpec(kind=kind, **q))


def _row(fam, T, H, tri, ind):
    return dict(device=DEV, family=fam, T=T, H=H, triton_us=tri, inductor_us=ind, timer="cuda_graph")


def test_family_names():
    assert nqc.family(_spec()) == "token"
    assert nqc.family(_spec(residual="input_dtype")) == "add_token"
    assert nqc.family(_spec("fp8_per_group", group_size=64, col_major=True, ue8m0=True, apply="div")) \
        == "group64_col_ue8m0"
    assert nqc.family(_spec("fp8_static", apply="div")) == "static"
    assert nqc.family(_spec("int8_per_token", scale_form="const_div", scale_const=127.0, apply="mul",
                            clamp_lo=-128.0, clamp_hi=127.0, out_dtype=torch.int8)) == "int8_token"


def test_shipped_choice_picks_the_faster_and_stays_in_range():
    table = {"rows": [_row("token", 16, 7168, 5.0, 4.0), _row("token", 256, 7168, 5.0, 6.0),
                      _row("token", 256, 4096, 5.0, 5.1)]}
    spec = _spec()
    assert nqc.shipped_choice(spec, 16, 7168, DEV, table)[0] == "aten"
    assert nqc.shipped_choice(spec, 300, 7000, DEV, table)[0] == "triton"
    # within the 3% margin the aten sequence (fusable with its neighbours) is kept
    assert nqc.shipped_choice(spec, 256, 4096, DEV, table)[0] == "aten"
    # outside the measured token range, another family, another device: no answer
    assert nqc.shipped_choice(spec, 16384, 7168, DEV, table) is None
    assert nqc.shipped_choice(_spec(residual="input_dtype"), 16, 7168, DEV, table) is None
    assert nqc.shipped_choice(spec, 16, 7168, "NVIDIA A100", table) is None


def test_shipped_tables_are_well_formed():
    table = nqc.load_table()
    assert table["rows"], "norm_quant_auto.json ships measured rows"
    for r in table["rows"]:
        # Both shipped timers replay from a CUDA graph, so host launch overhead is excluded:
        # "cuda_graph" (20 calls per graph, small T) and "l2_flushed" (one call, L2 flushed).
        assert r["timer"] in ("cuda_graph", "l2_flushed") and r["triton_us"] > 0 and r["inductor_us"] > 0
    with open(nqt.TUNING_PATH) as f:
        tuning = json.load(f)["configs"]
    for key, cfg in tuning.items():
        fam, hidden, size = key.split("/")
        assert fam in ("token", "token+int8", "local", "token+res", "local+res", "local+col", "local+ue8m0",
                       "local+col+ue8m0", "local+static") and size in ("small", "mid", "large")
        p = nqt.plan(_spec(), int(hidden), dict(cfg), m={"small": 64, "mid": 4096, "large": 16384}[size])
        assert p["CH"] * p["NCH"] >= int(hidden)


@pytest.fixture
def tuning_table(monkeypatch, tmp_path):
    """`use(configs)` makes the plan read a tuning table holding `configs` (and nothing else)."""
    path = tmp_path / "t.json"
    monkeypatch.setenv(nqt.ENV_TUNING, str(path))

    def use(configs: dict) -> None:
        path.write_text(json.dumps({"configs": configs}))
        nqt._tuning_table.cache_clear()

    yield use
    nqt._tuning_table.cache_clear()


def test_tuning_lookup_nearest_hidden_and_residual_fallback(tuning_table):
    tuning_table({"token/4096/large": {"CH": 2048, "num_warps": 8},
                  "token/8192/large": {"CH": 1024, "num_warps": 4, "PERSIST": 2}})
    # Nearest hidden size (4096) lends its warps, not its chunk width (2048 would pad
    # 5120 to 6144 lanes): the chunk width stays the exact-fit heuristic's.
    p = nqt.plan(_spec(), 5120, m=16384)
    assert (p["CH"], p["NCH"], p["num_warps"]) == (1024, 5, 8)
    p = nqt.plan(_spec(residual="input_dtype"), 7168, m=16384)
    assert (p["CH"], p["num_warps"], p["PERSIST"]) == (1024, 4, 2)
    assert nqt.plan(_spec(), 7168, m=16)["PERSIST"] == 0  # no small entry: heuristic
    # no mid entry: T = 4096 takes the large plan; a mid entry wins for its class only
    assert nqt.plan(_spec(residual="input_dtype"), 7168, m=4096)["PERSIST"] == 2
    tuning_table({"token/8192/large": {"CH": 1024, "num_warps": 4, "PERSIST": 2},
                  "token/8192/mid": {"CH": 2048, "num_warps": 8}})
    assert nqt.size_class(4096) == "mid" and nqt.size_class(1023) == "small" and nqt.size_class(8192) == "large"
    p = nqt.plan(_spec(), 8192, m=4096)
    assert (p["CH"], p["num_warps"], p["PERSIST"]) == (2048, 8, 0)
    assert nqt.plan(_spec(), 8192, m=16384)["PERSIST"] == 2


def test_pipeline_depth_from_the_table_and_its_limits(tuning_table):
    from fusewright.lowering.norm_quant_spec import SpecError

    tuning_table({"token/4096/mid": {"CH": 1024, "num_warps": 8, "PERSIST": 1, "PIPE": 3}})
    p = nqt.plan(_spec(), 4096, m=4096)
    assert (p["PERSIST"], p["PIPE"]) == (1, 3)
    assert nqt.plan(_spec(), 4096, m=16384)["PIPE"] == 0  # other size classes: no pipelining
    for bad in (1, -2):
        with pytest.raises(SpecError, match=f"PIPE={bad}.*0 .*or a stage count >= 2"):
            nqt.plan(_spec(), 4096, {"PERSIST": 1, "PIPE": bad}, m=4096)
    with pytest.raises(SpecError, match="PIPE=3 pipelines the persistent loop: it needs PERSIST >= 1"):
        nqt.plan(_spec(), 4096, {"PERSIST": 0, "PIPE": 3}, m=4096)
    with pytest.raises(SpecError, match="ROWS=4"):
        nqt.plan(_spec(), 4096, {"PERSIST": 2, "ROWS": 4, "PIPE": 3}, m=4096)


def test_programs_of_consecutive_rows_and_their_limits():
    from fusewright.lowering.norm_quant_spec import SpecError

    col = _spec("fp8_per_group", group_size=64, col_major=True, apply="div", floor=1e-10)
    p = nqt.plan(col, 4096, {"CH": 2048, "num_warps": 4, "SEQ": 8, "WPRE": 1}, m=4096)
    assert (p["SEQ"], p["PERSIST"], p["PIPE"], p["ROWS"]) == (8, 0, 0, 1)
    assert nqt.plan(col, 4096, {"CH": 2048}, m=4096)["SEQ"] == 0
    # persistent programs looping over runs
    p = nqt.plan(col, 4096, {"CH": 2048, "num_warps": 4, "SEQ": 4, "PERSIST": 4, "WPRE": 1}, m=4096)
    assert (p["SEQ"], p["PERSIST"], p["PIPE"]) == (4, 4, 0)
    for bad in ({"SEQ": 6}, {"SEQ": 1}, {"SEQ": 128}, {"SEQ": 8, "ROWS": 2}, {"SEQ": 8, "PERSIST": 4, "PIPE": 3}):
        with pytest.raises(SpecError, match=r"SEQ=\d+: programs of SEQ consecutive rows take a power of two"):
            nqt.plan(col, 4096, bad, m=4096)


def test_a_given_plan_replaces_the_table_entry(tuning_table):
    """A sweep's plan is timed as named: the shipped entry's persistent loop, weight prefetch
    and pipeline do not leak into a plan that leaves them out (session 9's sweep timed several
    plans with them and wrote the plans without them into the table)."""
    tuning_table({"token/4096/mid": {"CH": 1024, "num_warps": 4, "PERSIST": 2, "PIPE": 3, "WPRE": 1}})
    assert (nqt.plan(_spec(), 4096, m=4096)["PERSIST"], nqt.plan(_spec(), 4096, m=4096)["PIPE"]) == (2, 3)
    p = nqt.plan(_spec(), 4096, {"CH": 2048, "num_warps": 8}, m=4096)
    assert (p["CH"], p["num_warps"], p["PERSIST"], p["PIPE"], p["WPRE"], p["ROWS"]) == (2048, 8, 0, 0, 0, 1)
    # rows per program without the entry's pipelined loop (an error if it leaked)
    assert nqt.plan(_spec(), 4096, {"CH": 1024, "num_warps": 8, "ROWS": 2}, m=4096)["ROWS"] == 2
    # an empty plan is the heuristic's
    p = nqt.plan(_spec(), 4096, {}, m=4096)
    assert (p["CH"], p["NCH"], p["num_warps"], p["PERSIST"], p["PIPE"], p["WPRE"]) == (1024, 4, 4, 0, 0, 0)


def test_col_major_groups_have_their_own_family_and_fall_back(tuning_table):
    col = _spec("fp8_per_group", group_size=64, col_major=True, apply="div", floor=1e-10)
    row = _spec("fp8_per_group", group_size=64, apply="div", floor=1e-10)
    assert nqt.tuning_key(col, 4096, 4096) == "local+col/4096/mid"
    assert nqt.tuning_key(row, 4096, 4096) == "local/4096/mid"
    tuning_table({"local/4096/mid": {"CH": 2048, "num_warps": 8},
                  "local+col/4096/mid": {"CH": 512, "num_warps": 8, "ROWS": 8}})
    assert nqt.plan(col, 4096, m=4096)["ROWS"] == 8
    assert nqt.plan(row, 4096, m=4096)["ROWS"] == 1
    # a col-major spec with a residual, never measured: the col-major entry, not the row one
    res_col = _spec("fp8_per_group", group_size=64, col_major=True, apply="div", floor=1e-10,
                    residual="input_dtype")
    assert nqt.plan(res_col, 4096, m=4096)["ROWS"] == 8


def test_int8_per_token_has_its_own_family_and_falls_back(tuning_table):
    int8 = _spec("int8_per_token", scale_form="const_div", scale_const=127.0, apply="mul", clamp_lo=-128.0,
                 clamp_hi=127.0, floor=1e-5, floor_on="amax", out_dtype=torch.int8)
    assert nqt.tuning_key(int8, 4096, 4096) == "token+int8/4096/mid"
    assert nqt.tuning_key(_spec(), 4096, 4096) == "token/4096/mid"
    assert nqt.tuning_key(_spec("int8_per_token", residual="input_dtype", scale_form="const_div",
                                scale_const=127.0, apply="mul", clamp_lo=-128.0, clamp_hi=127.0,
                                out_dtype=torch.int8), 7168, 16384) == "token+int8+res/7168/large"
    tuning_table({"token/4096/mid": {"CH": 2048, "num_warps": 4, "PERSIST": 4, "WPRE": 1},
                  "token+int8/4096/mid": {"CH": 512, "num_warps": 4},
                  "token/4096/large": {"CH": 1024, "num_warps": 8}})
    assert (nqt.plan(int8, 4096, m=4096)["CH"], nqt.plan(int8, 4096, m=4096)["PERSIST"]) == (512, 0)
    assert nqt.plan(_spec(), 4096, m=4096)["PERSIST"] == 4
    # no int8 entry of its size class: the fp8 family's
    assert nqt.plan(int8, 4096, m=16384)["num_warps"] == 8
    # int8 with a residual: the int8 entry before the fp8 residual one
    tuning_table({"token+int8/4096/mid": {"CH": 512, "num_warps": 4},
                  "token+res/4096/mid": {"CH": 1024, "num_warps": 8}})
    int8_res = _spec("int8_per_token", residual="input_dtype", scale_form="const_div", scale_const=127.0,
                     apply="mul", clamp_lo=-128.0, clamp_hi=127.0, out_dtype=torch.int8)
    assert nqt.plan(int8_res, 4096, m=4096)["CH"] == 512


def test_ue8m0_group_scales_have_their_own_family_and_fall_back(tuning_table):
    def g(**kw):
        return _spec("fp8_per_group", apply="div", floor=1e-10, **kw)

    ue_row, ue_col = g(group_size=128, ue8m0=True), g(group_size=64, col_major=True, ue8m0=True)
    assert nqt.tuning_key(ue_row, 5120, 4096) == "local+ue8m0/5120/mid"
    assert nqt.tuning_key(ue_col, 5120, 4096) == "local+col+ue8m0/5120/mid"
    assert nqt.tuning_key(g(group_size=128, ue8m0=True, residual="input_dtype"), 7168, 16384) \
        == "local+res+ue8m0/7168/large"
    assert nqt.tuning_key(g(group_size=128), 5120, 4096) == "local/5120/mid"
    tuning_table({"local/5120/mid": {"CH": 1024, "num_warps": 4, "WPRE": 1},
                  "local+ue8m0/5120/mid": {"CH": 2048, "num_warps": 4, "PERSIST": 4, "WPRE": 1},
                  "local+col/5120/mid": {"CH": 1024, "num_warps": 4, "PERSIST": 8, "WPRE": 1},
                  "local/5120/large": {"CH": 1024, "num_warps": 8}})
    assert (nqt.plan(ue_row, 5120, m=4096)["CH"], nqt.plan(ue_row, 5120, m=4096)["PERSIST"]) == (2048, 4)
    assert (nqt.plan(g(group_size=128), 5120, m=4096)["CH"], nqt.plan(g(group_size=128), 5120, m=4096)["PERSIST"]) \
        == (1024, 0)
    # col-major ue8m0 without an entry: col-major's before ue8m0's (the last qualifier goes first)
    assert nqt.plan(ue_col, 5120, m=4096)["PERSIST"] == 8
    # no ue8m0 entry of its size class: the plain family's
    assert nqt.plan(ue_row, 5120, m=16384)["num_warps"] == 8
    # with a residual as well: the residual family before the col-major ue8m0 one, which
    # drops the residual
    tuning_table({"local+col+ue8m0/5120/mid": {"CH": 2048, "num_warps": 4, "PERSIST": 4, "WPRE": 1},
                  "local+res/5120/mid": {"CH": 1024, "num_warps": 8}})
    res_col_ue = g(group_size=64, col_major=True, ue8m0=True, residual="input_dtype")
    assert nqt.tuning_key(res_col_ue, 5120, 4096) == "local+res+col+ue8m0/5120/mid"
    assert (nqt.plan(res_col_ue, 5120, m=4096)["num_warps"], nqt.plan(res_col_ue, 5120, m=4096)["PERSIST"]) == (8, 0)


def test_static_scales_have_their_own_family_and_fall_back(tuning_table):
    static = _spec("fp8_static", apply="div")
    group = _spec("fp8_per_group", group_size=128, apply="div", floor=1e-10)
    assert nqt.tuning_key(static, 7168, 4096) == "local+static/7168/mid"
    assert nqt.tuning_key(_spec("fp8_static", apply="div", residual="input_dtype"), 7168, 4096) \
        == "local+res+static/7168/mid"
    tuning_table({"local/7168/mid": {"CH": 1024, "num_warps": 4, "PERSIST": 4, "PIPE": 3, "WPRE": 1},
                  "local+static/7168/mid": {"CH": 1024, "num_warps": 4, "WPRE": 1},
                  "local/7168/small": {"CH": 2048, "num_warps": 8},
                  "local+res/7168/mid": {"CH": 1024, "num_warps": 8}})
    # static and per-group scales at the same shape: each its own plan
    assert (nqt.plan(static, 7168, m=4096)["PERSIST"], nqt.plan(static, 7168, m=4096)["PIPE"]) == (0, 0)
    assert (nqt.plan(group, 7168, m=4096)["PERSIST"], nqt.plan(group, 7168, m=4096)["PIPE"]) == (4, 3)
    # no static entry of its size class: the family's
    assert nqt.plan(static, 7168, m=64)["CH"] == 2048
    # with a residual: the residual family's plan (the static qualifier goes first)
    assert nqt.plan(_spec("fp8_static", apply="div", residual="input_dtype"), 7168, m=4096)["num_warps"] == 8


def test_shipped_table_keeps_static_plans_at_every_local_width():
    """`_lookup` gives a family the nearest measured width of its own before its parent's, so
    the static family has a mid entry wherever `local` has one (else static at those widths
    would borrow the static plan of a neighbour)."""
    with open(nqt.TUNING_PATH) as f:
        tuning = json.load(f)["configs"]
    local_mid = {k.split("/")[1] for k in tuning if k.startswith("local/") and k.endswith("/mid")}
    static_mid = {k.split("/")[1] for k in tuning if k.startswith("local+static/") and k.endswith("/mid")}
    assert local_mid and static_mid == local_mid


def test_shipped_choice_for_registry_call():
    from fusewright.lowering.registry import OpCall, TensorInfo

    spec = _spec("fp8_per_group", group_size=128, apply="div", floor=1e-10)
    table = {"rows": [_row("group128", 16, 4096, 3.0, 4.0)]}

    def call(rows):
        return OpCall.make("rms_norm_quant", {"x": TensorInfo((rows, 4096), torch.bfloat16, "cuda"),
                                              "weight": None, "residual": None, "scale": None}, spec.to_str())

    nqc.load_table.cache_clear()
    assert nqc.shipped_choice(spec, 16, 4096, DEV, table)[0] == "triton"
    got = nqc.shipped_choice_for_call(call(16), DEV)  # the shipped file: group128 wins at T=16, H=4096
    assert got is not None and got[0] == "triton"
    assert nqc.shipped_choice_for_call(call(-1), DEV) is None  # no size hint: not covered


def test_kernel_supports():
    assert nqt.supports(_spec(), 7168) is None
    assert nqt.supports(_spec("fp8_per_group", group_size=128, apply="div"), 7168) is None
    assert "not divisible" in nqt.supports(_spec("fp8_per_group", group_size=128, apply="div"), 2880)
    assert "power of two" in nqt.supports(_spec("fp8_per_group", group_size=96, apply="div"), 2880)

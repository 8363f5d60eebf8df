"""CPU checks of `fusewright bench act-quant`: arguments, the no-CUDA exit, min-bytes
arithmetic, and that each variant's eager spelling and the fused op's CPU reference
compute the same bits (what makes the benchmark compare like with like)."""

import argparse
import json

import pytest
import torch

from fusewright.lowering import act_quant_ops
from fusewright.tools import bench_act_quant as baq
from fusewright.tools.cli import main as cli_main


def _args(*argv):
    p = argparse.ArgumentParser()
    baq.add_arguments(p)
    return p.parse_args(list(argv))


def test_unknown_variant_is_named_with_the_accepted_ones(capsys):
    assert baq.main(_args("--variants", "token,silu_mul_tokn")) == 2
    err = capsys.readouterr().err
    assert "silu_mul_tokn" in err
    for name in ("silu_mul_token", "silu_mul_group128", "silu_mul_group128_col", "token", "silu_mul_token_gu"):
        assert name in err


@pytest.mark.parametrize("bad", ["4096", "4096x", "ax14336", "4096x14336x2", "0x4096", "4096x-1"])
def test_bad_shape_strings_say_what_is_accepted(capsys, bad):
    assert baq.main(_args("--shapes", f"16x4096,{bad}")) == 2
    err = capsys.readouterr().err
    assert repr(bad) in err and "TxH" in err


def test_a_width_the_group_size_does_not_divide_is_rejected_before_any_device_work(capsys):
    assert baq.main(_args("--variants", "silu_mul_group128", "--shapes", "16x1000")) == 2
    assert "not divisible by the group size 128" in capsys.readouterr().err


def test_parse_shapes_and_defaults():
    assert baq.parse_shapes("1x14336, 16X4096") == [(1, 14336), (16, 4096)]
    vs = baq.variants()
    silu = baq.default_shapes(vs["silu_mul_token"], small=False)
    assert sorted({H for _, H in silu}) == [12288, 14336, 18432] and sorted({T for T, _ in silu}) == [4096, 16384]
    assert sorted({H for _, H in baq.default_shapes(vs["token"], small=False)}) == [4096, 7168]
    assert [T for T, _ in baq.default_shapes(vs["silu_mul_token"], small=True)][-4:] == [1, 16, 64, 256]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_no_cuda_exits_2_with_a_message_through_the_cli(capsys):
    assert cli_main(["bench", "act-quant", "--variants", "token"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Traceback" not in err


def test_min_bytes():
    vs = baq.variants()
    T, I = 4096, 14336
    # silu_mul reads gate and up (bf16), writes q (fp8) and one f32 scale per token / per group
    assert baq.min_bytes(vs["silu_mul_token"], T, I) == 2 * T * I * 2 + T * I + 4 * T
    assert baq.min_bytes(vs["silu_mul_token_gu"], T, I) == 2 * T * I * 2 + T * I + 4 * T
    assert baq.min_bytes(vs["silu_mul_group128"], T, I) == 2 * T * I * 2 + T * I + 4 * T * (I // 128)
    assert baq.min_bytes(vs["silu_mul_group128_col"], T, I) == baq.min_bytes(vs["silu_mul_group128"], T, I)
    assert baq.min_bytes(vs["token"], T, 4096) == 2 * T * 4096 + T * 4096 + 4 * T


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


@pytest.mark.parametrize("name", list(baq.variants()))
def test_eager_spelling_and_fused_op_agree_bitwise_on_cpu(name):
    v = baq.variants()[name]
    torch.manual_seed(0)
    inputs = v.make_inputs(5, 256, "cpu")
    inputs = tuple(t * 3 for t in inputs)  # values past silu's linear range and past 1 in amax
    q_ref, s_ref = v.eager(*inputs)
    q, s = act_quant_ops.call(v.spec, *v.op_args(*inputs))
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape
    assert torch.equal(_bits(q), _bits(q_ref))
    assert s.shape == s_ref.shape and s.stride() == s_ref.stride()
    assert torch.equal(_bits(s), _bits(s_ref))
    m = baq.compare((q, s), (q_ref, s_ref))
    assert m["ok"] and m["q_equal_frac"] == 1.0 and m["scale_max_rel"] == 0.0


def test_compare_flags_a_wrong_scale_layout_and_wrong_values():
    v = baq.variants()["silu_mul_group128_col"]
    inputs = v.make_inputs(4, 256, "cpu")
    q, s = v.eager(*inputs)
    assert not baq.compare((q, s.contiguous()), (q, s))["ok"]  # row-major where col-major is expected
    assert not baq.compare((q, s * (1 + 1e-5)), (q, s))["ok"]
    q2 = q.clone()
    q2.view(torch.uint8)[0, :2] ^= 1  # 2 of 1024 elements differ: below 99.9% equal
    m = baq.compare((q2, s), (q, s))
    assert not m["ok"] and m["q_equal_frac"] == pytest.approx(1 - 2 / 1024)


def test_write_choice_merges_rows_and_keeps_rules(tmp_path):
    path = tmp_path / "auto.json"
    dev = "NVIDIA H100 80GB HBM3"
    path.write_text(json.dumps({"measured": {"Other": [{"variant": "token", "T": 1, "H": 4096}],
                                             dev: [{"variant": "token", "T": 4096, "H": 4096, "us": {}},
                                                   {"variant": "token", "T": 16, "H": 4096, "us": {"triton": 1}}]},
                                "rules": {"cuda": {"pick": "triton", "why": "x"}}}))
    ok = dict(ok=True)
    rows = [dict(variant="token", T=4096, H=4096, timer="l2_flushed", fusewright_us=10.0, inductor_us=15.0, match=ok),
            dict(variant="silu_mul_group128_col", T=4096, H=14336, timer="l2_flushed", fusewright_us=50.0,
                 inductor_us=70.0, match=ok),
            dict(variant="silu_mul_token_gu", T=4096, H=14336, timer="l2_flushed", fusewright_us=50.0,
                 inductor_us=70.0, match=ok),
            dict(variant="silu_mul_token", T=4096, H=14336, timer="l2_flushed", fusewright_us=50.0,
                 inductor_us=70.0, match=dict(ok=False)),
            dict(variant="token", T=64, H=4096, error="RuntimeError: x")]
    assert baq.write_choice(str(path), rows, {"date": "now"}, dev) == 0
    table = json.loads(path.read_text())
    assert table["rules"] == {"cuda": {"pick": "triton", "why": "x"}} and table["environment"] == {"date": "now"}
    assert table["measured"]["Other"] == [{"variant": "token", "T": 1, "H": 4096}]
    got = {(r["variant"], r["T"]): r for r in table["measured"][dev]}
    assert set(got) == {("token", 4096), ("token", 16), ("silu_mul_group128_col", 4096)}
    assert got[("token", 4096)]["us"] == {"triton": 10.0, "none": 15.0}
    assert got[("token", 4096)]["family"] == "identity_token"
    assert got[("silu_mul_group128_col", 4096)]["family"] == "silu_mul_group128_col"


def test_the_choice_reader_uses_a_written_row():
    from fusewright.lowering.act_quant_choice import shipped_choice_for_call

    v = baq.variants()["silu_mul_token"]
    dev = "Some GPU"
    table = {"measured": {dev: [dict(variant=v.name, family="silu_mul_token", T=4096, H=14336,
                                     us={"triton": 50.0, "none": 80.0})]}}
    x = torch.empty(4096, 14336, dtype=torch.bfloat16, device="meta")
    call = act_quant_ops.op_call(v.spec, x, x)
    got = shipped_choice_for_call(call, dev, table=table)
    assert got is not None and got[0] == "triton"


class _StubTimer:
    """Runs each measured callable once (so it must work) and returns fixed times."""

    def __init__(self):
        self.called = []

    def hbm(self, fn):
        fn()
        self.called.append("hbm")
        return 20.0 if len(self.called) == 1 else 30.0

    graph = hbm

    def copy_us(self, nbytes):
        return 10.0


def test_bench_one_row_on_cpu_with_a_stub_timer():
    """The row's code path (stock compile, match check, arithmetic) without a GPU: one real
    CPU Inductor compile of the spelling, the times from a stand-in timer."""
    v = baq.variants()["silu_mul_group128_col"]
    T, H = 300, 256  # T > 256: the L2-flushed path, with the same-bytes copy
    timer = _StubTimer()
    bw = 1e12
    row = baq.bench_one(timer, bw, v, T, H, device="cpu")
    assert timer.called == ["hbm", "hbm"]
    m = row["match"]
    assert m["ok"] and m["vs"] == "reference (CPU)" and m["q_equal_frac"] == 1.0 and m["scale_strides_same"]
    # stock CPU Inductor keeps silu(g) * u in f32 (no bf16 roundings): recorded, not a failure
    assert m["stock"]["q_equal_frac"] < 1.0 and not m["stock"]["ok"]
    assert m["stock"]["q_equal_frac"] == m["stock_vs_eager"]["q_equal_frac"]
    assert row["timer"] == "l2_flushed" and row["fusewright_us"] == 20.0 and row["inductor_us"] == 30.0
    assert row["speedup"] == 1.5
    lim = baq.min_bytes(v, T, H) / bw * 1e6
    assert row["limit_us"] == round(lim, 2) and row["fusewright_pct_of_limit"] == round(100 * lim / 20, 1)
    assert row["fusewright_pct_of_same_bytes_copy"] == 50.0 and row["inductor_pct_of_same_bytes_copy"] == 33.3


@pytest.mark.gpu
def test_one_tiny_row_end_to_end(tmp_path):
    out = tmp_path / "rows.json"
    choice = tmp_path / "choice.json"
    rc = baq.main(_args("--variants", "silu_mul_group128_col,token", "--shapes", "16x1024", "--reps", "3",
                        "--json", str(out), "--write-choice", str(choice)))
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0, rows
    assert [r["variant"] for r in rows] == ["silu_mul_group128_col", "token"]
    for r in rows:
        assert r["match"]["ok"] and r["fusewright_us"] > 0 and r["inductor_us"] > 0 and r["timer"] == "cuda_graph"
    assert len(next(iter(json.loads(choice.read_text())["measured"].values()))) == 2

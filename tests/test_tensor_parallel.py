"""Rewrites on tensor-parallel graphs: two CPU processes, gloo, functional all-reduces.

Also graph-diff on the real per-rank output code of those processes (one report per rank,
collectives untouched) and the FX check that no rewrite moves computation across a
wait_tensor (`tools.fx_diff.collective_changes`)."""

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TOKENS, HIDDEN = 16, 128


def _collectives(graph):
    ops = (torch.ops._c10d_functional.all_reduce.default,)
    return [n for n in graph.nodes if n.op == "call_function" and n.target in ops]


def _describe_collective(node):
    """What a collective communicates: its op, arguments, and the op that produced its input."""
    src = node.args[0]
    return (str(node.target), tuple(str(a) for a in node.args[1:]), str(src.target), [str(u.target) for u in node.users])


def _rank(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from fusewright.testing import compile_and_capture
        from fusewright.tools.fx_diff import collective_changes, collective_fingerprint
        from fusewright.tools.tp_example import full_layer

        full = full_layer(HIDDEN)
        torch.manual_seed(1)
        x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)
        local = full.shard(rank, WORLD)
        with torch.no_grad():
            reference = full(x)  # the single-process layer
        off = compile_and_capture(local, [x], enable=False)
        on = compile_and_capture(local, [x])
        before, after = on.graphs_before[0], on.graphs_after[0]
        queue.put({
            "rank": rank,
            "rewrites": on.report.rewrites(),
            "errors": [e for s in on.report.values() for e in s.errors],
            "on_vs_off": (on.outputs.float() - off.outputs.float()).abs().max().item(),
            "on_vs_single": (on.outputs.float() - reference.float()).abs().max().item(),
            "reference_scale": reference.float().abs().max().item(),
            "collectives_before": [_describe_collective(n) for n in _collectives(before)],
            "collectives_after": [_describe_collective(n) for n in _collectives(after)],
            "codes_off": off.codes,
            "codes_on": on.codes,
            "moved_across_collectives": collective_changes(before, after),
            "fingerprint": collective_fingerprint(after),
        })
    except Exception as exc:  # report instead of hanging the other rank's queue read
        queue.put({"rank": rank, "exception": repr(exc)})
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.start_processes(_rank, args=(f"{tmp}/init", queue), nprocs=WORLD, start_method="spawn",
                                   join=False)
        # read before joining: a child cannot exit until the queue has taken its (large) result
        results = sorted((queue.get(timeout=120) for _ in range(WORLD)), key=lambda r: r["rank"])
        while not procs.join():
            pass
    for result in results:
        assert "exception" not in result, result
    return results


def test_rewrites_fire_on_every_rank(ranks):
    for result in ranks:
        assert not result["errors"]
        rewrites = result["rewrites"]
        # input_layernorm -> fused QKV quant, post_attention_layernorm (after the
        # all-reduce + residual add) -> gate/up quant.
        assert rewrites.get("fuse_norm_quant") == 2, rewrites
        # The bf16 -> f32 -> bf16 round trip on the all-reduced value, in front of the opaque op.
        assert rewrites.get("eliminate_noop_casts") == 1, rewrites
        assert rewrites.get("rewrite_rope", 0) == 0


def test_outputs_match_across_plugin_and_single_process(ranks):
    for result in ranks:
        # Plugin on vs off on the same rank: exact numerics, same kernels' math.
        assert result["on_vs_off"] == 0.0
        # Against the single-process layer: FP8 quantization of a rank's partial
        # activations differs from quantizing the full ones, so allow a few FP8 steps.
        assert result["on_vs_single"] <= 0.1 * result["reference_scale"]


def test_collectives_unchanged(ranks):
    """No rewrite changes what is communicated or reads a result before its wait_tensor."""
    for result in ranks:
        assert result["collectives_before"] == result["collectives_after"]
        assert len(result["collectives_after"]) == 2
        for _, _, _, users in result["collectives_after"]:
            assert users == ["_c10d_functional.wait_tensor.default"]


def test_no_rewrite_moves_computation_across_a_wait(ranks):
    """Deliverable 1: what is communicated, and which side of each wait every computation
    is on, are the same before and after the passes (on the graphs the passes really got)."""
    for result in ranks:
        assert result["moved_across_collectives"] == [], result["moved_across_collectives"]
        fp = result["fingerprint"]
        assert [c["op"] for c in fp["collectives"]] == ["_c10d_functional.all_reduce"] * 2
        assert [c["sends"] for c in fp["collectives"]] == [["bfloat16[16, 128] stride [128, 1]"]] * 2
        # the second all-reduce's input comes after the first wait (the residual stream); the output after both
        assert [c["after_waits"] for c in fp["collectives"]] == [[], [0]]
        assert fp["waits"] == [{"on": 0}, {"on": 1}] and fp["outputs"] == [[0, 1]]
        # computation in all three regions: in front of both all-reduces (input norm, attention),
        # between them (post-attention norm + quant, MLP), after both (the opaque op, the residual add)
        regions = {(tuple(w), tuple(f)) for _, w, f in fp["regions"].values()}
        assert {((), (0, 1)), ((0,), (1,)), ((0, 1), ())} <= regions, regions


def test_graph_diff_per_rank_on_real_code(ranks, tmp_path):
    from fusewright.tools.graph_diff import check_expectations, offline_diff

    for side, key in (("before", "codes_off"), ("after", "codes_on")):
        for result in ranks:
            for i, code in enumerate(result[key]):
                d = tmp_path / side / f"rank{result['rank']}" / f"graph{i}"
                d.mkdir(parents=True)
                (d / "output_code.py").write_text(code)
    report = offline_diff(str(tmp_path / "before"), str(tmp_path / "after"))
    assert list(report.rank_reports) == ["0", "1"]
    for rank, sub in report.rank_reports.items():
        removed = [m.before for m in sub.kernel_diff if m.status == "removed"]
        # the no-op round trip in front of the opaque op is gone on every rank
        assert any(k.is_noop for k in removed), [k.name for k in removed]
        assert not any(k.is_noop for k in sub.after.kernels)
        colls = [m for m in sub.kernel_diff if (m.after or m.before).kind == "collective"]
        assert [m.status for m in colls] == ["unchanged"] * 4  # 2 all_reduce_ + 2 wait_tensor, C++ code
        assert {m.after.name for m in colls} == {"_c10d_functional.all_reduce_", "_c10d_functional.wait_tensor"}
        assert all(k.rank == rank for k in sub.before.kernels + sub.after.kernels)
    assert report.collectives()["ok"] and check_expectations(report) == []
    data = report.to_dict()
    assert set(data["ranks"]) == {"0", "1"} and data["collectives"]["before_count"] == 8

"""Rewrites on tensor-parallel graphs: two CPU processes, gloo, functional all-reduces."""

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
        mp.start_processes(_rank, args=(f"{tmp}/init", queue), nprocs=WORLD, start_method="spawn")
    results = sorted((queue.get(timeout=60) for _ in range(WORLD)), key=lambda r: r["rank"])
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

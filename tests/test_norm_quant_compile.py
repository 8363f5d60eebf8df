"""Real Inductor compiles (CPU) of norm->quant spellings with the pass: the fused op, the aten
sequence, fast numerics, dynamic token counts. Kept to a few cases: each is a cold compile."""

import importlib.util
import pathlib
import sys

import pytest
import torch

import fusewright
import fusewright.lowering.norm_quant_ops  # noqa: F401  (registers the op)
from fusewright.passes.report import last_report
from fusewright.testing import compile_and_capture, count_targets

_spec = importlib.util.spec_from_file_location("norm_quant_cases", pathlib.Path(__file__).with_name("test_norm_quant_cases.py"))
cases = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("norm_quant_cases", cases)
_spec.loader.exec_module(cases)

OP = torch.ops.fusewright.rms_norm_quant.default
pytestmark = pytest.mark.usefixtures("no_env_config")


def _distance(outs, eager):
    """Per output: (elements differing, max fp8/int8 steps or max abs difference)."""
    res = []
    for got, want in zip(outs, eager):
        if got.dtype in (torch.float8_e4m3fn, torch.int8):
            d = cases.fp8_ulp_diff(got, want)
            res.append((int((d > 0).sum()), int(d.max())))
        else:
            d = (got.float() - want.float()).abs()
            res.append((int((d > 0).sum()), float(d.max())))
    return res


@pytest.mark.parametrize("norm,tail", [("llama", "vllm_token"), ("frms", "group64_col"), ("gemma", "int8_bitnet")])
def test_fused_op_compiled_is_bitwise_eager(norm, tail):
    fn = cases.make_fn(norm, tail, True)
    inputs = cases.make_inputs(norm, tail, True, tokens=32)
    run = compile_and_capture(fn, inputs, config={"lowering": "triton"})
    stats = run.report["fuse_norm_quant"]
    assert (stats.matched, stats.rewritten, stats.skipped, stats.errors) == (1, 1, [], [])
    assert count_targets(run.graphs_after[0], OP) == 1
    assert "rms_norm_quant" in "".join(run.codes)
    for got, want in zip(run.outputs, fn(*inputs)):
        assert cases.same_bits(got, want) and got.stride() == want.stride()


@pytest.mark.parametrize("norm,tail", [("llama", "vllm_token"), ("olmo2", "group128_ue8m0")])
def test_aten_sequence_no_further_from_eager_than_stock(norm, tail):
    """Inductor's codegen may keep a bf16 intermediate in f32 registers (stock does the
    same to the original spelling): the rewrite must not be further from eager."""
    fn = cases.make_fn(norm, tail, True)
    inputs = cases.make_inputs(norm, tail, True, tokens=64)
    run = compile_and_capture(fn, inputs, config={"lowering": "aten"})
    assert run.report["fuse_norm_quant"].rewritten == 1
    assert count_targets(run.graphs_after[0], OP) == 0
    stock = compile_and_capture(fn, inputs, enable=False)
    eager = fn(*inputs)
    ours, theirs = _distance(run.outputs, eager), _distance(stock.outputs, eager)
    for (n_ours, m_ours), (n_theirs, m_theirs) in zip(ours, theirs):
        assert m_ours <= max(m_theirs, 1) and n_ours <= n_theirs, (ours, theirs)


def test_fast_numerics_compiled():
    fn = cases.make_fn("gemma", "vllm_token", False)
    inputs = cases.make_inputs("gemma", "vllm_token", False, tokens=64)
    run = compile_and_capture(fn, inputs, config={"lowering": "triton", "numerics": "fast"})
    (op,) = [n for n in run.graphs_after[0].nodes if n.target is OP]
    assert '"numerics":"fast"' in op.args[-1]
    q, s = run.outputs
    q_e, s_e = fn(*inputs)
    d = cases.fp8_ulp_diff(q, q_e)
    assert d.max() <= 1 and (d <= 1).float().mean() >= 0.999
    assert cases.rel_err(s, s_e) <= 1e-6


def test_dynamic_token_count_one_compile():
    """The token count is symbolic (the hidden size, as with a model's weights, is not)."""
    fn = cases.make_fn("llama", "group128", True)
    compiled = fusewright.compile(fn, config={"lowering": "triton"})
    with torch.no_grad():
        for tokens in (5, 17):
            inputs = cases.make_inputs("llama", "group128", True, tokens=tokens, seed=tokens)
            torch._dynamo.mark_dynamic(inputs[0], 0)
            torch._dynamo.mark_dynamic(inputs[2], 0)
            for got, want in zip(compiled(*inputs), fn(*inputs)):
                assert cases.same_bits(got, want)
            if tokens == 5:
                assert last_report()["fuse_norm_quant"].rewritten == 1
                frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile


def test_auto_on_cpu_is_the_aten_sequence():
    fn = cases.make_fn("t5", "torchao_row", False)
    inputs = cases.make_inputs("t5", "torchao_row", False)
    run = compile_and_capture(fn, inputs)
    stats = run.report["fuse_norm_quant"]
    assert stats.rewritten == 1 and all("-> aten (" in k for k in stats.details)
    assert count_targets(run.graphs_after[0], OP) == 0


def test_aten_sequence_bitwise_with_emulated_precision_casts():
    """With Inductor's emulate_precision_casts, stock is bitwise eager; so is the aten
    lowering, because its low-precision nodes carry the rounding mark tracing sets."""
    from torch._inductor import config as inductor_config

    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        # Seen on torch 2.11: its Inductor does not read the rounding mark, so the
        # emulated roundings are not all kept and neither side is bitwise eager.
        pytest.skip("the low-precision rounding mark is honoured from torch 2.13")

    fn = cases.make_fn("llama", "vllm_token", True)
    inputs = cases.make_inputs("llama", "vllm_token", True, tokens=64)
    with inductor_config.patch(emulate_precision_casts=True):
        run = compile_and_capture(fn, inputs, config={"lowering": "aten"})
    assert run.report["fuse_norm_quant"].rewritten == 1
    for got, want in zip(run.outputs, fn(*inputs)):
        assert cases.same_bits(got, want)

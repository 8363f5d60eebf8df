"""Real transformers decoder layers (tiny configs, random weights, bf16) with FP8 per-token
activation quantization in front of every linear (torchao float8 rowwise, in plain torch:
tools/model_zoo.py): every RMSNorm -> quant pair is rewritten.

Per decoder layer: input_layernorm feeds q/k/v (three identical quantizations, one fused
op) and post_attention_layernorm, after the residual add, feeds gate/up (one fused op
that also returns the new residual). The quantizations in front of o_proj and down_proj
follow no norm and stay; Qwen3's q/k norms and the final norm are not quantized and stay.
"""

import importlib.util
import pathlib
import sys

import pytest
import torch

from fusewright.passes.base import PassContext
from fusewright.passes.config import PassConfig
from fusewright.passes.graph_utils import snapshot
from fusewright.passes.norm_quant import PASS
from fusewright.passes.report import PassStats
from fusewright.testing import compile_and_capture, count_targets

pytestmark = pytest.mark.models

_spec = importlib.util.spec_from_file_location("norm_quant_cases", pathlib.Path(__file__).with_name("test_norm_quant_cases.py"))
cases = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("norm_quant_cases", cases)
_spec.loader.exec_module(cases)

OP = torch.ops.fusewright.rms_norm_quant.default
LAYERS = 2
MODELS = ("llama", "qwen3")


@pytest.fixture(scope="module")
def captured():
    """Post-grad graph of each model, captured once."""
    pytest.importorskip("transformers")
    from fusewright.tools import model_zoo

    out = {}
    for name in MODELS:
        fn, inputs = getattr(model_zoo, name)(tokens=8, layers=LAYERS)
        graph, graph_inputs = cases.capture_post_grad(fn, inputs)
        out[name] = (fn, inputs, graph, graph_inputs)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_every_norm_quant_pair_rewritten(captured, name):
    fn, inputs, graph, graph_inputs = captured[name]
    amax_before = count_targets(graph, torch.ops.aten.amax.default)
    # 7 quantized linears per layer (q, k, v, o, gate, up, down), each quantizing its input
    assert amax_before == 7 * LAYERS
    g = snapshot(graph)
    stats = PassStats()
    PASS.run(g, PassContext(PassConfig().replace(lowering="triton"), stats))
    g.lint()
    assert (stats.matched, stats.rewritten, stats.skipped) == (2 * LAYERS, 2 * LAYERS, [])
    assert count_targets(g, OP) == 2 * LAYERS
    # left: the quantizations in front of o_proj and down_proj (no norm before them)
    assert count_targets(g, torch.ops.aten.amax.default) == 2 * LAYERS
    residual_variants = sum("+residual_input_dtype" in k for k in stats.details)
    assert residual_variants == 1  # both post-attention norms and layer 2's input norm share one spec
    # exact mode: the rewritten graph computes bitwise what the original graph computes
    want = cases.run_graph(graph, graph_inputs)
    got = cases.run_graph(g, graph_inputs)
    assert all(cases.same_bits(a, b) for a, b in zip(got, want))


def test_compiled_model_matches(captured):
    """A real Inductor compile (default config: auto -> aten on CPU) of the Llama model,
    against eager and against the compile without fusewright.

    FP8 quantization turns an ulp of difference into a quantization step now and then,
    and stock Inductor already differs from eager that way; the rewrite must not be
    further from eager than the stock compile. (Bitwise equivalence of the rewrite
    itself is the test above.)
    """
    fn, inputs, _, _ = captured["llama"]
    run = compile_and_capture(fn, inputs)
    stats = run.report["fuse_norm_quant"]
    assert (stats.rewritten, stats.skipped, stats.errors) == (2 * LAYERS, [], [])
    assert all("-> aten" in k for k in stats.details)
    stock = compile_and_capture(fn, inputs, enable=False)
    with torch.no_grad():
        eager = fn(*inputs).float()

    def dist(out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        return (out.float() - eager).abs()

    ours, theirs = dist(run.outputs), dist(stock.outputs)
    assert ours.max() <= theirs.max() and ours.mean() <= theirs.mean() * 1.1


@pytest.mark.parametrize(
    "name, rewritten, strided",
    [
        ("gemma3", 2, 0),  # (1 + w) norms; q/k norms on transposed heads are not quantized
        ("deepseek_v3", 4, 1),  # MLA's q_a/kv_a norms feed quantized q_b/kv_b; kv_a reads a split
    ],
)
def test_more_model_families(name, rewritten, strided):
    pytest.importorskip("transformers")
    from fusewright.tools import model_zoo

    fn, inputs = getattr(model_zoo, name)(tokens=8, layers=1)
    graph, graph_inputs = cases.capture_post_grad(fn, inputs)
    g = snapshot(graph)
    stats = PassStats()
    PASS.run(g, PassContext(PassConfig().replace(lowering="triton"), stats))
    g.lint()
    assert (stats.matched, stats.rewritten, stats.skipped) == (rewritten, rewritten, [])
    assert sum(v for k, v in stats.details.items() if "strided" in k) == strided
    assert count_targets(g, OP) == rewritten - strided
    want = cases.run_graph(graph, graph_inputs)
    assert all(cases.same_bits(a, b) for a, b in zip(cases.run_graph(g, graph_inputs), want))

"""A real diffusers WanTransformer3DModel (tiny config, random weights): every layer's q and k writebacks."""

import pytest
import torch

from fusewright.passes.verify import _bitwise_equal
from fusewright.testing import compile_and_capture, count_targets

pytestmark = pytest.mark.models
aten = torch.ops.aten
LAYERS = 2


@pytest.fixture(scope="module")
def wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=LAYERS, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    model = model.to(torch.bfloat16)
    # `.to(bf16)` also casts the modules the model keeps in fp32: put them back, as
    # from_pretrained(torch_dtype=bf16) would
    for name, module in model.named_modules():
        if set(name.split(".")) & set(model._keep_in_fp32_modules):
            module.float()
    assert model.rope.freqs_cos.dtype == torch.float32
    inputs = (torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16), torch.tensor([10]),
              torch.randn(1, 8, 16, dtype=torch.bfloat16))
    fn = lambda x, t, e: model(x, t, e, return_dict=False)[0]  # noqa: E731
    off = compile_and_capture(fn, inputs, enable=False)
    return fn, inputs, off


def test_wan_every_q_and_k_writeback_rewritten_bitwise(wan):
    fn, inputs, off = wan
    assert count_targets(off.graphs_before[0], aten.slice_scatter.default) == 4 * LAYERS
    config = {"lowering": {"rope": "aten"}, "strict": True, "fuse_norm_quant": False, "eliminate_noop_casts": False}
    run = compile_and_capture(fn, inputs, config=config)
    stats = run.report["rewrite_rope"]
    assert (stats.matched, stats.rewritten, stats.skipped) == (2 * LAYERS, 2 * LAYERS, [])
    assert count_targets(run.graphs_after[0], aten.slice_scatter.default) == 0
    assert _bitwise_equal(run.outputs, off.outputs)


def test_wan_fused_op_pairs_q_and_k_of_each_layer(wan):
    fn, inputs, off = wan
    config = {"lowering": {"rope": "triton"}, "strict": True, "fuse_norm_quant": False, "eliminate_noop_casts": False}
    run = compile_and_capture(fn, inputs, config=config)
    stats = run.report["rewrite_rope"]
    assert stats.details == {"strided writeback: rope[interleaved] -> triton (priority triton)": 2 * LAYERS,
                             "triton:launches": LAYERS}
    after = run.graphs_after[0]
    assert count_targets(after, aten.slice_scatter.default) == 0
    assert count_targets(after, torch.ops.fusewright.rope_qk.default) == LAYERS
    # Not bitwise: with the writeback Inductor fuses the q/k norm into the rotation and
    # keeps the normed x in f32, while the fused op reads it rounded to bf16.
    diff = (run.outputs.float() - off.outputs.float()).abs().max().item()
    assert diff <= 0.02 * off.outputs.float().abs().max().item()

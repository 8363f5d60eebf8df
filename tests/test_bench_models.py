"""`fusewright bench models`: the CPU path (`--tiny`) end to end, the kernel classification,
and that the bench's plain-torch layers compute what transformers / diffusers compute.

The timings of a `--tiny` CPU run mean nothing; what is checked is the logic the H100 run
relies on: every workload compiles three ways, the plugin fires with the expected counts,
its outputs agree with stock Inductor, and the JSON has the documented schema.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fusewright.tools import bench, bench_models, bench_models_layers
from fusewright.tools.output_code import Kernel

# FP8 rounding: a norm output rounded differently by one bf16 ulp can move a value to the
# next FP8 step (6-12% of it); through the GEMM that stays a few percent of the output norm
REL_TOL = 5e-2


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "models.json"
    parser = argparse.ArgumentParser()
    bench_models.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--phases", "prefill", "--reps", "2", "--json", str(path)])
    rc = bench_models.main(args, None)
    with open(path) as f:
        return rc, json.load(f)


def test_registered_in_bench_cli():
    assert bench.BENCHMARKS["models"] == "fusewright.tools.bench_models"


def test_tiny_run_schema_and_counts(tiny_report):
    rc, data = tiny_report
    assert rc == 0
    env = data["environment"]
    assert env["tiny"] is True and env["torch"] == torch.__version__
    rows = {r["workload"]: r for r in data["rows"]}
    assert set(rows) == {"llama", "deepseek", "wan"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["phase"] == "prefill" and r["timer"] == "wall"
        assert set(r["us"]) == {"eager", "stock", "plugin"} and all(v > 0 for v in r["us"].values())
        assert r["speedup_vs_stock"] == pytest.approx(r["us"]["stock"] / r["us"]["plugin"], rel=1e-2)
        for side in ("stock", "plugin"):
            k = r["kernels"][side]
            assert k["total"] == len(k["list"]) > 0
            assert k["nqr"] + k["other"] + k["gemm_attn"] == k["total"]
        # the norm/quant/rope kernels do not grow in number with the plugin
        assert r["kernels"]["plugin"]["nqr"] <= r["kernels"]["stock"]["nqr"]
        assert r["plugin_vs_stock"]["rel_l2"] <= REL_TOL, r["plugin_vs_stock"]
        assert r["stock_vs_eager"]["rel_l2"] <= REL_TOL, r["stock_vs_eager"]
        assert not r["errors"]
    # which rewrites fire, exactly: both Llama norms feed FP8 linears; DeepSeek's
    # q_a_layernorm feeds the group quant; Wan's q and k RoPE writebacks (its norms feed
    # no quantization, so nothing to fuse there)
    assert rows["llama"]["rewrites"] == {"fuse_norm_quant": 2}
    assert rows["deepseek"]["rewrites"] == {"fuse_norm_quant": 1}
    assert rows["wan"]["rewrites"] == {"rewrite_rope": 2}
    # stock Inductor fuses DeepSeek's norm + group quant into one C++ kernel; with the plugin
    # that kernel is fusewright's lowering of the fused op: still one, and still classified
    assert rows["deepseek"]["kernels"]["stock"]["nqr"] == 1
    assert rows["deepseek"]["kernels"]["plugin"]["nqr"] == 1
    # the GEMM stays the opaque custom op on both sides
    assert any("fp8_group_gemm" in k for k in rows["deepseek"]["kernels"]["plugin"]["list"])


def _kernel(name, kind, ops=(), body_ops=()):
    return Kernel(name=name, kind=kind, ops=list(ops), body_ops=list(body_ops))


@pytest.mark.parametrize("kernel, expected", [
    (_kernel("fusewright.rms_norm_quant", "custom_op", ["fusewright.rms_norm_quant"]), "nqr"),
    (_kernel("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton_reduction",
             ["_to_copy", "add", "mean", "mul", "pow", "rsqrt"]), "nqr"),
    (_kernel("triton_red_fused_abs_amax_mul_silu_6", "triton_reduction", ["abs", "amax", "mul", "silu"]), "nqr"),
    (_kernel("triton_poi_fused_clamp_div_mul_silu_8", "triton_pointwise", ["clamp", "div", "mul", "silu"]), "nqr"),
    (_kernel("triton_poi_fused_add_cat_mul_neg_slice_1", "triton_pointwise", ["add", "cat", "mul", "neg"]), "nqr"),
    # a fused op lowered to aten is named after unrelated origins: its body still says rsqrt
    (_kernel("cpp_fused_fp8_group_gemm_view_0", "cpp", ["fp8_group_gemm", "view"], ["mult", "sqrt", "abs"]), "nqr"),
    (_kernel("triton_poi_fused_add_view_7", "triton_pointwise", ["add", "view"], ["add"]), "other"),
    (_kernel("triton_poi_fused_mul_silu_3", "triton_pointwise", ["mul", "silu"], ["sigmoid", "mul"]), "other"),
    (_kernel("_scaled_mm", "extern", ["_scaled_mm"]), "gemm_attn"),
    (_kernel("aten._scaled_dot_product_flash_attention", "aten_fallback", ["_scaled_dot_product_flash_attention"]),
     "gemm_attn"),
])
def test_classify(kernel, expected):
    assert bench_models.classify(kernel) == expected


def test_cases_put_large_shapes_first():
    order = bench_models.cases(bench_models.FULL, ["llama", "deepseek", "wan"])
    assert order[:3] == [("llama", "prefill", 4096), ("deepseek", "prefill", 4096), ("wan", "prefill", 16384)]
    assert ("llama", "decode", 64) == order[-1] and len(order) == 9


def test_deepseek_act_quant_matches_blockwise_math():
    x = torch.randn(4, 256, dtype=torch.bfloat16) * 3
    q, s = bench_models_layers.deepseek_act_quant(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 2)
    blocks = x.float().view(4, 2, 128)
    want_s = blocks.abs().amax(-1).clamp(min=1e-4) / 448.0
    torch.testing.assert_close(s, want_s)
    back = q.float().view(4, 2, 128) * s.view(4, 2, 1)
    torch.testing.assert_close(back, blocks, rtol=0.07, atol=1e-3)


def test_group_gemm_reference_is_the_dequantized_product():
    torch.manual_seed(0)
    mod = bench_models_layers.DeepSeekQPath(256, 2, 192)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    q, s = bench_models_layers.deepseek_act_quant(x)
    out = bench_models_layers.fp8_group_gemm(q, s, mod.weight_fp8, mod.weight_scale)
    w = mod.weight_fp8.float().view(3, 128, 2, 128) * mod.weight_scale.view(3, 1, 2, 1)
    a = q.float().view(3, 2, 128) * s.view(3, 2, 1)
    want = a.reshape(3, 256).to(torch.bfloat16).float() @ w.reshape(384, 256).to(torch.bfloat16).float().t()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.models
def test_wan_block_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    torch.manual_seed(0)
    ours = bench_models_layers.WanSelfAttention(256, 2).to(torch.bfloat16).eval()
    theirs = WanAttention(256, heads=2, dim_head=128, eps=1e-6, processor=WanAttnProcessor()).to(torch.bfloat16).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 24, 256, dtype=torch.bfloat16)
    cos, sin = bench_models_layers.wan_rope_tables(24, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), theirs(x, rotary_emb=(cos, sin)), rtol=0, atol=0)


@pytest.mark.models
@pytest.mark.parametrize("workload", ["llama", "llama_repeat_kv"])  # SDPA with enable_gqa, and repeat_kv
def test_llama_layer_matches_transformers(workload):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fusewright.tools.model_zoo import Float8RowwiseScaledMMLinear

    cfg = bench_models.TINY[workload]
    config = LlamaConfig(hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                         intermediate_size=cfg["inter"], rms_norm_eps=cfg["eps"], vocab_size=128)
    config._attn_implementation = "sdpa"
    fn, (x, cos, sin), _ = bench_models.build(workload, cfg, 16, "cpu")
    theirs = LlamaDecoderLayer(config, layer_idx=0).eval()
    for p in theirs.parameters():
        p.data = p.data.to(torch.bfloat16)
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for n in names:  # the same FP8 linears (torchao spelling) in both layers
            assert isinstance(getattr(fn, n), Float8RowwiseScaledMMLinear)
            setattr(getattr(theirs, part), n, getattr(fn, n))
    theirs.input_layernorm.weight.data.copy_(fn.input_layernorm.weight)
    theirs.post_attention_layernorm.weight.data.copy_(fn.post_attention_layernorm.weight)
    with torch.no_grad():
        out = theirs(x, attention_mask=None, position_embeddings=(cos, sin))
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(fn(x, cos, sin), out, rtol=1e-2, atol=1e-2)

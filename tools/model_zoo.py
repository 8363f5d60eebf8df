"""Real third-party models, built small from configs with random weights (no downloads).

Used by the model-corpus tests and by `fusewright bench models`. Every builder returns
`(fn, example_inputs)`, the same factory form graph-diff takes, so any of them can be
inspected with `fusewright graph-diff fusewright.tools.model_zoo:llama`.

FP8 activation quantization in front of the linears is written the way torchao's
float8 rowwise inference path spells it (amax over the last dim, `amax / finfo.max`,
a clamp floor, `x.f32 / scale`, clamp, cast), in plain torch: torchao itself needs
CUDA-only kernels for the matmul, and only the quantization matters to the graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn


def fp8_rowwise_quantize(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao float8 rowwise activation quantization (inference), in plain torch."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = amax.to(torch.float32) / torch.finfo(FP8).max
    scale = torch.clamp(scale, min=eps)
    fp8_max = torch.finfo(FP8).max
    q = (x.to(torch.float32) / scale).clamp(-fp8_max, fp8_max).to(FP8)
    return q, scale


class Float8RowwiseLinear(nn.Module):
    """A linear whose input is quantized to FP8 per row (token) before the matmul.

    The matmul itself runs on the dequantized input (CPU has no FP8 GEMM); on a GPU a
    serving stack would call a scaled matmul on `q` and `scale` directly.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = fp8_rowwise_quantize(x)
        return nn.functional.linear((q.to(torch.float32) * scale).to(x.dtype), self.weight, self.bias)


class Float8RowwiseScaledMMLinear(nn.Module):
    """Float8RowwiseLinear with FP8 weights (rowwise scales) and, on CUDA, `torch._scaled_mm`.

    The activation quantization is the same torchao spelling (`fp8_rowwise_quantize`); the
    quantized activation is flattened to 2-D and multiplied with `torch._scaled_mm` and
    rowwise scales (`scale_a` `[M, 1]`, `scale_b` `[1, N]`, both f32), as torchao's rowwise
    inference does on Hopper. On CPU, which has no FP8 GEMM, both operands are dequantized
    and multiplied in f32: the graph in front of the matmul is the same either way.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w_q, w_scale = fp8_rowwise_quantize(linear.weight.detach())
        self.register_buffer("weight_fp8", w_q)
        self.register_buffer("weight_scale", w_scale.reshape(1, -1).contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = fp8_rowwise_quantize(x)
        q2, s2 = q.reshape(-1, q.shape[-1]), scale.reshape(-1, 1)
        if q2.is_cuda:
            out = torch._scaled_mm(q2, self.weight_fp8.t(), scale_a=s2, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=x.dtype)
        else:
            w = self.weight_fp8.to(torch.float32) * self.weight_scale.t()
            out = ((q2.to(torch.float32) * s2) @ w.t()).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear under `module` (except names containing a `skip` item)."""
    for name, child in list(module.named_modules()):
        for attr, grandchild in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(grandchild, nn.Linear) and not any(s in full for s in skip):
                setattr(child, attr, Float8RowwiseLinear(grandchild))
    return module


# ------------------------------------------------------------------ transformers
def _causal_lm_layers(config: Any, model_cls: Any, tokens: int) -> tuple[Callable, tuple]:
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16).eval()
    for layer in model.layers:
        quantize_linears(layer, skip=("gate.", "router"))
    ids = torch.randint(0, config.vocab_size, (1, tokens))

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids).last_hidden_state

    return fn, (ids,)


_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2)


def llama(tokens: int = 8, layers: int = 1):
    from transformers import LlamaConfig, LlamaModel

    return _causal_lm_layers(LlamaConfig(**{**_SMALL, "num_hidden_layers": layers}), LlamaModel, tokens)


def qwen3(tokens: int = 8, layers: int = 1):
    from transformers import Qwen3Config, Qwen3Model

    return _causal_lm_layers(Qwen3Config(**{**_SMALL, "num_hidden_layers": layers}, head_dim=16), Qwen3Model, tokens)


def mistral(tokens: int = 8, layers: int = 1):
    from transformers import MistralConfig, MistralModel

    return _causal_lm_layers(MistralConfig(**{**_SMALL, "num_hidden_layers": layers}), MistralModel, tokens)


def gemma3(tokens: int = 8, layers: int = 1):
    from transformers import Gemma3TextConfig, Gemma3TextModel

    config = Gemma3TextConfig(**{**_SMALL, "num_hidden_layers": layers}, head_dim=16)
    return _causal_lm_layers(config, Gemma3TextModel, tokens)


def deepseek_v3(tokens: int = 8, layers: int = 1):
    """A DeepSeek-V3-style MLA decoder layer (dense MLP: first_k_dense_replace covers it)."""
    from transformers import DeepseekV3Config, DeepseekV3Model

    config = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=layers, first_k_dense_replace=layers, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1,
    )
    return _causal_lm_layers(config, DeepseekV3Model, tokens)


# ------------------------------------------------------------------ diffusers
def _keep_fp32_modules(model: nn.Module) -> nn.Module:
    """`.to(bf16)` also casts the modules a model keeps in fp32; put them back."""
    patterns = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        # A pattern names a module (`norm1`) or a parameter (`scale_shift_table`).
        if patterns & set(name.split(".")):
            param.data = param.data.to(torch.float32)
    return model


def wan(frames: int = 2, size: int = 8):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=1,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    model = _keep_fp32_modules(model.to(torch.bfloat16)).eval()
    latents = torch.randn(1, 4, frames, size, size, dtype=torch.bfloat16)
    timestep = torch.tensor([500])
    text = torch.randn(1, 6, 16, dtype=torch.bfloat16)

    def fn(hidden_states, timestep, encoder_hidden_states):
        return model(hidden_states=hidden_states, timestep=timestep,
                     encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    return fn, (latents, timestep, text)


def flux(size: int = 4):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).to(torch.bfloat16).eval()
    tokens = size * size
    hidden = torch.randn(1, tokens, 4, dtype=torch.bfloat16)
    text = torch.randn(1, 6, 32, dtype=torch.bfloat16)
    pooled = torch.randn(1, 32, dtype=torch.bfloat16)
    img_ids = torch.randn(tokens, 3)
    txt_ids = torch.randn(6, 3)
    timestep = torch.tensor([1.0], dtype=torch.bfloat16)

    def fn(hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids, timestep):
        return model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                     pooled_projections=pooled_projections, img_ids=img_ids, txt_ids=txt_ids,
                     timestep=timestep, return_dict=False)[0]

    return fn, (hidden, text, pooled, img_ids, txt_ids, timestep)


def hunyuan_video(frames: int = 2, size: int = 4):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).to(torch.bfloat16).eval()
    latents = torch.randn(1, 4, frames, size, size, dtype=torch.bfloat16)
    timestep = torch.tensor([500])
    text = torch.randn(1, 6, 16, dtype=torch.bfloat16)
    mask = torch.ones(1, 6, dtype=torch.bool)
    pooled = torch.randn(1, 8, dtype=torch.bfloat16)
    guidance = torch.tensor([1000.0], dtype=torch.bfloat16)

    def fn(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections, guidance):
        return model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                     encoder_attention_mask=encoder_attention_mask, pooled_projections=pooled_projections,
                     guidance=guidance, return_dict=False)[0]

    return fn, (latents, timestep, text, mask, pooled, guidance)


MODELS = {
    "llama": llama,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma3": gemma3,
    "deepseek_v3": deepseek_v3,
    "wan": wan,
    "flux": flux,
    "hunyuan_video": hunyuan_video,
}

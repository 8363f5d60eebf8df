"""The layers `fusewright bench models` times, in plain torch that mirrors the third-party
spellings (transformers' Llama, DeepSeek-V3's q path and `act_quant`, diffusers' Wan
attention), so the GPU machine needs neither transformers nor diffusers. Shapes and the
workloads that use them: tools/bench_models.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import model_zoo

FP8 = model_zoo.FP8
FP8_MAX = 448.0
BF16 = torch.bfloat16
GROUP = 128


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: upcast, normalise, cast back, then the bf16 weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, kvh, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


class LlamaLayer(nn.Module):
    """One Llama decoder layer as transformers writes it, FP8 rowwise linears (torchao spelling).

    `attention`: "gqa" is transformers 5's SDPA path on CUDA without a padding mask
    (`sdpa_attention_forward`: `enable_gqa=True`, k and v stay at the KV heads); "repeat_kv"
    is its fallback (and older releases' only path): k and v expanded to every head first.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, eps: float,
                 attention: str = "gqa") -> None:
        super().__init__()
        if attention not in ("gqa", "repeat_kv"):
            raise ValueError(f"attention must be 'gqa' or 'repeat_kv', got {attention!r}")
        self.heads, self.kv_heads, self.head_dim, self.attention = heads, kv_heads, head_dim, attention

        def lin(i, o):
            layer = nn.Linear(i, o, bias=False)
            nn.init.normal_(layer.weight, std=0.02)
            return model_zoo.Float8RowwiseScaledMMLinear(layer)

        self.input_layernorm = LlamaRMSNorm(hidden, eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps)
        self.q_proj, self.k_proj = lin(hidden, heads * head_dim), lin(hidden, kv_heads * head_dim)
        self.v_proj, self.o_proj = lin(hidden, kv_heads * head_dim), lin(heads * head_dim, hidden)
        self.gate_proj, self.up_proj, self.down_proj = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        residual = x
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        n_rep = self.heads // self.kv_heads
        if self.attention == "repeat_kv" or n_rep == 1:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=self.head_dim ** -0.5)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=self.head_dim ** -0.5, enable_gqa=True)
        a = a.transpose(1, 2).contiguous().reshape(b, s, -1)
        x = residual + self.o_proj(a)
        residual = x
        h = self.post_attention_layernorm(x)
        h = self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return residual + h


def llama_rope_tables(tokens: int, head_dim: int, start: int = 0, theta: float = 500000.0):
    """cos/sin `[1, T, D]` in bf16, as LlamaRotaryEmbedding returns them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + tokens, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(BF16), emb.sin().to(BF16)


# ---------------------------------------------------------------- DeepSeek q path
_BLOCKWISE_OK: set = set()  # (M, K, N) shapes where blockwise torch._scaled_mm matched the reference
_BLOCKWISE_FORM: dict = {}  # "form" -> index of the scale layout that worked
_DEQUANT_W: dict = {}  # weight data_ptr -> bf16 dequantized weight (fallback path)


def _dequant_weight(w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    key = (w.data_ptr(), ws.data_ptr(), w.device.type)
    if key not in _DEQUANT_W:
        n, k = w.shape
        full = w.to(torch.float32).view(n // GROUP, GROUP, k // GROUP, GROUP) * ws.view(n // GROUP, 1, k // GROUP, 1)
        _DEQUANT_W[key] = full.reshape(n, k).to(BF16)
    return _DEQUANT_W[key]


def _blockwise_forms(q, s, w, ws):
    """Scale layouts to try for blockwise (1x128 activation, 128x128 weight) `_scaled_mm`."""
    s_col = s.t().contiguous().t()  # the 1x128 scales outer-dim-major
    return [
        lambda: torch._scaled_mm(q, w.t(), scale_a=s_col, scale_b=ws.t(), out_dtype=BF16),
        lambda: torch._scaled_mm(q, w.t(), scale_a=s_col, scale_b=ws, out_dtype=BF16),
        lambda: torch._scaled_mm(q, w.t(), scale_a=s, scale_b=ws.t(), out_dtype=BF16),
    ]


def _group_gemm_reference(q, s, w, ws):
    t, k = q.shape
    a = (q.to(torch.float32).view(t, k // GROUP, GROUP) * s.view(t, k // GROUP, 1)).reshape(t, k).to(BF16)
    return a @ _dequant_weight(w, ws).t()


def _fp8_group_gemm_impl(q: torch.Tensor, s: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    if q.is_cuda and (q.shape[0], q.shape[1], w.shape[0]) in _BLOCKWISE_OK:
        return _blockwise_forms(q, s, w, ws)[_BLOCKWISE_FORM["form"]]()
    return _group_gemm_reference(q, s, w, ws)


def _define_group_gemm():
    try:
        return torch.ops.fwbench_models.fp8_group_gemm.default
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("fwbench_models::fp8_group_gemm", mutates_args=())(_fp8_group_gemm_impl)

    @op.register_fake
    def _(q, s, w, ws):
        return q.new_empty((q.shape[0], w.shape[0]), dtype=BF16)

    return torch.ops.fwbench_models.fp8_group_gemm.default


fp8_group_gemm = _define_group_gemm()


def probe_blockwise(m: int, k: int, n: int, device: str) -> str:
    """Try blockwise `_scaled_mm` at this shape; record it if it matches the dequantized GEMM."""
    if device != "cuda":
        return "dequant"
    g = torch.Generator(device="cpu").manual_seed(1)
    q = (torch.randn(m, k, generator=g) * 50).clamp(-448, 448).to(FP8).to(device)
    s = (torch.rand(m, k // GROUP, generator=g) + 0.5).to(device)
    w = (torch.randn(n, k, generator=g) * 50).clamp(-448, 448).to(FP8).to(device)
    ws = (torch.rand(n // GROUP, k // GROUP, generator=g) + 0.5).to(device)
    ref = _group_gemm_reference(q, s, w, ws).float()
    _DEQUANT_W.clear()
    forms = _blockwise_forms(q, s, w, ws)
    order = [_BLOCKWISE_FORM["form"]] if "form" in _BLOCKWISE_FORM else range(len(forms))
    for i in order:
        try:
            out = forms[i]().float()
        except Exception:  # not supported by this build / shape: the next layout, or the fallback
            continue
        if ((out - ref).norm() / ref.norm()).item() < 1e-2:
            _BLOCKWISE_FORM["form"] = i
            _BLOCKWISE_OK.add((m, k, n))
            return f"blockwise_scaled_mm[{i}]"
    return "dequant"


def deepseek_act_quant(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 `act_quant` math in torch: per 128-block f32 amax (floor 1e-4), s = amax/448, x/s."""
    t, k = x.shape
    xf = x.to(torch.float32).view(t, k // group, group)
    amax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = amax / FP8_MAX
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(t, k), s.view(t, k // group)


class DeepSeekQPath(nn.Module):
    """q_a_layernorm -> group-128 FP8 -> q_b_proj (FP8 weight, 128x128 block scales)."""

    def __init__(self, q_lora_rank: int, heads: int, qk_head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=eps)
        n = heads * qk_head_dim
        w = torch.randn(n, q_lora_rank) * 0.02
        blocks = w.view(n // GROUP, GROUP, q_lora_rank // GROUP, GROUP)
        ws = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / FP8_MAX
        wq = (blocks / ws.view(n // GROUP, 1, q_lora_rank // GROUP, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.register_buffer("weight_fp8", wq.reshape(n, q_lora_rank))
        self.register_buffer("weight_scale", ws.contiguous())
        self.heads, self.qk_head_dim = heads, qk_head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q_a_layernorm(x)
        q, s = deepseek_act_quant(h)
        out = fp8_group_gemm(q, s, self.weight_fp8, self.weight_scale)
        return out.view(x.shape[0], self.heads, self.qk_head_dim)


# ------------------------------------------------------------------------ Wan attention
def wan_apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
    """diffusers WanAttnProcessor's apply_rotary_emb, as written there."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSelfAttention(nn.Module):
    """diffusers WanAttention + WanAttnProcessor (self-attention, native SDPA backend)."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        for lin in (self.to_q, self.to_k, self.to_v, self.to_out[0]):
            nn.init.normal_(lin.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
        query, key, value = self.to_q(hidden_states), self.to_k(hidden_states), self.to_v(hidden_states)
        query, key = self.norm_q(query), self.norm_k(key)
        query = query.unflatten(2, (self.heads, -1))
        key = key.unflatten(2, (self.heads, -1))
        value = value.unflatten(2, (self.heads, -1))
        query = wan_apply_rotary_emb(query, freqs_cos, freqs_sin)
        key = wan_apply_rotary_emb(key, freqs_cos, freqs_sin)
        # diffusers' native attention backend: [B, S, H, D] -> [B, H, S, D] and back
        out = F.scaled_dot_product_attention(query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3),
                                             value.permute(0, 2, 1, 3), dropout_p=0.0, is_causal=False)
        out = out.permute(0, 2, 1, 3).flatten(2, 3).type_as(query)
        out = self.to_out[0](out)
        return self.to_out[1](out)


def wan_rope_tables(seq: int, head_dim: int, theta: float = 10000.0):
    """freqs_cos/freqs_sin `[1, S, 1, D]` f32, each frequency repeated twice (WanRotaryPosEmbed)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    cos = freqs.cos().repeat_interleave(2, dim=-1).float()
    sin = freqs.sin().repeat_interleave(2, dim=-1).float()
    return cos[None, :, None, :], sin[None, :, None, :]

"""The built-in example that `fusewright graph-diff` compiles when given no target.

A small transformer block holding one instance of each construct fusewright rewrites,
spelled the way real models spell them:

* an RMSNorm (Llama spelling) followed by dynamic per-token FP8 quantization
  (vLLM's native spelling), dequantized into a linear;
* a strided RoPE writeback (diffusers' Wan spelling): `out[..., 0::2] = ...`;
* a bf16 -> f32 -> (layout op) -> bf16 round trip in front of an opaque custom op.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@torch.library.custom_op("fusewright_example::opaque_gate", mutates_args=())
def opaque_gate(x: torch.Tensor) -> torch.Tensor:
    """Stands for a vendor kernel that Inductor cannot see into."""
    return x * torch.sigmoid(x)


@opaque_gate.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class ExampleBlock(nn.Module):
    def __init__(self, hidden: int = 256, heads: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden) + 0.1 * torch.randn(hidden))
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.norm_weight * h.to(x.dtype)

    @staticmethod
    def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = x.abs().amax(-1, keepdim=True).to(torch.float32)
        scale = (amax / FP8_MAX).clamp(min=1.0 / (FP8_MAX * 512.0))
        q = (x.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q, scale

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out.type_as(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, scale = self.quant_fp8_per_token(self.rms_norm(x))
        y = self.proj((q.to(torch.float32) * scale).to(x.dtype))
        y = self.rope(y.unflatten(-1, (self.heads, -1)), cos, sin)
        wide = y.to(torch.float32)
        return opaque_gate(wide.flatten(-2).to(x.dtype))


def rope_tables(seq: int, head_dim: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """f32 cos/sin of shape [seq, 1, head_dim/2], as diffusion transformers keep them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)[:, None, :]
    return angles.cos().to(device), angles.sin().to(device)


def example(device: str | None = None):
    """Factory in graph-diff's target form: returns `(model, example_inputs)`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hidden, heads, seq = 256, 4, 32
    model = ExampleBlock(hidden, heads).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(2, seq, hidden, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(seq, hidden // heads, device)
    return model, (x, cos, sin)

"""A tensor-parallel, Llama-shaped decoder layer written the way torch.distributed users write it.

Column-parallel fused QKV and gate/up projections, row-parallel output and down
projections followed by a functional all-reduce (`torch.distributed._functional_collectives`,
which torch.compile captures as `_c10d_functional.all_reduce` + `wait_tensor`), the
residual add right after each all-reduce, RMSNorm (Llama spelling) in front of FP8
rowwise activation quantization (torchao's spelling), and a bf16 -> f32 -> bf16 round
trip on the all-reduced value in front of an opaque op: the case where a serving stack
lost about 1 ms per decode step.

`TPDecoderLayer(world_size=1)` holds the full weights; `shard(rank, world_size)` gives a
rank's layer, so a test can compare every rank with the single-process layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .example import opaque_gate
from .model_zoo import fp8_rowwise_quantize


def _all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    q, scale = fp8_rowwise_quantize(x)
    return F.linear((q.to(torch.float32) * scale).to(x.dtype), weight)


class TPDecoderLayer(nn.Module):
    def __init__(self, hidden: int = 128, heads: int = 4, intermediate: int = 256, world_size: int = 1,
                 eps: float = 1e-6) -> None:
        super().__init__()
        assert heads % world_size == 0 and intermediate % world_size == 0
        self.hidden, self.heads, self.world_size, self.eps = hidden, heads, world_size, eps
        self.head_dim = hidden // heads
        local_heads, local_inter = heads // world_size, intermediate // world_size
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.post_norm = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Parameter(torch.empty(3 * local_heads * self.head_dim, hidden))  # column-parallel
        self.o = nn.Parameter(torch.empty(hidden, local_heads * self.head_dim))  # row-parallel
        self.gate_up = nn.Parameter(torch.empty(2 * local_inter, hidden))  # column-parallel
        self.down = nn.Parameter(torch.empty(hidden, local_inter))  # row-parallel

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = _fp8_linear(self.rms_norm(x, self.input_norm), self.qkv).chunk(3, dim=-1)
        q, k, v = (t.view(tokens, -1, self.head_dim).transpose(0, 1) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(0, 1).reshape(tokens, -1)
        h = x + _all_reduce(_fp8_linear(attn, self.o), self.world_size)
        gate, up = _fp8_linear(self.rms_norm(h, self.post_norm), self.gate_up).chunk(2, dim=-1)
        mlp = _all_reduce(_fp8_linear(F.silu(gate) * up, self.down), self.world_size)
        # The round trip a fused-op rewrite leaves behind, here on the all-reduced value
        # (through a layout op, which is what keeps Inductor from removing it itself).
        wide = mlp.to(torch.float32).view(tokens, 2, -1)
        return h + opaque_gate(wide.to(x.dtype)).view(tokens, -1)

    def shard(self, rank: int, world_size: int) -> "TPDecoderLayer":
        """This layer's weights as rank `rank` of `world_size` holds them."""
        local = TPDecoderLayer(self.hidden, self.heads, self.gate_up.shape[0] // 2, world_size, self.eps)
        local = local.to(dtype=self.qkv.dtype, device=self.qkv.device)

        def rows(t: torch.Tensor, parts: int) -> torch.Tensor:
            # A fused weight is `parts` stacked blocks: shard each block by rows.
            return torch.cat([blk.chunk(world_size, 0)[rank] for blk in t.chunk(parts, 0)], 0)

        with torch.no_grad():
            local.input_norm.copy_(self.input_norm)
            local.post_norm.copy_(self.post_norm)
            local.qkv.copy_(rows(self.qkv, 3))
            local.o.copy_(self.o.chunk(world_size, 1)[rank])
            local.gate_up.copy_(rows(self.gate_up, 2))
            local.down.copy_(self.down.chunk(world_size, 1)[rank])
        return local


def full_layer(hidden: int = 128, heads: int = 4, intermediate: int = 256, seed: int = 0) -> TPDecoderLayer:
    torch.manual_seed(seed)
    layer = TPDecoderLayer(hidden, heads, intermediate)
    with torch.no_grad():
        for p in (layer.qkv, layer.o, layer.gate_up, layer.down):
            p.normal_(0, hidden ** -0.5)
        layer.input_norm.normal_(1, 0.1)
        layer.post_norm.normal_(1, 0.1)
    return layer.to(torch.bfloat16).eval()

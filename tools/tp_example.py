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
`kv_heads < heads` gives grouped-query attention (Llama-3: 32 query heads, 8 KV heads):
the fused QKV weight is then `[q; k; v]` blocks of unequal height, each sharded by rows.
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
                 eps: float = 1e-6, kv_heads: int | None = None) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % world_size or kv_heads % world_size or intermediate % world_size or heads % kv_heads:
            raise ValueError(f"heads={heads}, kv_heads={kv_heads}, intermediate={intermediate} do not shard "
                             f"over world_size={world_size} (or heads is not a multiple of kv_heads)")
        self.hidden, self.heads, self.kv_heads, self.world_size, self.eps = hidden, heads, kv_heads, world_size, eps
        self.head_dim = hidden // heads
        local_heads, local_inter = heads // world_size, intermediate // world_size
        self.local_heads, self.local_kv = local_heads, kv_heads // world_size
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.post_norm = nn.Parameter(torch.ones(hidden))
        qkv_rows = (local_heads + 2 * self.local_kv) * self.head_dim
        self.qkv = nn.Parameter(torch.empty(qkv_rows, hidden))  # column-parallel
        self.o = nn.Parameter(torch.empty(hidden, local_heads * self.head_dim))  # row-parallel
        self.gate_up = nn.Parameter(torch.empty(2 * local_inter, hidden))  # column-parallel
        self.down = nn.Parameter(torch.empty(hidden, local_inter))  # row-parallel

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = _fp8_linear(self.rms_norm(x, self.input_norm), self.qkv)
        if self.local_kv == self.local_heads:
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            kv_width = self.local_kv * self.head_dim
            q, k, v = qkv.split([self.local_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q, k, v = (t.view(tokens, -1, self.head_dim).transpose(0, 1) for t in (q, k, v))
        if self.local_kv != self.local_heads:  # repeat each KV head for its query group (HF's repeat_kv)
            rep = self.local_heads // self.local_kv
            k, v = (t[:, None].expand(self.local_kv, rep, tokens, self.head_dim)
                    .reshape(self.local_heads, tokens, self.head_dim) for t in (k, v))
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
        local = TPDecoderLayer(self.hidden, self.heads, self.gate_up.shape[0] // 2, world_size, self.eps,
                               self.kv_heads)
        local = local.to(dtype=self.qkv.dtype, device=self.qkv.device)

        def rows(t: torch.Tensor, parts: int | list[int]) -> torch.Tensor:
            # A fused weight is stacked blocks (`parts` equal ones, or these heights): shard each by rows.
            blocks = t.chunk(parts, 0) if isinstance(parts, int) else t.split(parts, 0)
            return torch.cat([blk.chunk(world_size, 0)[rank] for blk in blocks], 0)

        with torch.no_grad():
            local.input_norm.copy_(self.input_norm)
            local.post_norm.copy_(self.post_norm)
            q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
            local.qkv.copy_(rows(self.qkv, [q_rows, kv_rows, kv_rows]))
            local.o.copy_(self.o.chunk(world_size, 1)[rank])
            local.gate_up.copy_(rows(self.gate_up, 2))
            local.down.copy_(self.down.chunk(world_size, 1)[rank])
        return local


def full_layer(hidden: int = 128, heads: int = 4, intermediate: int = 256, seed: int = 0,
               kv_heads: int | None = None, device: str | torch.device = "cpu") -> TPDecoderLayer:
    """The single-process layer with random weights (the same on every rank for one seed and device)."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it runs: 8B-sized weights are slow to fill on a CPU
        layer = TPDecoderLayer(hidden, heads, intermediate, kv_heads=kv_heads)
    with torch.no_grad():
        for p in (layer.qkv, layer.o, layer.gate_up, layer.down):
            p.normal_(0, hidden ** -0.5)
        layer.input_norm.normal_(1, 0.1)
        layer.post_norm.normal_(1, 0.1)
    return layer.to(torch.bfloat16).eval()


def tp_layer(device: str | None = None):
    """graph-diff factory for a run under torchrun: this rank's shard of a small layer and its input.

        torchrun --nproc-per-node 2 -m fusewright graph-diff fusewright.tools.tp_example:tp_layer \\
            --json diff_rank{rank}.json

    Initialises the default process group from torchrun's environment (gloo on CPU, NCCL
    on CUDA) unless one exists; every rank gets the same input.
    """
    import os

    import torch.distributed as dist

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("tp_layer: run under torchrun (RANK and WORLD_SIZE unset)")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    layer = full_layer(128, heads=4, intermediate=256, kv_heads=2, device=device).shard(rank, world)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(16, 128, dtype=torch.bfloat16, device=device, generator=gen)
    return layer, (x,)

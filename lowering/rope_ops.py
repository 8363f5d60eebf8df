"""`torch.ops.fusewright.rope` / `rope_qk`: fused RoPE as torch.library ops (registered as `triton` in `rope_lowering`).

    out = torch.ops.fusewright.rope(x, cos, sin, interleaved)
    q_out, k_out = torch.ops.fusewright.rope_qk(q, k, cos, sin, interleaved)

x/q/k: `[..., D]` (D even) with a unit stride on D; cos/sin: half-width tables
broadcastable to `x[..., : D/2]` (a view sliced inline from a full-width table is
fine). interleaved: pairs `(x[2i], x[2i+1])`; otherwise neox pairs `(x[i], x[i+D/2])`.
Outputs are contiguous, in x's dtype. The math: `o1 = x1*cos - x2*sin`,
`o2 = x1*sin + x2*cos` in f32, rounded once.

Implementations: CUDA runs the Triton kernel (`rope_triton`) through
`torch.library.triton_op` + `wrap_triton`, so Inductor can see the kernel when a
model calls the op itself; CPU (and any other device) runs the reference below,
which is also the numerical definition; the fake impl gives shapes to the compiler.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from . import rope_triton


# ------------------------------------------------------------------ reference
def _halves(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The definition: f32 products and sums, one rounding to x's dtype."""
    x1, x2 = (h.to(torch.float32) for h in _halves(x, interleaved))
    c, s = cos.to(torch.float32), sin.to(torch.float32)
    o1 = x1 * c - x2 * s
    o2 = x1 * s + x2 * c
    out = torch.stack((o1, o2), -1).flatten(-2) if interleaved else torch.cat((o1, o2), -1)
    return out.to(x.dtype)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str = "x") -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"fusewright.rope: {name} must have an even last dim, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"fusewright.rope: {name} must be floating point, got {x.dtype}")
    half = list(x.shape[:-1]) + [x.shape[-1] // 2]
    for tname, t in (("cos", cos), ("sin", sin)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"fusewright.rope: {tname} must be floating point, got {t.dtype}")
        try:
            torch.broadcast_shapes(tuple(t.shape), tuple(half))
        except RuntimeError:
            raise ValueError(
                f"fusewright.rope: {tname} of shape {tuple(t.shape)} does not broadcast to half of "
                f"{name} {tuple(half)}"
            ) from None
        if torch.broadcast_shapes(tuple(t.shape), tuple(half)) != torch.Size(half):
            raise ValueError(f"fusewright.rope: {tname} of shape {tuple(t.shape)} is larger than half of {name} {tuple(half)}")


# ----------------------------------------------------------------- the kernel path
def _as4d(x: torch.Tensor) -> torch.Tensor:
    """[..., H, D] -> [d0, d1, H, D]: pad leading dims with 1, fold extra ones into d0."""
    while x.dim() < 4:
        x = x.unsqueeze(0)
    if x.dim() > 4:
        x = x.reshape(-1, *x.shape[-3:])
    return x


def _tables4d(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    half = list(x.shape[:-1]) + [x.shape[-1] // 2]
    return _as4d(t.expand(half))


def _launch(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    if q.device.type != "cuda":
        # torch.compile traces a triton_op's body on every device: elsewhere than CUDA
        # the body is the reference math, which Inductor compiles like any other code.
        outs = [rope_reference(t, cos, sin, interleaved).contiguous() for t in (q, k) if t is not None]
        return outs[0], (outs[1] if k is not None else None)
    q4 = _as4d(q if q.stride(-1) == 1 else q.contiguous())
    k4 = None if k is None else _as4d(k if k.stride(-1) == 1 else k.contiguous())
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    c4, s4 = _tables4d(cos, q), _tables4d(sin, q)
    # Eager launches may switch FMA contraction off (each product rounded, as eager
    # PyTorch does); the traced path cannot pass that option through wrap_triton.
    eager = type(q) is torch.Tensor
    rope_triton.launch(
        wrap_triton(rope_triton.rope_kernel), q4, _as4d(qo), k4, None if ko is None else _as4d(ko),
        c4, s4, interleaved=interleaved, fp_fusion=not eager,
    )
    return qo, ko


def _check_qk(q, k, cos, sin):
    _check(q, cos, sin, "q")
    _check(k, cos, sin, "k")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1] or q.dtype != k.dtype:
        raise ValueError(
            f"fusewright.rope_qk: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must share "
            "dtype, head width and every dim but the head count"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if q.shape[-2] != k.shape[-2] and t.dim() >= 2 and t.shape[-2] != 1:
            raise ValueError(f"fusewright.rope_qk: {name} varies per head but q and k have different head counts")


@triton_op("fusewright::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    _check(x, cos, sin)
    return _launch(x, None, cos, sin, interleaved)[0]


@triton_op("fusewright::rope_qk", mutates_args=())
def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_qk(q, k, cos, sin)
    return _launch(q, k, cos, sin, interleaved)


@rope.register_kernel("cpu")
def _rope_cpu(x, cos, sin, interleaved):
    _check(x, cos, sin)
    return rope_reference(x, cos, sin, interleaved).contiguous()


@rope_qk.register_kernel("cpu")
def _rope_qk_cpu(q, k, cos, sin, interleaved):
    _check_qk(q, k, cos, sin)
    return (rope_reference(q, cos, sin, interleaved).contiguous(),
            rope_reference(k, cos, sin, interleaved).contiguous())


@rope.register_fake
def _rope_fake(x, cos, sin, interleaved):
    _check(x, cos, sin)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@rope_qk.register_fake
def _rope_qk_fake(q, k, cos, sin, interleaved):
    _check_qk(q, k, cos, sin)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def run_interpreted(q, k, cos, sin, interleaved: bool, **launch_kwargs):
    """Run the Triton kernel itself on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    kernel = rope_triton.interpreted_kernel()
    tensors = [q] if k is None else [q, k]
    outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    c4, s4 = _tables4d(cos, q), _tables4d(sin, q)
    rope_triton.launch(kernel, _as4d(q), _as4d(outs[0]), None if k is None else _as4d(k),
                       None if k is None else _as4d(outs[1]), c4, s4, interleaved=interleaved, **launch_kwargs)
    return outs

"""Fused RMSNorm (and residual add + RMSNorm) Triton kernel, numerically the `aten` lowering.

One program normalises ROWS rows of H columns held in registers as a
``[ROWS, BLOCK_H]`` tile (BLOCK_H = next_pow2(H), masked; ROWS > 1 only for small H, so
a program still moves a few thousand elements). x is read once, y (and the new residual)
written once; nothing is read back to the host, the token count M is a runtime
argument (one compiled kernel for every batch size; CUDA-graph safe).

Numerics, step by step as `lowering/rms_norm_aten.py` spells it:

    s   = RN_dtype(x + residual)                    (fused-add form; stored as the new residual)
    h   = f32(x or s)
    v   = RN(RN(sum(h*h)) / H) + f32(eps)           (true division; eps cast to f32 here)
    r   = rsqrt(v), correctly rounded to f32        (f64 rsqrt rounded once)
    n   = RN_dtype(h * r)                           (one rounding to x's dtype; none for f32)
    y   = RN_dtype(w * n)                           (the product of two bf16/f16 values is
                                                     exact in f32: one rounding, as eager)

The summation order of `sum(h*h)` is the only step the aten spelling leaves open.
The rsqrt is correctly rounded; eager CPU `torch.rsqrt` (a vector library's) and
Inductor's CUDA `rsqrt` (an approximation) are not, so no kernel matches them bit for bit:
a one-ulp f32 difference in r can move n by one ulp of x's dtype, and y by one more
(tests/test_rms_norm_triton.py bounds it at 2 ulps).

The Triton interpreter (TRITON_INTERPRET=1, CPU CI) truncates f32 -> bf16; under it
(constexpr INTERP) bf16 conversions are done in integer arithmetic, round to nearest
even, as the GPU does. The variable must be set before Triton is imported (`tl.sum`
itself is a jit function, fixed in the mode of the first import): tests run the
interpreter in a subprocess.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED_DTYPES = tuple(_DT)
MAX_H = 32768  # a row lives in registers: beyond this it would spill
ELEMS_PER_PROGRAM = 4096


def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr,
    M, x_rs, r_rs, eps,
    H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)
    out_off = rows64[:, None] * H + cols[None, :]

    xv = tl.load(x_ptr + rows64[:, None] * x_rs + cols[None, :], mask=mask, other=0.0)
    if DT == 1 and INTERP:
        h = (xv.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        h = xv.to(tl.float32)
    if HAS_RES:
        rv = tl.load(r_ptr + rows64[:, None] * r_rs + cols[None, :], mask=mask, other=0.0)
        if DT == 1 and INTERP:
            r = (rv.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            r = rv.to(tl.float32)
        h = h + r
        # the sum is rounded to x's dtype once; the norm reads the rounded sum
        if DT == 1:
            if INTERP:
                b = h.to(tl.uint32, bitcast=True)
                bits = tl.where(h != h, (b >> 16) | 0x40, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
                sx = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                h = (bits << 16).to(tl.float32, bitcast=True)
            else:
                sx = h.to(tl.bfloat16)
                h = sx.to(tl.float32)
        elif DT == 2:
            sx = h.to(tl.float16)
            h = sx.to(tl.float32)
        else:
            sx = h
        tl.store(s_ptr + out_off, sx, mask=mask)

    ss = tl.sum(h * h, 1)
    # Inductor may pass eps as a double: compute in f32, as the aten sequence does
    v = tl.div_rn(ss, tl.full(ss.shape, H, tl.float32)) + tl.cast(eps, tl.float32)
    if INTERP:
        rinv = (1.0 / tl.sqrt(v.to(tl.float64))).to(tl.float32)
    else:
        rinv = libdevice.rsqrt(v.to(tl.float64)).to(tl.float32)
    n = h * rinv[:, None]
    if DT == 1:
        b = n.to(tl.uint32, bitcast=True)
        if INTERP:
            nb = tl.where(n != n, (b >> 16) | 0x40, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
            n = (nb << 16).to(tl.float32, bitcast=True)
        else:
            n = n.to(tl.bfloat16).to(tl.float32)
    elif DT == 2:
        n = n.to(tl.float16).to(tl.float32)
    if HAS_W:
        wv = tl.load(w_ptr + cols, mask=cols < H, other=0.0)
        if DT == 1 and INTERP:
            w = (wv.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            w = wv.to(tl.float32)
        n = w[None, :] * n
    if DT == 1:
        if INTERP:
            b = n.to(tl.uint32, bitcast=True)
            yb = tl.where(n != n, (b >> 16) | 0x40, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
            y = yb.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = n.to(tl.bfloat16)
    elif DT == 2:
        y = n.to(tl.float16)
    else:
        y = n
    tl.store(y_ptr + out_off, y, mask=mask)


rms_norm_kernel = triton.jit(_rms_norm_kernel)


@functools.lru_cache(maxsize=None)
def launch_config(h: int) -> dict:
    """Tile and warps for rows of `h` columns (depends on H only: the token count is dynamic)."""
    block_h = triton.next_power_of_2(h)
    rows = max(1, min(64, ELEMS_PER_PROGRAM // block_h))
    warps = 4 if block_h * rows <= 4096 else (8 if block_h <= 8192 else 16)
    return dict(BLOCK_H=block_h, ROWS=rows, num_warps=warps)


def supports(h: int, dtype: torch.dtype) -> str | None:
    if dtype not in _DT:
        return f"dtype {dtype} (the kernel handles float32, bfloat16, float16)"
    if h > MAX_H:
        return f"hidden size {h} > {MAX_H} (a row is held in registers)"
    if h < 1:
        return "empty rows"
    return None


def launch(kernel, x2, r2, w, y2, s2, eps, *, interpret: bool = False) -> None:
    """Run `kernel` (jit function, or it wrapped by `wrap_triton`) on `[M, H]` operands.

    x2/r2: unit stride on H, any row stride; y2/s2: contiguous outputs; w: `[H]` or None.
    """
    m, h = x2.shape
    # H is a compile-time constant of the kernel (the tile width): a symbolic hidden size
    # (torch.compile(dynamic=True)) is specialised here; the token count M stays dynamic
    h = int(h)
    cfg = launch_config(h)
    rows = cfg["ROWS"]
    grid = ((m + rows - 1) // rows,)
    has_res = r2 is not None
    kernel[grid](
        x2, r2 if has_res else x2, w if w is not None else x2, y2, s2 if has_res else y2,
        m, x2.stride(0), r2.stride(0) if has_res else 0, eps,
        H=h, BLOCK_H=cfg["BLOCK_H"], ROWS=rows, HAS_RES=has_res, HAS_W=w is not None,
        DT=_DT[x2.dtype], INTERP=interpret, num_warps=cfg["num_warps"],
    )

"""The fused RoPE Triton kernel: q and k rotated in one launch, f32 math, one rounding.

Layout handled (after `rope_ops` views every operand as 4-D `[d0, d1, H, D]`, leading
dims padded/flattened): x may have any strides with a unit stride along D; cos/sin are
the half-width tables expanded to `[d0, d1, H, D/2]` (broadcast dims have stride 0, a
table sliced inline from a full-width one has stride 2 along D/2), so one kernel serves
Wan's inline-sliced full tables as well as per-token half tables. Outputs are
contiguous.

Each program takes one (token block, head block) pair: BLOCK_T tokens (a token is one
(d0, d1) position) by BLOCK_H heads of q or of k, so q and k share one launch and
neither needs padding to the other's head count. The grid is 1-D, head blocks
innermost. Each program moves BLOCK_T x BLOCK_H rows of D elements: full rows are
loaded contiguously (128-bit accesses) and the pairs are separated in registers
(split/join) for the interleaved layout; the neox layout loads the two halves as two
contiguous runs.

Numerics: the products and the sum are formed in f32 and rounded once to the output
dtype, the same operations eager PyTorch performs for `bf16 * f32` spellings. FMA
contraction is switched off (`enable_fp_fusion=False` where the launch path accepts it)
so each product is rounded separately, as eager does.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl


def _rope_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr,
    n_tok, T1, HQ, HK, NQB, NHB,
    q_s0, q_s1, q_s2, k_s0, k_s1, k_s2,
    c_s0, c_s1, c_s2, c_s3, s_s0, s_s1, s_s2, s_s3,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr, TABLE_PER_HEAD: tl.constexpr,
):
    # Consecutive programs take the head blocks of one token block, q's then k's, so the
    # programs in flight sweep q and k front to back as a flat copy does. (Token blocks
    # innermost, the earlier order, made them stride through memory 5120 elements apart
    # and cost 20% at S = 75600: docs/benchmarks.md.)
    pid = tl.program_id(0)
    pid_t = pid // NHB
    pid_h = pid % NHB
    is_q = pid_h < NQB
    # Select q or k by value rather than by branch: both branches would otherwise have
    # to agree on the types of specialised (constexpr) strides.
    x_ptr = tl.where(is_q, q_ptr, k_ptr)
    o_ptr = tl.where(is_q, qo_ptr, ko_ptr)
    H = tl.where(is_q, HQ, HK)
    xs0 = tl.where(is_q, q_s0, k_s0).to(tl.int64)
    xs1 = tl.where(is_q, q_s1, k_s1).to(tl.int64)
    xs2 = tl.where(is_q, q_s2, k_s2).to(tl.int64)
    h0 = tl.where(is_q, pid_h, pid_h - NQB) * BLOCK_H

    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    t_ok = tok < n_tok
    h_ok = heads < H
    i_ok = cols < HALF
    tok64 = tok.to(tl.int64)
    b = tok64 // T1
    s = tok64 % T1
    h64 = heads.to(tl.int64)

    row_mask = t_ok[:, None, None] & h_ok[None, :, None]
    mask = row_mask & i_ok[None, None, :]
    if TABLE_PER_HEAD:
        c_off = (b * c_s0 + s * c_s1)[:, None, None] + (h64 * c_s2)[None, :, None] + (cols * c_s3)[None, None, :]
        s_off = (b * s_s0 + s * s_s1)[:, None, None] + (h64 * s_s2)[None, :, None] + (cols * s_s3)[None, None, :]
        cos = tl.load(cos_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
    else:
        # one table row per token, broadcast over the heads in registers: loading it
        # per (token, head) would issue BLOCK_H times the load instructions
        tmask = t_ok[:, None, None] & i_ok[None, None, :]
        c_off = (b * c_s0 + s * c_s1)[:, None, None] + (cols * c_s3)[None, None, :]
        s_off = (b * s_s0 + s * s_s1)[:, None, None] + (cols * s_s3)[None, None, :]
        cos = tl.load(cos_ptr + c_off, mask=tmask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + s_off, mask=tmask, other=0.0).to(tl.float32)

    x_row = (b * xs0 + s * xs1)[:, None, None] + (h64 * xs2)[None, :, None]
    o_row = (tok64[:, None, None] * H + h64[None, :, None]) * (2 * HALF)
    if INTERLEAVED:
        full = tl.arange(0, 2 * BLOCK_HALF)
        fmask = row_mask & (full < 2 * HALF)[None, None, :]
        x = tl.load(x_ptr + x_row + full[None, None, :], mask=fmask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_HALF, 2)))
        o1 = x1 * cos - x2 * sin
        o2 = x1 * sin + x2 * cos
        out = tl.reshape(tl.join(o1, o2), (BLOCK_T, BLOCK_H, 2 * BLOCK_HALF))
        tl.store(o_ptr + o_row + full[None, None, :], out.to(o_ptr.dtype.element_ty), mask=fmask)
    else:
        x1 = tl.load(x_ptr + x_row + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_row + HALF + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x1 * sin + x2 * cos
        tl.store(o_ptr + o_row + cols[None, None, :], o1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptr + o_row + HALF + cols[None, None, :], o2.to(o_ptr.dtype.element_ty), mask=mask)


rope_kernel = triton.jit(_rope_kernel)


def interpreted_kernel():
    """The kernel built for Triton's CPU interpreter (TRITON_INTERPRET=1 must be set).

    `triton.jit` decides at decoration time whether to interpret, so a module imported
    before the variable was set holds a compiled-mode kernel; this builds a fresh one.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpreted_kernel() needs TRITON_INTERPRET=1 in the environment")
    return triton.jit(_rope_kernel)


@functools.lru_cache(maxsize=None)
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Elements (of x) per program, warps per program, heads per program: the fastest of the
# 16 configurations `fusewright bench rope --sweep` compared on an H100 at S=75600
# (docs/benchmarks.md, session 3); with 4 warps every BLOCK_H=8 configuration was within
# 1% of it, BLOCK_H=4 ones 1-3% slower, 8 warps up to 5% slower.
ELEMS_PER_PROGRAM = 1024
NUM_WARPS = 4
MAX_BLOCK_H = 8


def launch_config(n_tok: int, hq: int, hk: int, half: int,
                  elems: int | None = None, max_block_h: int | None = None) -> dict:
    """Block sizes and grid for `n_tok` tokens of hq + hk heads of width 2*half."""
    block_half = _next_pow2(half)
    block_h = min(_next_pow2(max(hq, hk)), max_block_h or MAX_BLOCK_H)
    block_t = max(1, (elems or ELEMS_PER_PROGRAM) // (block_h * 2 * block_half))
    block_t = min(block_t, _next_pow2(max(1, n_tok)))
    nqb = triton.cdiv(hq, block_h)
    nkb = triton.cdiv(hk, block_h) if hk else 0
    ntb = triton.cdiv(n_tok, block_t)
    return dict(BLOCK_HALF=block_half, BLOCK_T=block_t, BLOCK_H=block_h, NQB=nqb,
                NHB=nqb + nkb, NTB=ntb, grid=(ntb * (nqb + nkb),))


def launch(kernel, q, qo, k, ko, cos, sin, *, interleaved: bool, elems: int | None = None,
           num_warps: int | None = None, max_block_h: int | None = None, fp_fusion: bool = True) -> None:
    """Run `kernel` (the jit function, or it wrapped by `wrap_triton`) on 4-D operands.

    q/k: `[d0, d1, H, D]` with unit stride on D; qo/ko: contiguous outputs; cos/sin:
    expanded to `[d0, d1, H, D/2]` of q (k must broadcast the same way). `k`/`ko` may be
    None for a single tensor.
    """
    d0, d1, hq, d = q.shape
    half = d // 2
    n_tok = d0 * d1
    hk = k.shape[2] if k is not None else 0
    cfg = launch_config(n_tok, hq, hk, half, elems, max_block_h)
    if k is None:
        k, ko = q, qo  # never touched: no program is given a k head block
    extra = {} if fp_fusion else {"enable_fp_fusion": False}
    # after expand, a table shared by all heads has stride 0 along the head dim
    per_head = hq > 1 and (cos.stride(2) != 0 or sin.stride(2) != 0)
    kernel[cfg["grid"]](
        q, qo, k, ko, cos, sin,
        n_tok, d1, hq, hk, cfg["NQB"], cfg["NHB"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *cos.stride(), *sin.stride(),
        HALF=half, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"],
        INTERLEAVED=interleaved, TABLE_PER_HEAD=per_head, num_warps=num_warps or NUM_WARPS, **extra,
    )

"""Triton kernel for the fused activation -> quantization op (`fusewright::act_quant`).

What it computes is `lowering/act_quant_spec.py`'s contract; the reference is
`act_quant_reference.reference`.

Design: one program per row, the whole row held in registers as ``[1, CG, GS]`` tiles
(GS is the quant group, or up to 128 columns for per-token kinds): one tile of
``next_pow2(H)`` columns masked past H, or up to three power-of-two tiles that add up to
H (`pieces`), so no lane computes on padding. The row is loaded once, the activation
computed, the amax reduced, the scale computed and the row quantized and stored from
registers: one read of each input and one write of q, where Inductor's two-loop
reduction reads the inputs (and recomputes the activation) twice. The exact-arithmetic pieces - conversions that
round as torch does (also under the interpreter), NaN-propagating max, the scale
pipeline, division by the scale, the per-group finish - are the RMSNorm -> quant
kernel's (`norm_quant_triton_math`, `norm_quant_triton_division`), so both ops quantize
bitwise alike.

silu is ``x / (1 + exp(-x))`` in f32 with libdevice's expf (the function eager CUDA
calls). The division is IEEE (``div_rn``) where silu stays in f32, and Triton's
approximate f32 division where silu is then rounded to bf16/f16: that rounding keeps
none of its <= 2 ulp error (no element of 58.7M differed from the reference on an H100),
and the IEEE division cost 1.3-2x the whole kernel (:func:`silu_mode`). Under the
interpreter (CPU CI) numpy's exp and f32 division stand in for them. For silu_mul the
per-element math, not the memory, bounds a program, so the launch plan (`default_config`)
is about lanes and registers: no padded lanes, and 4 warps (4 programs per SM overlap one
another's loads with their math).

Spec constants are constexpr, materialised as f32 in the kernel (no f64 arguments);
nothing is read back to the host and outputs are allocated from shapes only, so the
launch is CUDA-graph safe.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

from .act_quant_reference import check_inputs
from .act_quant_spec import ActQuantSpec
from .norm_quant_plan import _APPLY_CODE, _DT_CODE, _KIND_CODE
from .norm_quant_triton_division import DIV_OK, _div_ok, scale_division
from .norm_quant_triton_math import (
    _c32, _cvt_out, _group_finish, _ld, _max_nan, _quant_store, _rnd, _scale_from_amax, _up,
)

MAX_WIDTH = 32768  # wider rows would spill registers: declined by `supports`
_PRO_CODE = {"identity": 0, "silu_mul": 1}


@triton.jit
def _silu(g, SILU: tl.constexpr, INTERP: tl.constexpr):
    """silu in f32. SILU 0: libdevice expf and an IEEE division (eager CUDA's arithmetic);
    1: expf and the approximate division; 2: the fast exp2-based exp and division."""
    if INTERP:
        return g / (tl.exp(-g) + 1.0)
    elif SILU == 0:
        return tl.div_rn(g, libdevice.exp(-g) + 1.0)
    elif SILU == 1:
        return g / (libdevice.exp(-g) + 1.0)
    else:
        return g / (tl.exp(-g) + 1.0)


@triton.jit
def _piece_h(x_ptr, u_ptr, xrow, urow, rmask, c, H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr,
             GS: tl.constexpr, MASKED: tl.constexpr, PRO: tl.constexpr, XDT: tl.constexpr, ADT: tl.constexpr,
             HDT: tl.constexpr, HOLD: tl.constexpr, SILU: tl.constexpr, INTERP: tl.constexpr):
    """Chunk c (CH columns) of the row: the quantization's input h, as it is held until the
    scale is known. HOLD: in its own 16-bit dtype (h is rounded to it anyway, so this is
    exact, and holds the row in half the registers of f32)."""
    xv = _ld(x_ptr, xrow, rmask, c, H, CH, CG, GS, MASKED)
    if PRO == 1:
        uv = _ld(u_ptr, urow, rmask, c, H, CH, CG, GS, MASKED)
        a = _rnd(_silu(_up(xv, XDT, INTERP), SILU, INTERP), ADT, INTERP)
        if HOLD:
            return _cvt_out(a * _up(uv, XDT, INTERP), HDT, INTERP)
        else:
            return _rnd(a * _up(uv, XDT, INTERP), HDT, INTERP)
    elif HOLD:
        return xv
    else:
        return _up(xv, XDT, INTERP)


@triton.jit
def _amax(h, HELD_DT: tl.constexpr, INTERP: tl.constexpr):
    # masked columns hold 0, which never raises an amax of |values|
    return tl.reduce(tl.reduce(tl.abs(_up(h, HELD_DT, INTERP)), 2, _max_nan), 1, _max_nan)


@triton.jit
def _token_pieces(h0, h1, h2, s_row, rs_row, q_ptr, qrow, rmask, C1: tl.constexpr, C2: tl.constexpr,
                  H: tl.constexpr, CH: tl.constexpr, CH1: tl.constexpr, CH2: tl.constexpr, CG: tl.constexpr,
                  G1: tl.constexpr, G2: tl.constexpr, GS: tl.constexpr, APPLY: tl.constexpr, UE8M0: tl.constexpr,
                  INT8: tl.constexpr, CLO: tl.constexpr, CHI: tl.constexpr, FAST: tl.constexpr,
                  MASKED: tl.constexpr, HELD: tl.constexpr, INTERP: tl.constexpr, DIV: tl.constexpr):
    """Quantize and store a row's pieces by its one scale (h1, h2: absent when CH1, CH2 are 0)."""
    s3 = s_row[:, None, None]
    rs3 = rs_row[:, None, None]
    _quant_store(_up(h0, HELD, INTERP), s3, rs3, q_ptr, qrow, rmask, 0, H, CH, CG, GS, APPLY, UE8M0, INT8,
                 CLO, CHI, FAST, MASKED, INTERP, DIV)
    if CH1 > 0:
        _quant_store(_up(h1, HELD, INTERP), s3, rs3, q_ptr, qrow, rmask, C1, H, CH1, G1, GS, APPLY, UE8M0,
                     INT8, CLO, CHI, FAST, False, INTERP, DIV)
    if CH2 > 0:
        _quant_store(_up(h2, HELD, INTERP), s3, rs3, q_ptr, qrow, rmask, C2, H, CH2, G2, GS, APPLY, UE8M0,
                     INT8, CLO, CHI, FAST, False, INTERP, DIV)


@triton.jit
def _act_quant_kernel(
    x_ptr, u_ptr, q_ptr, s_ptr, M, x_stride, u_stride,
    H: tl.constexpr, CH: tl.constexpr, CG: tl.constexpr, GS: tl.constexpr, MASKED: tl.constexpr,
    CH1: tl.constexpr, CH2: tl.constexpr, HOLD: tl.constexpr,
    PRO: tl.constexpr, XDT: tl.constexpr, ADT: tl.constexpr, HDT: tl.constexpr,
    KIND: tl.constexpr, G: tl.constexpr, COLMAJ: tl.constexpr, UE8M0: tl.constexpr,
    SMD: tl.constexpr, HAS_UB: tl.constexpr, UB: tl.constexpr, HAS_FLOOR: tl.constexpr,
    FLOOR_AMAX: tl.constexpr, FLOOR: tl.constexpr, CONST_DIV: tl.constexpr, SCONST: tl.constexpr,
    RCONST: tl.constexpr, APPLY: tl.constexpr, CLO: tl.constexpr, CHI: tl.constexpr,
    FAST: tl.constexpr, INTERP: tl.constexpr, SILU: tl.constexpr, SDIV: tl.constexpr,
):
    """One row per program. The row is up to three power-of-two tiles: CH columns, then CH1,
    then CH2 (0: absent), e.g. 14336 = 8192 + 4096 + 2048, so no lane works on padding; or
    one masked tile of CH >= H (MASKED)."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    r64 = rows.to(tl.int64)[:, None, None]
    rmask = (rows < M)[:, None, None]
    xrow = r64 * x_stride
    urow = r64 * u_stride
    qrow = r64 * H  # q is contiguous [M, H]
    # the dtype h is held in; each use converts it (_up) rather than keeping an f32 copy
    # alive between the amax and the quantization, which is what holding it saves
    HELD: tl.constexpr = (HDT if PRO == 1 else XDT) if HOLD else 0
    # a tile of CHk columns at column offset o is chunk o // CHk (each offset is a multiple of
    # the next, smaller, power of two)
    C1: tl.constexpr = CH // CH1 if CH1 > 0 else 0
    C2: tl.constexpr = (CH + CH1) // CH2 if CH2 > 0 else 0
    G1: tl.constexpr = CH1 // GS
    G2: tl.constexpr = CH2 // GS
    h0 = _piece_h(x_ptr, u_ptr, xrow, urow, rmask, 0, H, CH, CG, GS, MASKED, PRO, XDT, ADT, HDT, HOLD, SILU, INTERP)
    h1 = h0  # placeholders for absent pieces, never read (every use is under CHk > 0)
    h2 = h0
    if CH1 > 0:
        h1 = _piece_h(x_ptr, u_ptr, xrow, urow, rmask, C1, H, CH1, G1, GS, False, PRO, XDT, ADT, HDT, HOLD, SILU,
                      INTERP)
    if CH2 > 0:
        h2 = _piece_h(x_ptr, u_ptr, xrow, urow, rmask, C2, H, CH2, G2, GS, False, PRO, XDT, ADT, HDT, HOLD, SILU,
                      INTERP)
    INT8: tl.constexpr = KIND == 3
    if KIND == 2:
        _group_finish(_up(h0, HELD, INTERP), _up(h0, HELD, INTERP), 0, rows, rmask, M, q_ptr, qrow, s_ptr, G,
                      COLMAJ, H, CH, CG, GS, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST,
                      RCONST, UE8M0, APPLY, CLO, CHI, FAST, MASKED, INTERP, SDIV, False)
        if CH1 > 0:
            _group_finish(_up(h1, HELD, INTERP), _up(h1, HELD, INTERP), C1, rows, rmask, M, q_ptr, qrow, s_ptr, G,
                          COLMAJ, H, CH1, G1, GS, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV,
                          SCONST, RCONST, UE8M0, APPLY, CLO, CHI, FAST, False, INTERP, SDIV, False)
        if CH2 > 0:
            _group_finish(_up(h2, HELD, INTERP), _up(h2, HELD, INTERP), C2, rows, rmask, M, q_ptr, qrow, s_ptr, G,
                          COLMAJ, H, CH2, G2, GS, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV,
                          SCONST, RCONST, UE8M0, APPLY, CLO, CHI, FAST, False, INTERP, SDIV, False)
    else:
        am = _amax(h0, HELD, INTERP)
        if CH1 > 0:
            am = _max_nan(am, _amax(h1, HELD, INTERP))
        if CH2 > 0:
            am = _max_nan(am, _amax(h2, HELD, INTERP))
        s_row = _scale_from_amax(am, SMD, HAS_UB, UB, HAS_FLOOR, FLOOR_AMAX, FLOOR, CONST_DIV, SCONST, RCONST,
                                 UE8M0, INTERP)
        tl.store(s_ptr + rows, s_row)
        rs_row = tl.div_rn(_c32(1.0), s_row)
        # one test per row picks the division (as in the norm-quant kernel): the special
        # cases are rows with inf or NaN, or scales near the ends of the f32 range
        if APPLY == 0 and not FAST and not UE8M0 and not INT8:
            if tl.min(_div_ok(am, s_row, rs_row).to(tl.int32), 0) == 1:
                _token_pieces(h0, h1, h2, s_row, rs_row, q_ptr, qrow, rmask, C1, C2, H, CH, CH1, CH2, CG, G1, G2,
                              GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, HELD, INTERP, DIV_OK)
            else:
                _token_pieces(h0, h1, h2, s_row, rs_row, q_ptr, qrow, rmask, C1, C2, H, CH, CH1, CH2, CG, G1, G2,
                              GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, HELD, INTERP, SDIV)
        else:
            _token_pieces(h0, h1, h2, s_row, rs_row, q_ptr, qrow, rmask, C1, C2, H, CH, CH1, CH2, CG, G1, G2,
                          GS, APPLY, UE8M0, INT8, CLO, CHI, FAST, MASKED, HELD, INTERP, SDIV)


# ------------------------------------------------------------------------- host side
def supports(spec: ActQuantSpec, hidden: int) -> str | None:
    """None when the kernel computes `spec` for rows of `hidden`, else why not."""
    if hidden > MAX_WIDTH:
        return f"rows of {hidden} are wider than the kernel holds in registers ({MAX_WIDTH})"
    gs = spec.quant.group_size
    if spec.quant.kind == "fp8_per_group":
        if gs & (gs - 1):
            return f"group size {gs} is not a power of two"
        if hidden % gs:
            return f"hidden size {hidden} is not divisible by the group size {gs}"
    return None


def default_config(spec: ActQuantSpec, hidden: int, m: int) -> dict:
    """The launch plan. identity: the row as one masked tile, warps scaled so each thread
    holds <= 32 values. silu_mul (H100 sweep at T=4096, docs/benchmarks.md): rows up to
    16384 that split into power-of-two `pieces` are split, so no lane computes silu on
    padding (I=14336: 127.7 -> 108.6 µs per token, 136.5 -> 110.2 µs per group); wider
    rows are one masked tile with h held in bf16 and 8 warps (I=18432: 158.0 -> 147.1 µs)."""
    plan = dict(tile_config(spec, hidden), HOLD=0, SILU=silu_mode(spec))
    ch = plan["CH"]
    if spec.prologue != "silu_mul":
        plan["num_warps"] = 4 if ch <= 2048 else 8 if ch <= 8192 else 16
        return plan
    # silu_mul: the per-element math, not the memory, bounds a program; 4 warps (<= 128
    # registers, 4 programs per SM) overlap one program's loads with another's math, where
    # 8-32 warps per row were 1.1-1.6x slower (row-major scales)
    split = piece_config(spec, hidden) if hidden <= 16384 else None
    if split is not None and split["CH1"]:
        plan.update(split, num_warps=8 if spec.quant.kind == "fp8_per_group" else 4)
    elif ch > 16384:
        plan.update(HOLD=1, num_warps=8)
    else:
        plan["num_warps"] = 4
    return plan


def tile_config(spec: ActQuantSpec, hidden: int) -> dict:
    """The CH/CH1/CH2/GS/CG part of a launch plan that holds the row as one tile of
    next_pow2(H) columns, masked past H."""
    ch = triton.next_power_of_2(max(hidden, 1))
    gs = spec.quant.group_size if spec.quant.kind == "fp8_per_group" else min(128, ch)
    ch = max(ch, gs)
    return {"CH": ch, "CH1": 0, "CH2": 0, "GS": gs, "CG": ch // gs}


def pieces(hidden: int, gs: int) -> tuple[int, int, int] | None:
    """`hidden` as up to three descending powers of two, each a multiple of the tile's
    inner width `gs` (a power of two), padded with 0: (8192, 4096, 2048) for 14336.
    None where it takes more (the row is then one masked tile)."""
    parts = [1 << b for b in range(hidden.bit_length() - 1, -1, -1) if hidden >> b & 1]
    if len(parts) > 3 or parts[-1] < gs:
        return None
    return tuple(parts + [0] * (3 - len(parts)))


def piece_config(spec: ActQuantSpec, hidden: int) -> dict | None:
    """The CH/CH1/CH2/GS/CG part of a launch plan that splits the row into `pieces`, or None."""
    gsq = spec.quant.group_size if spec.quant.kind == "fp8_per_group" else None
    low = hidden & -hidden  # the smallest piece
    gs = gsq if gsq else min(128, low)
    p = pieces(hidden, gs)
    if p is None:
        return None
    return {"CH": p[0], "CH1": p[1], "CH2": p[2], "GS": gs, "CG": p[0] // gs}


def silu_mode(spec: ActQuantSpec) -> int:
    """How the kernel computes silu on the GPU (`_silu`'s SILU).

    fast numerics: the exp2-based exp and division (2). exact, silu rounded to bf16/f16:
    libdevice's expf with the approximate f32 division (1): its <= 2 ulp f32 error is below
    what the rounding to bf16/f16 keeps (0 elements differed from the CPU reference in
    58.7M at T=4096, I=14336), and an IEEE division costs 1.3-2x the kernel's time. exact,
    silu kept in f32: eager CUDA's arithmetic, expf and an IEEE division (0)."""
    if spec.numerics == "fast":
        return 2
    return 1 if spec.act_dtype in (torch.bfloat16, torch.float16) else 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _f32_recip(v: float) -> float:
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(v), dtype=torch.float32))


@functools.lru_cache(maxsize=256)
def _spec_kwargs(spec: ActQuantSpec, hidden: int, interp: bool) -> dict:
    """The constexpr arguments fixed by the spec (built once: the launch is on the host's
    critical path when the graph is not replayed from a CUDA graph)."""
    q = spec.quant
    return dict(
        H=hidden, PRO=_PRO_CODE[spec.prologue], XDT=_DT_CODE[spec.input_dtype], ADT=_DT_CODE[spec.act_dtype],
        HDT=_DT_CODE[spec.h_dtype], KIND=_KIND_CODE[q.kind],
        G=hidden // q.group_size if q.kind == "fp8_per_group" else 1, COLMAJ=bool(q.col_major),
        UE8M0=bool(q.ue8m0), SMD=_DT_CODE[q.scale_math_dtype], HAS_UB=q.amax_ub is not None,
        UB=float(q.amax_ub or 0.0), HAS_FLOOR=q.floor is not None, FLOOR_AMAX=q.floor_on == "amax",
        FLOOR=float(q.floor or 0.0), CONST_DIV=q.scale_form == "const_div", SCONST=float(q.scale_const),
        RCONST=_f32_recip(q.scale_const), APPLY=_APPLY_CODE[q.apply], CLO=float(q.clamp_lo),
        CHI=float(q.clamp_hi), FAST=spec.numerics == "fast", INTERP=interp, SDIV=scale_division(q),
    )


def _rows_of(t: torch.Tensor, hidden: int) -> tuple[torch.Tensor, int]:
    """t as [M, H] with a unit last stride, and its row stride (a view when the layout
    allows, e.g. a column slice of a wider tensor; else a contiguous copy)."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t, t.stride(0)
    try:
        t2 = t.view(-1, hidden)
    except RuntimeError:
        t2 = t.reshape(-1, hidden)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def launch(spec: ActQuantSpec, x: torch.Tensor, up: torch.Tensor | None = None, *, config: dict | None = None,
           info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel; same inputs and outputs as `act_quant_reference.reference`.

    `config` overrides the launch plan (benchmarks); `info`, if given, receives the plan and
    the compiled kernel's register and spill counts."""
    check_inputs(spec, x, up)
    hidden = x.shape[-1]
    problem = supports(spec, hidden)
    if problem:
        raise ValueError(f"act_quant Triton kernel: {problem}")
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    cfg = dict(default_config(spec, hidden, m), **(config or {}))
    dev = x.device
    q = torch.empty((m, hidden), dtype=spec.quant.out_dtype, device=dev)
    if spec.quant.kind == "fp8_per_group":
        groups = hidden // spec.quant.group_size
        if spec.quant.col_major:
            s_buf = torch.empty((groups, m), dtype=torch.float32, device=dev)
            nd = len(lead) + 1
            scale = s_buf.view((groups,) + lead).permute(tuple(range(1, nd)) + (0,))
        else:
            s_buf = torch.empty((m, groups), dtype=torch.float32, device=dev)
            scale = s_buf.view(lead + (groups,))
    else:
        s_buf = torch.empty((m,), dtype=torch.float32, device=dev)
        scale = s_buf.view(lead + (1,))
    if m == 0:
        return q.view(x.shape), scale
    x2, xs = _rows_of(x, hidden)
    u2, us = _rows_of(up, hidden) if up is not None else (x2, 0)
    compiled = _act_quant_kernel[(m,)](
        x2, u2, q, s_buf, m, xs, us,
        CH=cfg["CH"], CG=cfg["CG"], GS=cfg["GS"], MASKED=cfg["CH"] + cfg["CH1"] + cfg["CH2"] != hidden,
        CH1=cfg["CH1"], CH2=cfg["CH2"], HOLD=cfg["HOLD"], SILU=cfg["SILU"],
        num_warps=cfg["num_warps"], **_spec_kwargs(spec, hidden, _interpreting()),
    )
    if info is not None:
        info.update(cfg)
        info["n_regs"] = getattr(compiled, "n_regs", None)
        info["n_spills"] = getattr(compiled, "n_spills", None)
    return q.view(x.shape), scale

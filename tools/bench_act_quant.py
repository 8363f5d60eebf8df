"""`fusewright bench act-quant`: the fused activation -> quantization op vs stock Inductor.

For each variant and shape: the fused op (`torch.ops.fusewright.act_quant`, called
directly with the variant's `ActQuantSpec`) and stock Inductor compiling the variant's
eager spelling (the model's code: `torch.compile(fn)`, default options, fusewright not
enabled), measured in the same process. Before timing, the fused op's outputs are
checked against the op's reference run on CPU copies of the inputs (q equal on >= 99.9%
of elements, scales within 1e-6 relative: CPU and GPU may round `exp` differently); the
eager spelling on the device and the compiled spelling's outputs are compared too and
recorded (`match.eager`, `match.stock`), but do not decide:
stock Inductor by default skips the bf16 roundings of `silu(g)` and `silu(g) * u` that
eager (and the fused op's exact numerics) make, so a few % of its q differ. Timing, limits and the
copy baseline are bench norm-quant's (`Timer`, `copy_bandwidth`): L2 flushed before each
call replayed from a CUDA graph for T > 256, 20 calls in one graph for T <= 256. The
limit is the variant's minimum bytes (silu_mul: read gate and up, 4TI, write q and
scales, TI + scales; identity: 3TH + scales) over the measured copy bandwidth.

    fusewright bench act-quant                            # default table
    fusewright bench act-quant --variants token --shapes 16x4096,4096x7168
    fusewright bench act-quant --json out.json --write-choice lowering/act_quant_auto.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from ..lowering.act_quant_spec import ActQuantSpec
from ..lowering.norm_quant_spec import QuantSpec, f32_round
from .cuda_graph import FLUSH_MODES
from .model_zoo import fp8_rowwise_quantize

HELP = "fused activation->quant op vs stock Inductor on the model's spelling"

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BF16 = torch.bfloat16
Q_EQUAL_MIN = 0.999
SCALE_RTOL = 1e-6


# ------------------------------------------------------------------ the model spellings
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation (Llama, Qwen, DeepSeek): `F.silu(gate) * up` in the model dtype."""
    return F.silu(g) * u


def group_quant(h: torch.Tensor, group_size: int = 128, col_major: bool = False):
    """DeepSeek-V3's `act_quant` (inference/kernel.py) in torch: per group of `group_size`
    an f32 amax floored at 1e-4, scale = amax / 448, divide, clamp, cast. `col_major`: the
    scales re-laid out column-major (`s.t().contiguous().t()`), as DeepGEMM reads them."""
    x = h.float().unflatten(-1, (h.shape[-1] // group_size, group_size))
    amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = amax / FP8_MAX
    q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2)
    s = s.squeeze(-1)
    if col_major:
        s = s.t().contiguous().t()
    return q, s


def _silu_token(g, u):
    return fp8_rowwise_quantize(silu_mul(g, u))


def _silu_group(g, u):
    return group_quant(silu_mul(g, u))


def _silu_group_col(g, u):
    return group_quant(silu_mul(g, u), col_major=True)


def _token(x):
    return fp8_rowwise_quantize(x)


def _silu_token_gu(gu):
    # vLLM's SiluAndMul on the merged gate_up projection's output
    d = gu.shape[-1] // 2
    return fp8_rowwise_quantize(F.silu(gu[..., :d]) * gu[..., d:])


# ------------------------------------------------------------------ variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked construct: the model's eager spelling and the fused op's spec.

    `make_inputs(T, H, device)` builds the eager function's inputs (H is the quantized
    width); `op_args(*inputs)` gives the fused op's (x, up) from them."""

    name: str
    about: str
    spec: ActQuantSpec
    eager: Callable
    make_inputs: Callable
    op_args: Callable


def _two(T, H, device):
    return (torch.randn(T, H, device=device, dtype=BF16), torch.randn(T, H, device=device, dtype=BF16))


def _one(T, H, device):
    return (torch.randn(T, H, device=device, dtype=BF16),)


def _merged(T, H, device):
    return (torch.randn(T, 2 * H, device=device, dtype=BF16),)


def variants() -> dict[str, Variant]:
    # floors stored as the f32 values the spellings apply (clamp of an f32 tensor)
    tok = QuantSpec(kind="fp8_per_token", apply="div", floor=f32_round(1e-12), floor_on="scale", scale_const=FP8_MAX)

    def grp(col):
        return QuantSpec(kind="fp8_per_group", group_size=128, col_major=col, apply="div", floor=f32_round(1e-4),
                         floor_on="amax", scale_const=FP8_MAX)

    def silu(q):
        return ActQuantSpec("silu_mul", BF16, q, act_dtype=BF16, h_dtype=BF16)

    def pair(g, u):
        return g, u

    def halves(gu):
        d = gu.shape[-1] // 2
        return gu[..., :d], gu[..., d:]

    vs = [
        Variant("silu_mul_token", "Llama / torchao rowwise: silu(g)*u, fp8 per token", silu(tok), _silu_token,
                _two, pair),
        Variant("silu_mul_group128", "DeepSeek act_quant: silu(g)*u, fp8 per 128-group, row-major scales",
                silu(grp(False)), _silu_group, _two, pair),
        Variant("silu_mul_group128_col", "as silu_mul_group128, column-major scales (DeepGEMM)",
                silu(grp(True)), _silu_group_col, _two, pair),
        Variant("token", "an activation in memory (o_proj input): fp8 per token",
                ActQuantSpec("identity", BF16, tok, h_dtype=BF16), _token, _one, lambda x: (x, None)),
        Variant("silu_mul_token_gu", "vLLM merged gate_up [T, 2I]: silu(gu[:, :I])*gu[:, I:], fp8 per token",
                silu(tok), _silu_token_gu, _merged, halves),
    ]
    return {v.name: v for v in vs}


def min_bytes(v: Variant, T: int, H: int) -> int:
    """Bytes a kernel must move: read the input(s) once, write q (1 byte) and the f32 scales."""
    n = T * H
    read = 2 * n * (2 if v.spec.prologue == "silu_mul" else 1)
    q = v.spec.quant
    scales = 4 * (n // q.group_size if q.kind == "fp8_per_group" else T)
    return read + n + scales


SILU_SHAPES = [(T, I) for T in (4096, 16384) for I in (14336, 18432, 12288)]
TOKEN_SHAPES = [(T, H) for T in (4096, 16384) for H in (4096, 7168)]
SMALL_SILU = [(T, 14336) for T in (1, 16, 64, 256)]
SMALL_TOKEN = [(T, 4096) for T in (1, 16, 64, 256)]


def default_shapes(v: Variant, small: bool) -> list[tuple[int, int]]:
    if v.spec.prologue == "identity":
        return TOKEN_SHAPES + (SMALL_TOKEN if small else [])
    return SILU_SHAPES + (SMALL_SILU if small else [])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """`TxH,TxH,...` -> [(T, H)]; ValueError naming the bad item and the accepted form."""
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            T, H = (int(p) for p in parts)
        except ValueError:
            T = H = 0
        if T <= 0 or H <= 0:
            raise ValueError(f"bad shape {item!r}: expected TxH with two positive integers, e.g. 4096x14336")
        out.append((T, H))
    return out


def parse_variants(text: str | None) -> list[str]:
    vs = variants()
    names = [n.strip() for n in text.split(",")] if text else list(vs)
    unknown = [n for n in names if n not in vs]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; available: {', '.join(vs)}")
    return names


# ------------------------------------------------------------------ one row
def stock_compile(fn: Callable) -> Callable:
    """`torch.compile(fn)` with default options, fresh Dynamo state; the first call (which
    compiles) runs with Inductor's custom post-grad hooks cleared so no plugin rewrites it."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    cf = torch.compile(fn)
    hooks = {k: None for k in ("post_grad_custom_pre_pass", "post_grad_custom_post_pass") if hasattr(inductor_config, k)}
    state = {"first": True}

    def call(*args):
        if state["first"]:
            state["first"] = False
            with inductor_config.patch(**hooks):
                return cf(*args)
        return cf(*args)

    return call


def compare(fused, stock) -> dict:
    """q equality fraction, largest relative scale difference, scale layout, and the verdict."""
    qf, sf = fused
    qs, ss = stock
    same = (qf.float() == qs.float()).float().mean().item() if qf.shape == qs.shape else 0.0
    rel = ((sf.float() - ss.float()).abs() / ss.float().abs().clamp(min=1e-30)).max().item() if sf.shape == ss.shape else float("inf")
    return dict(q_equal_frac=round(same, 6), scale_max_rel=float(f"{rel:.3g}"),
                scale_strides_same=tuple(sf.stride()) == tuple(ss.stride()),
                ok=bool(same >= Q_EQUAL_MIN and rel <= SCALE_RTOL and tuple(sf.stride()) == tuple(ss.stride())))


def declined(v: Variant, H: int) -> str | None:
    """Why the Triton kernel declines this spec and width (its `supports`), or None."""
    try:
        from ..lowering import act_quant_triton
    except Exception as exc:  # noqa: BLE001 - reported as the row's error
        return f"act_quant_triton does not import ({type(exc).__name__}: {exc})"
    supports = getattr(act_quant_triton, "supports", None)
    return supports(v.spec, H) if supports is not None else None


def bench_one(timer, bw: float, v: Variant, T: int, H: int, device: str = "cuda") -> dict:
    """One row. `timer` is bench norm-quant's `Timer` (tests pass a stand-in on CPU)."""
    from ..lowering import act_quant_ops

    v.spec.check_hidden(H)
    inputs = v.make_inputs(T, H, device)
    x, up = v.op_args(*inputs)
    stock = stock_compile(v.eager)
    # The ptxas is torch's, as in a compiled model (`main`, tools/ptxas.py): assembled by
    # Triton's own, the silu kernel took 168 registers in place of 128 and 123 us in place
    # of 110 (T=4096, I=14336, H100; the norm-quant kernel came out the same with either).
    stock_out = stock(*inputs)
    fused_out = act_quant_ops.call(v.spec, x, up)
    eager_out = v.eager(*inputs)
    # The verdict is against the op's contract, the reference run on CPU copies (eager CPU
    # arithmetic: eager CUDA divides a tensor by a Python scalar as a multiply by its
    # reciprocal, so its scales can be an ulp off the contract). The eager spelling on the
    # device and stock Inductor are compared too but do not decide: by default
    # (emulate_precision_casts=False) Inductor keeps silu(g) and silu(g) * u in f32 where
    # eager rounds both to bf16, so a few % of its q differ.
    from ..lowering.act_quant_reference import reference

    ref = reference(v.spec, x.cpu(), up.cpu() if up is not None else None)
    match = dict(compare(tuple(t.cpu() for t in fused_out), ref), vs="reference (CPU)",
                 eager=compare(fused_out, eager_out), stock=compare(fused_out, stock_out),
                 stock_vs_eager=compare(stock_out, eager_out))
    del fused_out, eager_out, stock_out
    small = T <= 256
    measure = timer.graph if small else timer.hbm
    ours = measure(lambda: act_quant_ops.call(v.spec, x, up))
    theirs = measure(lambda: stock(*inputs))
    lim = min_bytes(v, T, H) / bw * 1e6
    row = dict(variant=v.name, T=T, H=H, timer="cuda_graph" if small else "l2_flushed",
               fusewright_us=round(ours, 2), inductor_us=round(theirs, 2), speedup=round(theirs / ours, 3),
               limit_us=round(lim, 2), fusewright_pct_of_limit=round(100 * lim / ours, 1),
               inductor_pct_of_limit=round(100 * lim / theirs, 1), match=match)
    if not small:
        same = timer.copy_us(min_bytes(v, T, H))
        row["copy_same_bytes_us"] = round(same, 2)
        row["fusewright_pct_of_same_bytes_copy"] = round(100 * same / ours, 1)
        row["inductor_pct_of_same_bytes_copy"] = round(100 * same / theirs, 1)
    return row


def _print_table(rows: list[dict], header: bool) -> None:
    hdr = (f"{'variant':22s} {'T':>6s} {'H':>6s} {'fused us':>10s} {'%lim':>6s} {'%copy':>6s} "
           f"{'inductor us':>12s} {'%lim':>6s} {'speedup':>8s}  match")
    if header:
        print(hdr)
        print("-" * len(hdr))
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:22s} {r['T']:6d} {r['H']:6d}  error: {r['error']}", flush=True)
            continue
        m = r["match"]
        st = m.get("stock", {})
        mt = (("ok" if m["ok"] else "MISMATCH") + f" q={m['q_equal_frac']:.6f} s_rel={m['scale_max_rel']:.2g}"
              + (f" | stock q={st['q_equal_frac']:.4f} s_rel={st['scale_max_rel']:.2g}" if st else ""))
        print(f"{r['variant']:22s} {r['T']:6d} {r['H']:6d} {r['fusewright_us']:10.2f} "
              f"{r['fusewright_pct_of_limit']:6.1f} {r.get('fusewright_pct_of_same_bytes_copy', nan):6.1f} "
              f"{r['inductor_us']:12.2f} {r['inductor_pct_of_limit']:6.1f} {r['speedup']:8.3f}  {mt}", flush=True)


# ------------------------------------------------------------------ the auto table
def write_choice(path: str, rows: list[dict], env: dict, device: str) -> int:
    """Merge this run's rows into the `auto` table at `path` (lowering/act_quant_choice.py
    reads it): rows of the same device, variant and shape are replaced, everything else
    in the file (other devices, `rules`) is kept. Rows without both times, or whose
    outputs did not match, are left out; so is `silu_mul_token_gu`, whose family key
    (silu_mul_token) cannot tell the merged layout from the contiguous one."""
    from ..lowering.act_quant_choice import family

    vs = variants()
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {}
    table["about"] = ("rows for `auto` (lowering/act_quant_choice.py): the fused act_quant op (triton) vs stock "
                      "Inductor compiling the model's spelling (none), same run; written by "
                      "`fusewright bench act-quant --write-choice` (rows whose outputs did not match, and the "
                      "merged gate_up layout, are left out)")
    table["environment"] = env
    measured = table.setdefault("measured", {})
    keep = {(r["variant"], r["T"], r["H"]): r for r in measured.get(device, [])}
    added = 0
    for r in rows:
        if "error" in r or not r["match"]["ok"] or r["variant"] == "silu_mul_token_gu":
            continue
        keep[(r["variant"], r["T"], r["H"])] = dict(
            variant=r["variant"], family=family(vs[r["variant"]].spec), T=r["T"], H=r["H"], timer=r["timer"],
            us={"triton": r["fusewright_us"], "none": r["inductor_us"]}, date=env.get("date"))
        added += 1
    measured[device] = sorted(keep.values(), key=lambda r: (r["variant"], r["T"], r["H"]))
    table.setdefault("rules", {})
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    print(f"{added} rows for {device} -> {path}")
    return 0


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(variants()))
    parser.add_argument("--shapes", default=None,
                        help="TxH,TxH,... instead of the defaults (H: the quantized width, I for silu_mul)")
    parser.add_argument("--small", action="store_true",
                        help="also T in 1, 16, 64, 256 (I=14336 / H=4096) under CUDA graphs")
    parser.add_argument("--flush", choices=FLUSH_MODES, default="read",
                        help="how L2 is emptied before each large-T call (see bench norm-quant)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="write environment and rows as JSON")
    parser.add_argument("--write-choice", metavar="PATH",
                        help="merge the measured rows into this `auto` table (lowering/act_quant_auto.json)")


def _error(msg: str) -> int:
    print(f"fusewright bench act-quant: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace, config=None) -> int:
    try:
        names = parse_variants(args.variants)
        shapes = parse_shapes(args.shapes) if args.shapes else None
    except ValueError as exc:
        return _error(str(exc))
    vs = variants()
    for n in names:
        for T, H in shapes or []:
            try:
                vs[n].spec.check_hidden(H)
            except ValueError as exc:
                return _error(f"{n}: {exc}")
    if not torch.cuda.is_available():
        return _error("needs a CUDA device (none is visible to torch)")
    from ..lowering import act_quant_ops

    if act_quant_ops._triton_launch() is None:
        # the op's CUDA impl would silently run the eager reference: nothing fused to time
        try:
            import importlib

            importlib.import_module("fusewright.lowering.act_quant_triton")  # only for the error's text
            why = "it has no `launch`"
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}"
        return _error(f"the Triton kernel (fusewright.lowering.act_quant_triton.launch) is unavailable: {why}")
    from ..lowering.auto import plain_device_name
    from .bench_norm_quant import Timer, copy_bandwidth, environment
    from .ptxas import use_torch_ptxas

    torch.manual_seed(0)
    use_torch_ptxas()  # before the first Triton compile of the process (tools/ptxas.py)
    timer = Timer(args.reps, flush=args.flush)
    copies: dict = {}
    bw = copy_bandwidth(timer, copies)
    env = dict(environment(bw), l2_flush=timer.flush_mode, **copies)
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    for n in names:
        for T, H in shapes or default_shapes(vs[n], args.small):
            why = declined(vs[n], H)
            try:
                if why:
                    raise RuntimeError(f"the Triton kernel declines: {why}")
                row = bench_one(timer, bw, vs[n], T, H)
            except Exception as exc:  # one failing row (a shape the kernel declines) is a result
                row = dict(variant=n, T=T, H=H, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(row)
            _print_table([row], header=len(rows) == 1)
            if args.json:  # rows as they come: a cut-off run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"environment": env, "rows": rows}, f, indent=1)
            torch.cuda.empty_cache()
    if args.write_choice:
        write_choice(args.write_choice, rows, env, plain_device_name("cuda"))
    bad = [r for r in rows if "error" in r or not r["match"]["ok"]]
    if bad:
        print(f"{len(bad)} rows failed or did not match (see above)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))

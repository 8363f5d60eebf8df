"""`fusewright bench rope`: RoPE on q and k, stock Inductor vs fusewright, in one run.

Variants (q and k bf16 `[1, S, H, D]`, f32 per-token tables `[1, S, 1, D]` sliced
inline, the diffusers Wan spelling):

* `inductor_strided` - stock Inductor on the strided writeback (the baseline);
* `inductor_stack`   - stock Inductor on the stack/flatten spelling;
* `fw_aten`          - fusewright with lowering rope=aten (writeback -> stack/flatten);
* `fw_triton`        - fusewright with lowering rope=triton (one fused q+k launch);
* `kernel`           - the fused op called directly (no compile);
* `kernel_direct`    - the Triton kernel launched into preallocated outputs;
* copy bandwidth     - cudaMemcpy and an elementwise bf16 kernel; the larger is the limit.

On CUDA each variant is captured in a CUDA graph and replayed; L2 is flushed before
every repetition by reading a 256 MB buffer (tools/cuda_graph.flush_l2); times are
CUDA-event medians. Minimum bytes for RoPE on q+k: q and k read and written once (4 x S x H x D bf16, the design's
8TH with TH = S*H*D) plus the half-width cos and sin actually used (2 x S x D/2 f32).
On CPU the same variants minus the Triton ones run with wall-clock medians.

    fusewright bench rope [--device cuda] [--seq 4096,75600] [--heads 40] [--head-dim 128]
                          [--reps 50] [--json PATH] [--table PATH] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from .cuda_graph import capture, flush_l2


# ------------------------------------------------------------------ spellings
def wan_rope(x, freqs_cos, freqs_sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def stack_rope(x, freqs_cos, freqs_sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)


def qk(spelling):
    def fn(q, k, fc, fs):
        return spelling(q, fc, fs), spelling(k, fc, fs)
    return fn


def make_inputs(seq: int, heads: int, head_dim: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, seq, heads, head_dim, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, seq, heads, head_dim, generator=g).to(device, torch.bfloat16)
    angles = torch.rand(1, seq, 1, head_dim // 2, generator=g) * 6.2831853
    # Wan keeps full-width tables with each frequency repeated twice
    fc = angles.cos().repeat_interleave(2, -1).to(device)
    fs = angles.sin().repeat_interleave(2, -1).to(device)
    return q, k, fc, fs


def min_bytes(seq: int, heads: int, head_dim: int) -> int:
    return 4 * seq * heads * head_dim * 2 + 2 * seq * (head_dim // 2) * 4


# ------------------------------------------------------------------ timing
class CudaTimer:
    def __init__(self, reps: int, flush_mb: int = 256):
        self.reps = reps
        self.flush = torch.empty(flush_mb * 2**20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median microseconds of `fn` replayed from a CUDA graph, L2 flushed (read, leaving
        clean lines: cuda_graph.flush_l2) before each rep."""
        graph = capture(fn)
        times = []
        for _ in range(self.reps):
            flush_l2(self.flush)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def cpu_time(fn: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth(timer: CudaTimer, nbytes: int = 2**30) -> dict[str, float]:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), two ways.

    `memcpy`: `dst.copy_(src)` (cudaMemcpy); `kernel`: an elementwise kernel reading and
    writing bf16 (`torch.neg(out=)`). The 2026-11-22 H100 run measured only the first
    (2.43 TB/s), which some variants then exceeded; the limit is the larger of the two.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    out = {"memcpy": 2 * nbytes / (timer(lambda: dst.copy_(src)) * 1e-6)}
    a, b = src.view(torch.bfloat16), dst.view(torch.bfloat16)
    out["kernel"] = 2 * nbytes / (timer(lambda: torch.neg(a, out=b)) * 1e-6)
    return out


# ------------------------------------------------------------------ variants
_BASE_CONFIG = None  # the PassConfig given on the command line, if any


def compiled(fn, changes: dict | None):
    import fusewright
    from ..passes.config import PassConfig

    torch._dynamo.reset()
    if changes is None:
        return torch.compile(fn)
    config = PassConfig.resolve(_BASE_CONFIG).replace(**changes)
    return torch.compile(fn, options=fusewright.inductor_options(config))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    ai, bi = a.view(torch.int16).int(), b.view(torch.int16).int()
    # map the sign-magnitude bf16 patterns onto a monotonic integer line
    ai = torch.where(ai < 0, -32768 - ai, ai)
    bi = torch.where(bi < 0, -32768 - bi, bi)
    return int((ai - bi).abs().max().item()) if a.numel() else 0


def bench_shape(seq, heads, head_dim, device, timer, copy_bw, reps) -> list[dict]:
    import fusewright

    q, k, fc, fs = make_inputs(seq, heads, head_dim, device)
    with torch.no_grad():
        eager = qk(wan_rope)(q, k, fc, fs)
    variants = {
        "inductor_strided": (qk(wan_rope), None),
        "inductor_stack": (qk(stack_rope), None),
        "fw_aten": (qk(wan_rope), {"lowering": {"rope": "aten"}}),
    }
    if device == "cuda":
        variants["fw_triton"] = (qk(wan_rope), {"lowering": {"rope": "triton"}})
    rows = []
    for name, (fn, config) in variants.items():
        fusewright.reset_report()
        cfn = compiled(fn, config)
        with torch.no_grad():
            out = cfn(q, k, fc, fs)
            report = fusewright.last_report().to_dict()
            run = (lambda: cfn(q, k, fc, fs))
            us = timer(run) if device == "cuda" else cpu_time(run, reps)
        rows.append(dict(variant=name, us=us, ulp_vs_eager=max(ulp_diff(o, e) for o, e in zip(out, eager)),
                         rope_rewrites=report["passes"].get("rewrite_rope", {}).get("details")))
    if device == "cuda":
        cos, sin = fc[..., 0::2], fs[..., 1::2]
        out = torch.ops.fusewright.rope_qk(q, k, cos, sin, True)
        us = timer(lambda: torch.ops.fusewright.rope_qk(q, k, cos, sin, True))
        rows.append(dict(variant="kernel", us=us, ulp_vs_eager=max(ulp_diff(o, e) for o, e in zip(out, eager)),
                         bitwise_vs_eager=all(torch.equal(o, e) for o, e in zip(out, eager))))
        # the same kernel launched directly into preallocated outputs (as the sweep does):
        # the 2026-11-22 run saw the op path 15% slower than this at S=75600
        from ..lowering import rope_ops, rope_triton

        c4, s4 = rope_ops._tables4d(cos, q), rope_ops._tables4d(sin, q)
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        us = timer(lambda: rope_triton.launch(rope_triton.rope_kernel, q, qo, k, ko, c4, s4,
                                              interleaved=True, fp_fusion=False))
        rows.append(dict(variant="kernel_direct", us=us,
                         ulp_vs_eager=max(ulp_diff(o, e) for o, e in zip((qo, ko), eager))))
    nbytes = min_bytes(seq, heads, head_dim)
    base = rows[0]["us"]
    for row in rows:
        row.update(seq=seq, heads=heads, head_dim=head_dim, device=device, bytes=nbytes,
                   speedup_vs_inductor_strided=base / row["us"])
        if copy_bw:
            row["pct_copy_limit"] = 100.0 * nbytes / (row["us"] * 1e-6) / copy_bw
    return rows


def sweep(seq, heads, head_dim, timer, copy_bw) -> list[dict]:
    """Kernel launch configurations at one shape (direct launches, no wrap_triton)."""
    from ..lowering import rope_ops, rope_triton

    q, k, fc, fs = make_inputs(seq, heads, head_dim, "cuda")
    c4, s4 = rope_ops._tables4d(fc[..., 0::2], q), rope_ops._tables4d(fs[..., 1::2], q)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    rows = []
    for elems, warps, bh in itertools.product((1024, 2048, 4096, 8192), (4, 8), (4, 8)):
        cfg = dict(elems=elems, num_warps=warps, max_block_h=bh)

        def run():
            rope_triton.launch(rope_triton.rope_kernel, q, qo, k, ko, c4, s4, interleaved=True,
                               fp_fusion=False, **cfg)
        try:
            us = timer(run)
        except Exception as exc:  # a configuration the compiler rejects
            rows.append(dict(cfg, error=str(exc)[:200]))
            continue
        rows.append(dict(cfg, us=us,
                         pct_copy_limit=100.0 * min_bytes(seq, heads, head_dim) / (us * 1e-6) / copy_bw))
    return rows


def auto_rows(rows: list[dict], device: str) -> dict[str, list[dict]]:
    """Rows for lowering/rope_auto.json: per shape, the fastest of triton / aten / none.
    Keyed by the device the rows were measured on (`--device cpu` on a GPU machine is "cpu")."""
    key = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    by_seq: dict[int, dict[str, float]] = {}
    for row in rows:
        by_seq.setdefault(row["seq"], {})[row["variant"]] = row["us"]
    table = []
    for seq, t in sorted(by_seq.items()):
        options = {"none": t["inductor_strided"], "aten": t["fw_aten"]}
        best_plain = min(options, key=options.get)
        if "fw_triton" in t:
            options["triton"] = t["fw_triton"]
        row = rows[0]
        table.append(dict(elements=seq * row["heads"] * row["head_dim"], seq=seq, heads=row["heads"],
                          head_dim=row["head_dim"], us={k: round(v, 2) for k, v in options.items()},
                          best=min(options, key=options.get), best_without_triton=best_plain))
    return {key: table}


def environment() -> dict:
    import triton

    env = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = platform.processor() or "cpu"
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", default="256,1024,4096,16384,75600", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    parser.add_argument("--table", metavar="PATH", help="write rows for lowering/rope_auto.json")
    parser.add_argument("--sweep", action="store_true",
                        help="first compare kernel launch configurations, then use the fastest")


def main(args: argparse.Namespace | list[str] | None = None, config=None) -> int:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="fusewright bench rope", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(parser)
        args = parser.parse_args(args)
    global _BASE_CONFIG
    _BASE_CONFIG = config
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fusewright bench rope: error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    env = environment()
    timer = CudaTimer(args.reps) if args.device == "cuda" else None
    copies = copy_bandwidth(timer) if timer else None
    copy_bw = max(copies.values()) if copies else None
    result = dict(env=env, copy_bytes_per_s=copy_bw, copy_by_method=copies, rows=[], sweep=[])
    print(json.dumps(env))
    if copies:
        print("copy bandwidth: " + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in copies.items()))
    if args.sweep and timer:
        # The sweep runs first so that the fused variants below use its winner.
        from ..lowering import rope_triton

        seq = max(int(s) for s in args.seq.split(","))
        result["sweep"] = sweep(seq, args.heads, args.head_dim, timer, copy_bw)
        for row in result["sweep"]:
            print("sweep", json.dumps(row), flush=True)
        ok = [r for r in result["sweep"] if "us" in r]
        if ok:
            best = min(ok, key=lambda r: r["us"])
            rope_triton.ELEMS_PER_PROGRAM = best["elems"]
            rope_triton.NUM_WARPS = best["num_warps"]
            rope_triton.MAX_BLOCK_H = best["max_block_h"]
            result["kernel_config"] = best
            print("using kernel config", json.dumps(best), flush=True)
    else:
        from ..lowering import rope_triton

        result["kernel_config"] = dict(elems=rope_triton.ELEMS_PER_PROGRAM, num_warps=rope_triton.NUM_WARPS,
                                       max_block_h=rope_triton.MAX_BLOCK_H)
    for seq in (int(s) for s in args.seq.split(",")):
        for row in bench_shape(seq, args.heads, args.head_dim, args.device, timer, copy_bw, args.reps):
            result["rows"].append(row)
            pct = f"{row['pct_copy_limit']:5.1f}%" if "pct_copy_limit" in row else "   -  "
            print(f"S={seq:6d} {row['variant']:17s} {row['us']:9.1f} us  {pct}  "
                  f"x{row['speedup_vs_inductor_strided']:.2f} vs inductor_strided  ulp<={row['ulp_vs_eager']}"
                  + (f"  bitwise={row['bitwise_vs_eager']}" if "bitwise_vs_eager" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            json.dump(auto_rows(result["rows"], args.device), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

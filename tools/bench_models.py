"""`fusewright bench models`: whole layers of real model shapes, plugin vs stock torch.compile vs eager.

Workloads (bf16; the layers, in tools/bench_models_layers.py, are plain torch that mirrors
the third-party spellings, so the GPU machine needs neither transformers nor diffusers):

* `llama`: a Llama-3-8B decoder layer (hidden 4096, 32 heads, 8 KV heads, head_dim 128,
  MLP 14336, RMSNorm eps 1e-5, rotate-half RoPE), transformers' spelling of the norm,
  RoPE and SDPA with `enable_gqa=True` (transformers 5 on CUDA without a padding mask;
  `llama_repeat_kv`, prefill only: its `repeat_kv` fallback, what sessions 2 and 3
  measured); every linear is `model_zoo.Float8RowwiseScaledMMLinear`
  (torchao float8 rowwise inference: per-token FP8 quantization of the activation,
  `torch._scaled_mm` with rowwise scales on CUDA). Prefill T=4096; decode T in 1/16/64,
  where attention runs over the T new tokens only (causal, no KV cache).
* `deepseek`: DeepSeek-V3's q path: `q_a_layernorm` (`F.rms_norm` over q_lora_rank 1536,
  bf16 weight, eps 1e-6) -> group-128 FP8 quantization as DeepSeek's `act_quant` computes
  it (f32 amax per 128-block floored at 1e-4, scale amax/448, x/scale), spelled in torch
  with the clamp to +-448 of vLLM's native group quant -> `q_b_proj` (1536 -> 128 x 192)
  as an opaque custom op (`fwbench_models::fp8_group_gemm`: blockwise `torch._scaled_mm`
  where this torch build has it, else dequantize + bf16 GEMM). T=4096 and 1/16/64.
* `wan`: a Wan2.2-14B self-attention block at S=16384 (dim 5120, 40 heads, head_dim 128):
  q/k/v linears, `torch.nn.RMSNorm` on q and k across heads, diffusers' interleaved RoPE
  written back through strided slices (`out[..., 0::2] = ...`) with f32 tables, SDPA,
  output linear.

Variants, in one process on the same inputs: `eager`, `stock` (torch.compile, Inductor
defaults) and `plugin` (torch.compile with `fusewright.inductor_options(config)`; the
config comes from `-cc.KEY=VALUE`, lowering `auto` by default). Each variant's call is
captured in a CUDA graph; the three graphs are replayed interleaved, CUDA events around
each replay, median of `--reps`. Prefill / S=16k: one call per graph, L2 flushed (256 MB
written) before each replay. Decode: 20 calls per graph, time per call (the regime a
decode step runs in under CUDA graphs; host launch overhead is excluded everywhere).

Kernel counts come from Inductor's output code (`fusewright.testing.kernels`): `triton`
(Inductor's Triton kernels), `extern` (extern calls, aten fallbacks, custom ops: GEMMs,
SDPA, fusewright's fused ops), and `nqr`, the norm/quant/rope kernels, classified as:

* a fusewright op or kernel (`_rms_norm_quant_kernel`, `_rope_kernel`, `fusewright::*`);
* an Inductor kernel whose fused ATen ops (the `Original ATen` launch comment, else the
  kernel name) include any of rsqrt, mean, pow, amax, abs, reciprocal, clamp, cat,
  stack, slice_scatter, or whose body computes rsqrt, sqrt or abs (Inductor may split a
  quantization into an amax kernel and a clamp/divide kernel: both count): the ops only RMSNorm, FP8
  quantization and RoPE bring into these layers (SiLU-mul, residual adds, bias adds,
  copies and GEMM/SDPA do not count). A kernel that fuses RoPE into a norm counts once.

Kernel time per class: torch.profiler over graph replays (kernel names matched against
the output code), no L2 flush inside the profile; the cut is 1 - plugin/stock.
Speedup = stock / plugin (> 1: the plugin is faster).

`--tiny` runs small shapes on CPU (or CUDA): no CUDA graphs, wall-clock medians, kernel
counts and classification from the output code but no profiler; used by the tests.

    fusewright bench models --json out.json
    fusewright bench models --tiny --json out.json
    fusewright bench models --only llama --reps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from .bench_models_layers import (
    DeepSeekQPath, LlamaLayer, WanSelfAttention, llama_rope_tables, probe_blockwise, wan_rope_tables,
)
from .cuda_graph import capture as capture_graph

HELP = "whole layers (Llama-3-8B FP8, DeepSeek-V3 q path, Wan2.2 attention): plugin vs stock vs eager"

BF16 = torch.bfloat16


# ============================================================================ workloads
FULL = {
    "llama": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, eps=1e-5,
                  prefill=4096, decode=(1, 16, 64), attention="gqa"),
    # the same layer with transformers' repeat_kv fallback (sessions 2 and 3 measured this one)
    "llama_repeat_kv": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, eps=1e-5,
                            prefill=4096, decode=(), attention="repeat_kv"),
    "deepseek": dict(q_lora_rank=1536, heads=128, qk_head_dim=192, prefill=4096, decode=(1, 16, 64)),
    "wan": dict(dim=5120, heads=40, seq=16384),
}
TINY = {
    "llama": dict(hidden=256, heads=4, kv_heads=2, head_dim=64, inter=512, eps=1e-5, prefill=32, decode=(1,),
                  attention="gqa"),
    "llama_repeat_kv": dict(hidden=256, heads=4, kv_heads=2, head_dim=64, inter=512, eps=1e-5, prefill=32,
                            decode=(), attention="repeat_kv"),
    "deepseek": dict(q_lora_rank=256, heads=2, qk_head_dim=192, prefill=32, decode=(1,)),
    "wan": dict(dim=256, heads=2, seq=64),
}


def _bf16_params(module: nn.Module, device: str) -> nn.Module:
    """Parameters to bf16, buffers kept as they are: `Module.to(bf16)` would also cast the
    FP8 weights and their f32 scales (FP8 counts as floating point)."""
    module = module.to(device).eval()
    for p in module.parameters():
        p.data = p.data.to(BF16)
    return module


def build(name: str, cfg: dict, tokens: int, device: str) -> tuple[Callable, tuple, dict]:
    """`(fn, inputs, info)` for one workload at one token count, weights seeded."""
    torch.manual_seed(0)
    if name in ("llama", "llama_repeat_kv"):
        layer = LlamaLayer(cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["inter"], cfg["eps"],
                           attention=cfg["attention"])
        with torch.no_grad():
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.normal_(1.0, 0.1)
        layer = _bf16_params(layer, device)
        x = torch.randn(1, tokens, cfg["hidden"], dtype=BF16)
        cos, sin = llama_rope_tables(tokens, cfg["head_dim"], start=0 if tokens > 64 else 1000)
        inputs = (x.to(device), cos.to(device), sin.to(device))
        return layer, inputs, {"shape": f"[1,{tokens},{cfg['hidden']}]", "gemm": "scaled_mm_rowwise" if device == "cuda" else "dequant"}
    if name == "deepseek":
        mod = DeepSeekQPath(cfg["q_lora_rank"], cfg["heads"], cfg["qk_head_dim"])
        with torch.no_grad():
            mod.q_a_layernorm.weight.normal_(1.0, 0.1)
        mod = _bf16_params(mod, device)
        x = torch.randn(tokens, cfg["q_lora_rank"], dtype=BF16).to(device)
        gemm = probe_blockwise(tokens, cfg["q_lora_rank"], cfg["heads"] * cfg["qk_head_dim"], device)
        return mod, (x,), {"shape": f"[{tokens},{cfg['q_lora_rank']}]->[{tokens},{cfg['heads']}x{cfg['qk_head_dim']}]",
                           "gemm": gemm}
    if name == "wan":
        mod = WanSelfAttention(cfg["dim"], cfg["heads"])
        with torch.no_grad():
            mod.norm_q.weight.normal_(1.0, 0.1)
            mod.norm_k.weight.normal_(1.0, 0.1)
        mod = _bf16_params(mod, device)
        x = torch.randn(1, tokens, cfg["dim"], dtype=BF16)
        cos, sin = wan_rope_tables(tokens, cfg["dim"] // cfg["heads"])
        return mod, (x.to(device), cos.to(device), sin.to(device)), {"shape": f"[1,{tokens},{cfg['dim']}]", "gemm": "bf16"}
    raise ValueError(f"unknown workload {name!r}; available: {', '.join(FULL)}")


def cases(table: dict, only: list[str]) -> list[tuple[str, str, int]]:
    """Large shapes first, then decode (DeepSeek's compile in seconds, Llama's last), so a
    run cut off by a time limit keeps the headline rows (the JSON is written per row)."""
    out = [(n, "prefill", table[n]["seq"] if n == "wan" else table[n]["prefill"]) for n in only]
    for name in ("deepseek", "llama"):
        if name in only:
            out.extend((name, "decode", t) for t in table[name]["decode"])
    return out


# ============================================================================ kernels
NQR_OPS = frozenset({"rsqrt", "mean", "pow", "amax", "abs", "reciprocal", "clamp", "clamp_min", "clamp_max", "cat",
                     "stack", "slice_scatter", "rms_norm", "_fused_rms_norm"})
# operations read from a kernel's body: a kernel that fusewright's aten lowering produced
# is named after whatever nodes Inductor took its origins from, so the name can miss them
NQR_BODY = frozenset({"rsqrt", "sqrt", "abs"})
_FUSEWRIGHT_KERNELS = ("_rms_norm_quant_kernel", "_rope_kernel", "_act_quant_kernel")


def is_fusewright(name: str) -> bool:
    return name.startswith("fusewright") or any(k in name for k in _FUSEWRIGHT_KERNELS)


def classify(kernel) -> str:
    """'nqr' (norm/quant/rope), 'gemm_attn' (extern GEMM / SDPA / custom ops) or 'other'."""
    if is_fusewright(kernel.name) or any(is_fusewright(op) for op in kernel.ops):
        return "nqr"
    if kernel.kind in ("extern", "aten_fallback", "custom_op"):
        return "gemm_attn"
    if NQR_OPS & set(kernel.ops) or NQR_BODY & {op.split(".")[-1] for op in kernel.body_ops}:
        return "nqr"
    return "other"


def kernel_summary(codes: list[str]) -> tuple[dict, dict]:
    """Counts by class from output code, and kernel name -> class (for the profiler)."""
    from ..testing import kernels

    ks = kernels(codes)
    counts = {"total": len(ks), "triton": sum(k.kind.startswith("triton") for k in ks),
              "extern": sum(k.kind in ("extern", "aten_fallback", "custom_op") for k in ks),
              "nqr": 0, "other": 0, "gemm_attn": 0}
    names = {}
    for k in ks:
        c = classify(k)
        counts[c] += 1
        names[k.name] = c
    counts["list"] = [f"{k.name} [{classify(k)}]" for k in ks]
    return counts, names


def profile_class_times(replay: Callable, calls: int, names: dict, iters: int = 5) -> dict:
    """µs per call of GPU kernel time by class, from torch.profiler over `iters` calls of `replay`
    (each making `calls` calls of the workload)."""
    from torch.profiler import ProfilerActivity, profile

    from .output_code import ops_from_name

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            replay()
        torch.cuda.synchronize()
    by_class = {"nqr": 0.0, "gemm_attn": 0.0, "other": 0.0}
    kernels_us: dict = {}
    totals: dict = {}
    # kernel events only: key_averages() would also give the CPU op that launched a kernel
    # (aten::mm) the kernel's time, and GPU user annotations span whole graphs
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        if e.name.startswith("##") or "CompiledFxGraph" in e.name:
            continue
        totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    for name, t in totals.items():
        if is_fusewright(name):
            c = "nqr"
        elif name in names:
            c = names[name]
        elif name.startswith("triton_"):
            c = "nqr" if NQR_OPS & set(ops_from_name(name)) else "other"
        else:
            c = "gemm_attn" if any(s in name.lower() for s in ("gemm", "flash", "fmha", "attention", "sm90", "nvjet",
                                                               "cutlass", "xmma", "f8f8")) else "other"
        per_call = t / (iters * calls)
        by_class[c] += per_call
        kernels_us[name] = (c, round(per_call, 2))
    by_class = {k: round(v, 2) for k, v in by_class.items()}
    by_class["total"] = round(sum(v for k, v in by_class.items()), 2)
    by_class["kernels"] = {n: {"class": c, "us": us} for n, (c, us) in sorted(kernels_us.items(), key=lambda kv: -kv[1][1])}
    return by_class


# ============================================================================ timing
class GraphTimer:
    """Interleaved CUDA-graph replays of several variants, CUDA events, median."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def time(self, graphs: dict, calls: int, flush: bool) -> dict:
        times: dict = {k: [] for k in graphs}
        for _ in range(self.reps):
            for name, g in graphs.items():
                if flush:
                    self.flush.zero_()
                torch.cuda._sleep(100_000)  # keep the GPU busy while the host queues the replay
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) * 1e3 / calls)
        # the spread of the replays, so a ratio near 1 can be read against the noise
        self.spread = {k: [round(q, 2) for q in statistics.quantiles(v, n=4)[::2]] for k, v in times.items()}
        return {k: statistics.median(v) for k, v in times.items()}


def wall_time(fns: dict, reps: int) -> dict:
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


# ============================================================================ one case
def _compile(fn: Callable, inputs: tuple, options: dict) -> tuple[Callable, Any, list[str], float]:
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    start = time.perf_counter()
    with inductor_config.patch({"fx_graph_cache": False, "fx_graph_remote_cache": False}):
        compiled = torch.compile(fn, options=options, dynamic=False)
        with torch.no_grad():
            out, codes = run_and_get_code(compiled, *inputs)
    return compiled, out, list(codes), time.perf_counter() - start


def _errors(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs": round((a - b).abs().max().item(), 6),
            "rel_l2": float(f"{((a - b).norm() / b.norm().clamp(min=1e-30)).item():.3g}")}


def run_case(name: str, phase: str, tokens: int, cfg: dict, config, device: str, reps: int,
             timer: GraphTimer | None) -> dict:
    import fusewright

    fn, inputs, info = build(name, cfg, tokens, device)
    row: dict = {"workload": name, "phase": phase, "T": tokens, **info}
    options = dict(fusewright.inductor_options(config))
    cuda_timing = timer is not None
    calls = 20 if phase == "decode" and cuda_timing else 1
    graphs: dict = {}
    prof: dict = {}
    wall: dict = {}

    def capture_and_profile(variant: str, f: Callable, names: dict | None) -> None:
        # right after the variant's compile: Dynamo is reset before the next one, after
        # which calling `f` again would compile again
        if not cuda_timing:
            f()  # warm-up
            wall[variant] = wall_time({variant: f}, reps)[variant]
            return
        graphs[variant] = capture_graph(f, calls)
        if names is not None:
            try:
                prof[variant] = profile_class_times(f, 1, names)
            except Exception as exc:  # a profiler failure loses the classification, not the latencies
                row["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]

    with torch.no_grad():
        eager_out = fn(*inputs)
        capture_and_profile("eager", lambda: fn(*inputs), None)
        stock_fn, stock_out, stock_codes, stock_s = _compile(fn, inputs, {})
        stock_k, stock_names = kernel_summary(stock_codes)
        capture_and_profile("stock", lambda: stock_fn(*inputs), stock_names)
        fusewright.reset_report()
        plugin_fn, plugin_out, plugin_codes, plugin_s = _compile(fn, inputs, options)
        report = fusewright.last_report()
        plugin_k, plugin_names = kernel_summary(plugin_codes)
        capture_and_profile("plugin", lambda: plugin_fn(*inputs), plugin_names)
    row["compile_s"] = {"stock": round(stock_s, 2), "plugin": round(plugin_s, 2)}
    row["rewrites"] = {k: v for k, v in report.rewrites().items() if v}
    row["skips"] = [f"{p}: {s.reason}" for p, st in report.items() for s in st.skipped][:20]
    row["errors"] = [f"{p}: {e}" for p, st in report.items() for e in getattr(st, "errors", [])][:10]
    row["plugin_vs_stock"] = _errors(plugin_out, stock_out)
    row["stock_vs_eager"] = _errors(stock_out, eager_out)
    row["kernels"] = {"stock": stock_k, "plugin": plugin_k}

    if not cuda_timing:  # wall-clock medians, each variant right after its compile
        us = wall
        row["timer"] = "wall"
    else:
        us = timer.time(graphs, calls, flush=phase != "decode")
        row["timer"] = "cuda_graph_x20" if calls > 1 else "cuda_graph_l2_flushed"
        row["us_p25_p75"] = timer.spread
        if "stock" in prof and "plugin" in prof:
            row["profile_us"] = prof
            s_nqr, p_nqr = prof["stock"]["nqr"], prof["plugin"]["nqr"]
            row["nqr_us"] = {"stock": s_nqr, "plugin": p_nqr}
            row["nqr_cut_pct"] = round(100.0 * (1 - p_nqr / s_nqr), 1) if s_nqr else None
        graphs.clear()
    row["us"] = {k: round(v, 2) for k, v in us.items()}
    row["speedup_vs_stock"] = round(us["stock"] / us["plugin"], 3)
    row["speedup_vs_eager"] = round(us["eager"] / us["plugin"], 3)
    return row


# ============================================================================ CLI
def environment(device: str) -> dict:
    env = dict(torch=torch.__version__, device=device,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def format_row(r: dict) -> str:
    us, k = r["us"], r["kernels"]
    nqr = r.get("nqr_us")
    nqr_txt = (f"{nqr['stock']:8.1f} {nqr['plugin']:8.1f} {r['nqr_cut_pct']:6.1f}%" if nqr and r.get("nqr_cut_pct")
               is not None else f"{'-':>8s} {'-':>8s} {'-':>7s}")
    kk = f"{k['stock']['total']}/{k['stock']['nqr']} -> {k['plugin']['total']}/{k['plugin']['nqr']}"
    rw = ",".join(f"{n}={v}" for n, v in r["rewrites"].items()) or "none"
    return (f"{r['workload']:9s} {r['phase']:8s} {r['T']:6d} {us['eager']:10.1f} {us['stock']:10.1f} "
            f"{us['plugin']:10.1f} {r['speedup_vs_stock']:7.3f} {nqr_txt} {kk:>16s} "
            f"{r['plugin_vs_stock']['rel_l2']:9.2g}  {rw}")


HEADER = (f"{'workload':9s} {'phase':8s} {'T':>6s} {'eager us':>10s} {'stock us':>10s} {'plugin us':>10s} "
          f"{'speedup':>7s} {'nqr stk':>8s} {'nqr plg':>8s} {'cut':>7s} {'kern tot/nqr':>16s} {'rel err':>9s}  rewrites")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default="llama,deepseek,wan",
                        help="comma-separated subset of: llama,llama_repeat_kv,deepseek,wan")
    parser.add_argument("--phases", default="prefill,decode", help="comma-separated subset of: prefill,decode")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU unless --device cuda); wall-clock times")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda, cpu with --tiny)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30; 5 with --tiny)")
    parser.add_argument("--json", metavar="PATH", help="write environment and rows as JSON (after every row)")


def main(args: argparse.Namespace, config=None) -> int:
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("fusewright bench models: needs a CUDA device (or --tiny for a CPU run)", file=sys.stderr)
        return 2
    table = TINY if args.tiny else FULL
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in table]
    if unknown:
        print(f"unknown workloads {unknown}; available: {', '.join(table)}", file=sys.stderr)
        return 2
    phases = set(args.phases.split(","))
    reps = args.reps or (5 if args.tiny else 30)
    timer = GraphTimer(reps) if device == "cuda" and not args.tiny else None
    env = environment(device)
    env.update(tiny=bool(args.tiny), reps=reps, config=str(config) if config is not None else "default")
    print(json.dumps(env), flush=True)
    print(HEADER, flush=True)
    rows, failures = [], 0
    for name, phase, tokens in cases(table, only):
        if phase not in phases:
            continue
        try:
            row = run_case(name, phase, tokens, table[name], config, device, reps, timer)
        except Exception as exc:  # one failing workload is reported; the others still run
            import traceback

            traceback.print_exc()
            row = {"workload": name, "phase": phase, "T": tokens, "error": f"{type(exc).__name__}: {exc}"[:500]}
            failures += 1
            print(f"{name:9s} {phase:8s} {tokens:6d} FAILED {row['error']}", flush=True)
        else:
            print(format_row(row), flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "rows": rows}, f, indent=1)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))

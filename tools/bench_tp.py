"""Tensor-parallel benchmark: the TP example layer, stock Inductor vs fusewright, per rank.

    torchrun --nproc-per-node 2 -m fusewright.tools.bench_tp --json OUT/tp.json [--dump-dir OUT/code]
    torchrun --nproc-per-node 2 -m fusewright.tools.bench_tp --device cpu --tiny      # gloo smoke run
    (or `fusewright bench tp ...` under torchrun)

One process per GPU (NCCL; NVLink multicast off: `NCCL_NVLS_ENABLE=0` is set here unless
the environment sets it). Each rank builds `tools/tp_example.TPDecoderLayer` at
Llama-3-8B shapes (hidden 4096, 32 query heads, 8 KV heads, intermediate 14336, bf16,
FP8 rowwise activations) from the same seed, keeps its shard (TP=2: 16 query heads, 4 KV
heads, intermediate 7168), and compiles it twice with `dynamic=False`: stock Inductor
and fusewright (one compiled entry per token count). Per token count T (prefill 4096,
decode 1, 16, 64: the same layer on T new tokens, no KV cache) and per rank it records:

* outputs: plugin vs stock bitwise (and max abs diff), and the rank's output vs the
  single-process layer (max abs diff; FP8 of partial activations differs by a few steps);
* kernels, read from the output code (`tools/output_code.py`): generated (Triton or C++)
  kernels, all launches, collectives, no-op kernels (named), norm kernels, quant kernels
  and kernels doing both (the fused norm+quant: a generated kernel computing the rsqrt
  and the amax, or `fusewright.rms_norm_quant`, which launches one Triton kernel);
* latency (CUDA; on CPU a smoke timing only): each variant captured in a CUDA graph (thread-local capture mode,
  which the NCCL watchdog thread needs) and replayed; stock and plugin interleaved
  round by round, a barrier before every sample so the ranks enter the all-reduces
  together. Prefill: L2 flushed (256 MB written) before each replay, one replay per
  sample. Decode: `--decode-calls` replays back to back per sample (a decode loop), time
  per call. Medians over `--reps` samples, per rank.

`--dump-dir DIR` writes each compile's output code to
`DIR/{stock,plugin}/rank{R}/T{T}/output_code.py`, the layout `fusewright graph-diff
DIR/stock DIR/plugin` reads as one report per rank. Rank 0 gathers every rank's result,
prints a table and writes `--json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HELP = "TP=2 example layer under torchrun: kernels and latency per rank, stock vs fusewright"

LLAMA3_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336}
TINY = {"hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256}
VARIANTS = ("stock", "plugin")


# ----------------------------------------------------------------------------- kernel roles
def _body(k) -> set[str]:
    return {op.split(".")[-1] for op in k.body_ops}  # triton_helpers.max2 -> max2


def _is_norm(k) -> bool:
    return "rsqrt" in k.ops or bool({"rsqrt", "sqrt"} & _body(k))


def _is_quant(k) -> bool:
    body = _body(k)
    return "amax" in k.ops or ("abs" in body and bool(body & {"max2", "maximum", "max_propagate_nan", "max"}))


def _is_fused_norm_quant_op(k) -> bool:
    return k.kind == "custom_op" and k.name.startswith("fusewright.rms_norm_quant")


def kernel_counts(kernels: list) -> dict[str, Any]:
    """What a compiled graph launches, by role (see the module docstring)."""
    generated = [k for k in kernels if k.kind.startswith("triton") or k.kind == "cpp"]
    fused_op = [k for k in kernels if _is_fused_norm_quant_op(k)]
    norm = [k for k in generated if _is_norm(k)] + fused_op
    quant = [k for k in generated if _is_quant(k)] + fused_op
    both = [k for k in generated if _is_norm(k) and _is_quant(k)] + fused_op
    return {
        "launches": sum(k.kind != "collective" for k in kernels),
        "generated": len(generated),
        "triton": sum(k.kind.startswith("triton") for k in kernels),
        "extern": sum(k.kind == "extern" for k in kernels),
        "custom_op": sum(k.kind == "custom_op" for k in kernels),
        "collective": [k.name for k in kernels if k.kind == "collective"],
        "noop": [k.name for k in kernels if k.is_noop],
        "norm": len(norm),
        "quant": len(quant),
        "norm_quant_fused": len(both),
        "fusewright_ops": [k.name for k in kernels if k.kind == "custom_op" and k.name.startswith("fusewright.")],
    }


# ----------------------------------------------------------------------------- timing
def _barrier(device: torch.device) -> None:
    """Every rank waits here; on CUDA after its queued work, on the rank's own device."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize()
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


class _Timer:
    def __init__(self, device: torch.device, reps: int, decode_calls: int) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.reps, self.decode_calls = reps, decode_calls
        self.flush = torch.empty(256 * 2**20 if self.cuda else 1, dtype=torch.uint8, device=device)
        self.note: str | None = None

    def capture(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """A CUDA graph replay of `fn` (warmed up on a side stream), else `fn` itself."""
        if not self.cuda:
            fn()  # the first call after a compile pays one-time costs
            return fn
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the NCCL watchdog thread queries events while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                fn()
        except Exception as exc:  # time direct calls; the collectives still pair up across ranks
            self.note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); direct calls timed"
            print(f"rank note: {self.note}", file=sys.stderr, flush=True)
            torch.cuda.synchronize()
            return fn
        torch.cuda.synchronize()
        return graph.replay

    def _barrier(self) -> None:
        _barrier(self.device)

    def run(self, runners: dict[str, Callable[[], Any]], flush: bool, calls: int) -> dict[str, dict]:
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(self.reps):
            for name, run in runners.items():
                self._barrier()
                if self.cuda:
                    if flush:
                        self.flush.fill_(1)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(calls):
                        run()
                    end.record()
                    end.synchronize()
                    samples[name].append(start.elapsed_time(end) * 1e3 / calls)
                else:
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        run()
                    samples[name].append((time.perf_counter() - t0) * 1e6 / calls)
        return {name: {"median_us": statistics.median(s), "min_us": min(s), "max_us": max(s), "samples": len(s)}
                for name, s in samples.items()}


# ----------------------------------------------------------------------------- one rank
def _step_stock(layer, x):
    return layer(x)


def _step_plugin(layer, x):
    # Same body, separate code object: Dynamo keeps the two compiles apart.
    return layer(x)


def _step_control(layer, x):
    # A second stock compile (--control): how far two stock compiles of one layer disagree.
    return layer(x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _run_and_get_code(fn: Callable, *args) -> tuple[Any, list[str]]:
    """`torch._inductor.utils.run_and_get_code` without its `torch._dynamo.reset()`: that
    reset would drop the other variant's compiled entries and make it compile again."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", lambda code: codes.append(code)):
        out = fn(*args)
    return out, list(dict.fromkeys(codes))


def run_rank(args: argparse.Namespace, config=None) -> dict[str, Any]:
    """Everything one rank measures; the process group is initialised by the caller."""
    import torch.distributed as dist
    from torch._inductor import config as inductor_config

    from ..passes.api import inductor_options
    from ..passes.config import PassConfig
    from ..passes.report import last_report, reset_report
    from .output_code import parse_output_code
    from .tp_example import full_layer

    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    shapes = TINY if args.tiny else LLAMA3_8B
    full = full_layer(shapes["hidden"], shapes["heads"], shapes["intermediate"], seed=0,
                      kv_heads=shapes["kv_heads"], device=device)
    layer = full.shard(rank, world)
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled entry per token count
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
    torch._dynamo.reset()
    if args.deterministic:
        inductor_config.deterministic = True
    config = PassConfig.resolve(config)
    compiled = {"stock": torch.compile(_step_stock, dynamic=False),
                "plugin": torch.compile(_step_plugin, dynamic=False, options=inductor_options(config))}
    if args.control:
        compiled["control"] = torch.compile(_step_control, dynamic=False)
    timer = _Timer(device, args.reps, args.decode_calls)
    rows = []
    tokens = [("prefill", t) for t in args.prefill] + [("decode", t) for t in args.decode]
    for phase, T in tokens:
        gen = torch.Generator(device=device).manual_seed(1000 + T)  # the same input on every rank
        x = torch.randn(T, shapes["hidden"], dtype=torch.bfloat16, device=device, generator=gen)
        row: dict[str, Any] = {"phase": phase, "T": T, "rank": rank}
        outs, runners = {}, {}
        for variant in VARIANTS:
            reset_report()  # the report sums every compile since the last reset: count this T's only
            with inductor_config.patch({"fx_graph_cache": False}), torch.no_grad():
                out, codes = _run_and_get_code(compiled[variant], layer, x)
            if variant == "plugin":
                report = last_report()
                row["rewrites"] = report.rewrites()
                # what each rewrite was lowered to, and why (auto's choice, a rule, the config)
                row["lowered"] = {name: dict(stats.details) for name, stats in report.items() if stats.details}
            kernels = [k for i, code in enumerate(codes)
                       for k in parse_output_code(code, f"{variant} T={T} graph {i}", graph=i).kernels]
            row[f"{variant}_kernels"] = kernel_counts(kernels)
            row[f"{variant}_graphs"] = len(codes)
            if args.dump_dir:
                for i, code in enumerate(codes):
                    where = Path(args.dump_dir) / variant / f"rank{rank}" / f"T{T}" / (f"graph{i}" if len(codes) > 1 else "")
                    where.mkdir(parents=True, exist_ok=True)
                    (where / "output_code.py").write_text(code)
            outs[variant] = out
            static_x = x.clone()
            runners[variant] = (lambda f=compiled[variant], xs=static_x: f(layer, xs))
        with torch.no_grad():
            reference = full(x)
            # the same stock graph run again: nonzero means run-to-run nondeterminism outside the rewrite
            again = compiled["stock"](layer, x)
            if args.control:
                control = compiled["control"](layer, x)
        row["stock_rerun_bitwise"] = bool(torch.equal(_bits(outs["stock"]), _bits(again)))
        row["max_abs_stock_rerun"] = float((again.float() - outs["stock"].float()).abs().max())
        if args.control:
            row["control_bitwise"] = bool(torch.equal(_bits(outs["stock"]), _bits(control)))
            row["max_abs_stock_vs_control"] = float((control.float() - outs["stock"].float()).abs().max())
        row["bitwise_equal"] = bool(torch.equal(_bits(outs["stock"]), _bits(outs["plugin"])))
        row["max_abs_plugin_vs_stock"] = float((outs["plugin"].float() - outs["stock"].float()).abs().max())
        row["max_abs_vs_single_process"] = float((outs["plugin"].float() - reference.float()).abs().max())
        row["reference_absmax"] = float(reference.float().abs().max())
        if not args.no_timing:
            calls = 1 if phase == "prefill" else args.decode_calls
            timer.note = None
            with torch.no_grad():
                replays = {v: timer.capture(runners[v]) for v in VARIANTS}
                row["times"] = timer.run(replays, flush=phase == "prefill", calls=calls)
            if timer.note:
                row["timer_note"] = timer.note
            row["timer"] = ("cuda_graph" if timer.cuda else "cpu_wall") + (
                ", L2 flushed" if phase == "prefill" and timer.cuda else f", {calls} calls back to back")
            s, p = row["times"]["stock"]["median_us"], row["times"]["plugin"]["median_us"]
            row["speedup"] = s / p if p > 0 else None
        rows.append(row)
        print(_row_line(row), flush=True)
        if args.json:  # what this rank has so far, in case a later token count fails or runs out of time
            partial = _partial_path(args.json, rank)
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"rank": rank, "rows": rows}, indent=1))
    return {"rank": rank, "device": _device_name(device), "rows": rows}


def _partial_path(json_path: str, rank: int) -> Path:
    return Path(json_path).with_suffix(f".rank{rank}.partial.json")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _row_line(r: dict) -> str:
    sk, pk = r["stock_kernels"], r["plugin_kernels"]
    t = ""
    if "times" in r:
        t = (f" {r['times']['stock']['median_us']:9.1f} {r['times']['plugin']['median_us']:9.1f} us"
             f" x{r['speedup']:.3f}")
    return (f"rank {r['rank']} {r['phase']:7s} T={r['T']:<5d} gen {sk['generated']:2d}->{pk['generated']:2d}"
            f" noop {len(sk['noop'])}->{len(pk['noop'])} norm+quant fused {sk['norm_quant_fused']}->"
            f"{pk['norm_quant_fused']} bitwise={r['bitwise_equal']} (max abs {r['max_abs_plugin_vs_stock']:.3g} of "
            f"{r['reference_absmax']:.3g}; stock rerun {r['max_abs_stock_rerun']:.3g}"
            + (f", stock vs stock recompiled {r['max_abs_stock_vs_control']:.3g}" if "control_bitwise" in r else "")
            + f"; vs 1 process {r['max_abs_vs_single_process']:.3g}){t}")


def format_result(result: dict) -> str:
    lines = [f"TP={result['world_size']} {result['shapes']} on {result['device']}, torch {result['torch']}, "
             f"triton {result['triton']}, {result['date']}",
             "rank phase   T      generated  no-op  norm quant fused   bitwise   stock us  plugin us  speedup"]
    for rank in result["ranks"]:
        for r in rank["rows"]:
            sk, pk = r["stock_kernels"], r["plugin_kernels"]
            times = r.get("times")
            t = (f"{times['stock']['median_us']:9.1f} {times['plugin']['median_us']:10.1f}  {r['speedup']:7.3f}"
                 if times else "   (not timed)")
            lines.append(
                f"{r['rank']:4d} {r['phase']:7s} {r['T']:<6d} {sk['generated']:3d} -> {pk['generated']:<3d}"
                f" {len(sk['noop'])} -> {len(pk['noop'])}  {sk['norm']}->{pk['norm']}  {sk['quant']}->{pk['quant']}"
                f"  {sk['norm_quant_fused']}->{pk['norm_quant_fused']}  {str(r['bitwise_equal']):7s}  {t}"
                + ("" if r["bitwise_equal"] else f"  (max abs diff {r['max_abs_plugin_vs_stock']:.3g})"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (NCCL, default when present) or cpu (gloo: a smoke run, not a measurement)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 128) instead of Llama-3-8B's")
    parser.add_argument("--prefill", type=_ints, default=None, help="prefill token counts (default 4096; tiny: 128)")
    parser.add_argument("--decode", type=_ints, default=None, help="decode token counts (default 1,16,64)")
    parser.add_argument("--reps", type=int, default=None, help="timed samples per variant (default 30; cpu 3)")
    parser.add_argument("--decode-calls", type=int, default=20, help="replays per decode sample")
    parser.add_argument("--no-timing", action="store_true", help="kernels and outputs only")
    parser.add_argument("--control", action="store_true",
                        help="also compile the layer a second time with stock Inductor and compare it with the first "
                             "(outputs of two stock compiles: the noise floor for plugin vs stock)")
    parser.add_argument("--deterministic", action="store_true",
                        help="Inductor's deterministic mode: one reduction config, no on-device autotuning (stock and "
                             "plugin kernels that autotune apart may sum in different orders)")
    parser.add_argument("--dump-dir", metavar="DIR", help="write each rank's output code under DIR")
    parser.add_argument("--json", metavar="PATH", help="rank 0 writes every rank's result here")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.prefill is None:
        args.prefill = [128] if args.tiny else [4096]
    if args.decode is None:
        args.decode = [1, 16, 64]
    if args.reps is None:
        args.reps = 30 if args.device == "cuda" else 3
    if args.device == "cpu":
        args.decode_calls = min(args.decode_calls, 2)
    return args


def bench(args: argparse.Namespace, config=None) -> dict[str, Any] | None:
    """Run on every rank of an initialised process group; rank 0 gets the gathered result."""
    import torch.distributed as dist

    args = _defaults(args)
    from ..passes.config import PassConfig

    config = PassConfig.resolve(config)
    mine = run_rank(args, config)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if args.json:
        _partial_path(args.json, dist.get_rank()).unlink(missing_ok=True)  # the gathered result replaces it
    if dist.get_rank() != 0:
        return None
    ranks = sorted(gathered, key=lambda r: r["rank"])
    rows = [r for rank in ranks for r in rank["rows"]]
    return {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "shapes": TINY if args.tiny else LLAMA3_8B,
        "dtype": "bf16, FP8 (e4m3) rowwise activations",
        "device": ranks[0]["device"],
        "torch": torch.__version__,
        "triton": _triton_version(),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "reps": args.reps,
        "decode_calls": args.decode_calls,
        "inductor_deterministic": bool(args.deterministic),
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "ranks": ranks,
        "summary": {
            "bitwise_equal_everywhere": all(r["bitwise_equal"] for r in rows),
            "noop_gone_everywhere": all(not r["plugin_kernels"]["noop"] for r in rows),
            "noop_in_stock_everywhere": all(bool(r["stock_kernels"]["noop"]) for r in rows),
            "norm_quant_fused_everywhere": all(
                r["plugin_kernels"]["norm_quant_fused"] >= 2 and r["plugin_kernels"]["norm"] == r["plugin_kernels"]
                ["norm_quant_fused"] for r in rows),
            "never_slower": (all(r["speedup"] >= 1.0 for r in rows) if all("speedup" in r for r in rows) else None),
            "min_speedup": min((r["speedup"] for r in rows if r.get("speedup")), default=None),
        },
    }


def main(args: argparse.Namespace, config=None) -> int:
    """Under torchrun (RANK/WORLD_SIZE set): initialise, run, rank 0 prints and writes --json."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("bench tp: error: run under torchrun, e.g. `torchrun --nproc-per-node 2 -m fusewright.tools.bench_tp`",
              file=sys.stderr)
        return 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        result = bench(args, config)
        if result is not None:
            print(format_result(result), flush=True)
            print(json.dumps(result["summary"]), flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
        # the other ranks wait for rank 0's report before tearing the group down: a gloo
        # rank that exited while rank 0 was still writing once aborted at exit ("terminate
        # called without an active exception", CPU CI, session 7)
        _barrier(torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device))
    finally:
        dist.destroy_process_group()
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusewright.tools.bench_tp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    from ..passes.config import split_cli_config

    config, rest = split_cli_config(list(sys.argv[1:] if argv is None else argv))  # -cc.KEY=VALUE as elsewhere
    return main(parser.parse_args(rest), config)


if __name__ == "__main__":
    sys.exit(_cli())

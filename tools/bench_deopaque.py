"""`fusewright bench deopaque`: an opaque RMSNorm custom op + per-token FP8, left opaque vs de-opaqued.

The graph: `fwbench::rms_norm(Tensor(a!) result, Tensor input, Tensor weight, float
epsilon) -> ()` (vLLM's `_C.rms_norm` schema) implemented eagerly in PyTorch (the
Llama spelling: several kernels), followed by vLLM-native per-token FP8 quantization.

Variants, compiled in the same process, each on the same inputs:

* `opaque`    - fusewright with its default config: the custom op stays opaque, Inductor
  compiles the quant tail around it;
* `deopaque`  - fusewright with `deopaque={"fwbench::rms_norm": "rms_norm"}`: the op is
  replaced by the aten RMSNorm and the norm->quant pass fuses it with the tail;
* `inductor`  - stock Inductor on the same math spelled in Python (the baseline of
  design.md's table, for reference);
* `copy`      - a device-to-device copy of x, for the bandwidth limit.

On CUDA each variant is captured in a CUDA graph and replayed, L2 is flushed before every
repetition (256 MB written), and the figure is the median of CUDA-event times. Minimum
bytes: 3TH (bf16 x read, fp8 q written) + 4T (f32 scales). On CPU (a dry run) wall-clock
medians. Output: a table on stdout and, with --json, every figure.

    python -m fusewright.tools.bench_deopaque [--device cuda] [--tokens 16384,256] [--hidden 7168]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-6
OP = "fwbench::rms_norm"


def _norm(x, weight, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@torch.library.custom_op(OP, mutates_args=("result",))
def opaque_rms_norm(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    result.copy_(_norm(input, weight, epsilon))


def quant(y):
    amax = y.abs().amax(-1, keepdim=True).to(torch.float32)
    scale = (amax / FP8_MAX).clamp(min=1.0 / (FP8_MAX * 512.0))
    q = (y.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def with_opaque_op(x, weight):
    out = torch.empty_like(x)
    torch.ops.fwbench.rms_norm(out, x, weight, EPS)
    return quant(out)


def native(x, weight):
    return quant(_norm(x, weight, EPS))


def _timer(device: str, reps: int):
    if device != "cuda":
        def run(fn):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6
        return run

    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def run(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        replay = fn
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            replay = graph.replay
        except Exception as exc:  # noqa: BLE001 - time it without a graph, and say so
            print(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); timing plain launches", flush=True)
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)
    return run


def _compile(fn, config):
    import fusewright

    torch._dynamo.reset()
    options = fusewright.inductor_options(config) if config is not None else {}
    return torch.compile(fn, options=options, dynamic=False)


def bench(device: str, tokens: list[int], hidden: int, reps: int, budget_s: float, on_row=None) -> dict:
    import fusewright

    started = time.time()
    timer = _timer(device, reps)
    rows = []
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "rows": rows,
    }
    for t in tokens:
        if time.time() - started > budget_s:
            print(f"skipping T={t}: time budget of {budget_s:.0f}s spent", flush=True)
            continue
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(t, hidden, device=device, generator=g).to(torch.bfloat16)
        w = (1 + 0.1 * torch.randn(hidden, device=device, generator=g)).to(torch.bfloat16)
        row = {"tokens": t, "hidden": hidden}
        outs = {}
        details = {}
        for name, fn, config in (
            ("opaque", with_opaque_op, {}),
            ("deopaque", with_opaque_op, {"deopaque": {OP: "rms_norm"}}),
            ("inductor", native, None),
        ):
            compiled = _compile(fn, config)
            fusewright.reset_report()
            outs[name] = compiled(x, w)
            if config is not None:
                details[name] = {p: dict(s.details) for p, s in fusewright.last_report().items() if s.details}
            row[f"{name}_us"] = timer(lambda: compiled(x, w))
            print(f"T={t} H={hidden} {name}: {row[f'{name}_us']:.1f} us", flush=True)
        dst = torch.empty_like(x)
        row["copy_us"] = timer(lambda: dst.copy_(x))
        copy_bw = 2 * x.numel() * x.element_size() / (row["copy_us"] * 1e-6)
        min_bytes = 3 * t * hidden + 4 * t
        for name in ("opaque", "deopaque", "inductor"):
            row[f"{name}_pct_of_copy"] = 100 * (min_bytes / (row[f"{name}_us"] * 1e-6)) / copy_bw
        row["speedup_deopaque_vs_opaque"] = row["opaque_us"] / row["deopaque_us"]
        row["deopaque_vs_inductor"] = row["inductor_us"] / row["deopaque_us"]
        row["copy_bw_tbs"] = copy_bw / 1e12
        q_ref, s_ref = outs["opaque"]
        q_new, s_new = outs["deopaque"]
        row["scale_max_rel_diff"] = ((s_new - s_ref).abs() / s_ref).max().item()
        row["dequant_max_abs_diff"] = (q_new.float() * s_new - q_ref.float() * s_ref).abs().max().item()
        row["report_details"] = details
        rows.append(row)
        if on_row is not None:
            on_row(result)  # a run cut short still leaves the rows it finished
    return result


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def table(result: dict) -> str:
    lines = [f"device {result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}",
             "",
             "| T x H | opaque us | de-opaqued + fused us | speedup | stock Inductor (Python spelling) us "
             "| % of copy limit (opaque / de-opaqued) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokens']} x {r['hidden']} | {r['opaque_us']:.1f} | {r['deopaque_us']:.1f} | "
            f"{r['speedup_deopaque_vs_opaque']:.2f}x | {r['inductor_us']:.1f} | "
            f"{r['opaque_pct_of_copy']:.0f} / {r['deopaque_pct_of_copy']:.0f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--tokens", default="16384,256", help="comma-separated token counts")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds after which no new shape starts")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")


def main(args: argparse.Namespace, config=None) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    def dump(result):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    result = bench(device, [int(t) for t in args.tokens.split(",")], args.hidden, args.reps, args.budget, dump)
    print(table(result))
    dump(result)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

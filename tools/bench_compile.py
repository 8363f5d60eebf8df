"""`fusewright bench compile`: what fusewright adds to compile time.

For each model of the model zoo, the compile time with the plugin off and on, and the
time spent inside fusewright's passes (from the report). Each configuration is
compiled once to warm Inductor's kernel caches (so that the comparison is not of
C++/Triton compiler time for kernels one side happens to see first), then timed over
`--repeat` more compiles with the FX graph cache off and Dynamo reset.

`--scaling` also compiles Llama decoder stacks of 1 to 64 layers and reports the pass
time per graph node, to show the passes grow linearly with the graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

HELP = "compile-time overhead of the plugin (model zoo) and its scaling with graph size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llama,qwen3,gemma3,mistral,deepseek_v3,wan,flux,hunyuan_video",
                        help="comma-separated model zoo names")
    parser.add_argument("--repeat", type=int, default=3, help="timed compiles per configuration")
    parser.add_argument("--scaling", default="", metavar="LAYERS",
                        help="comma-separated layer counts for the scaling run, e.g. 1,4,16,64")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def _compile_seconds(fn, inputs, options) -> float:
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch({"fx_graph_cache": False, "fx_graph_remote_cache": False}):
        compiled = torch.compile(fn, options=options)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(*inputs)
        return time.perf_counter() - start


def _pass_seconds() -> tuple[float, int]:
    import fusewright

    report = fusewright.last_report()
    seconds = report.overhead_seconds + sum(s.seconds for s in report.values())
    return seconds, sum(s.rewritten for s in report.values())


def measure_model(name: str, config, repeat: int) -> dict:
    import fusewright
    from fusewright.tools.model_zoo import MODELS

    fn, inputs = MODELS[name]()
    off, on, in_passes = [], [], []
    for i in range(repeat + 1):  # the first round warms the kernel caches and is dropped
        t_off = _compile_seconds(fn, inputs, {})
        t_on = _compile_seconds(fn, inputs, fusewright.inductor_options(config))
        passes, rewrites = _pass_seconds()
        if i:
            off.append(t_off)
            on.append(t_on)
            in_passes.append(passes)
    off_s, on_s = statistics.median(off), statistics.median(on)
    return {
        "model": name,
        "compile_off_s": off_s,
        "compile_on_s": on_s,
        "overhead_pct": 100.0 * (on_s - off_s) / off_s,
        "pass_s": statistics.median(in_passes),
        "pass_pct": 100.0 * statistics.median(in_passes) / off_s,
        "rewrites": rewrites,
    }


def measure_scaling(layers: list[int], config) -> list[dict]:
    from fusewright.testing import compile_and_capture
    from fusewright.tools.model_zoo import llama

    rows = []
    for n in layers:
        fn, inputs = llama(layers=n)
        run = compile_and_capture(fn, inputs, config)
        nodes = sum(len(g.nodes) for g in run.graphs_before)
        seconds, rewrites = _pass_seconds()
        rows.append({"layers": n, "nodes": nodes, "pass_s": seconds, "rewrites": rewrites,
                     "us_per_node": 1e6 * seconds / nodes})
    return rows


def main(args: argparse.Namespace, config) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = {"torch": torch.__version__, "models": [], "scaling": []}
    table = Table(title="compile time, plugin off vs on (median of warm compiles)")
    for column in ("model", "off s", "on s", "overhead", "in passes", "rewrites"):
        table.add_column(column)
    for name in [m for m in args.models.split(",") if m]:
        with console.status(f"compiling {name}..."):
            row = measure_model(name, config, args.repeat)
        results["models"].append(row)
        table.add_row(name, f"{row['compile_off_s']:.2f}", f"{row['compile_on_s']:.2f}",
                      f"{row['overhead_pct']:+.1f}%", f"{row['pass_s'] * 1e3:.0f} ms ({row['pass_pct']:.1f}%)",
                      str(row["rewrites"]))
    console.print(table)
    if args.scaling:
        scaling = Table(title="pass time vs graph size (Llama decoder stacks)")
        for column in ("layers", "nodes", "pass time", "per node", "rewrites"):
            scaling.add_column(column)
        with console.status("compiling layer stacks..."):
            rows = measure_scaling([int(n) for n in args.scaling.split(",")], config)
        for row in rows:
            scaling.add_row(str(row["layers"]), str(row["nodes"]), f"{row['pass_s'] * 1e3:.0f} ms",
                            f"{row['us_per_node']:.1f} us", str(row["rewrites"]))
        results["scaling"] = rows
        console.print(scaling)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0

"""`fusewright graph-diff [TARGET]`: compile with fusewright off and on; compare kernels and outputs."""

from __future__ import annotations

import argparse
import json

HELP = "compile with fusewright off and on; compare kernels and outputs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="path/to/file.py:factory or package.module:factory")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")


def main(args: argparse.Namespace, config) -> int:
    from rich.console import Console
    from rich.table import Table

    from .example import example
    from .graph_diff import live_diff

    console = Console()
    if args.target:
        console.print("[red]error:[/] graph-diff targets are not supported yet; run it with no target "
                      "to compile the built-in example")
        return 2
    model, inputs = example(args.device)
    with console.status("compiling the built-in example with fusewright off, then on..."):
        diff = live_diff(model, inputs, config)
    table = Table(title="fusewright graph-diff: built-in example")
    table.add_column("#")
    table.add_column("before (stock Inductor)")
    table.add_column("after (fusewright)")
    for i in range(max(len(diff.before.kernels), len(diff.after.kernels))):
        cell = lambda ks: f"{ks[i].name} [{ks[i].kind}]" if i < len(ks) else ""
        table.add_row(str(i), cell(diff.before.kernels), cell(diff.after.kernels))
    console.print(table)
    console.print(f"kernels: {len(diff.before.kernels)} -> {len(diff.after.kernels)}")
    console.print("rewrites: " + (", ".join(f"{k}={v}" for k, v in diff.rewrites.items()) or "none"))
    console.print(f"outputs: max abs diff {diff.max_abs_diff:g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(diff.to_dict(), f, indent=2)
    return 0

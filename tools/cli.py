"""The `fusewright` command line."""

from __future__ import annotations

import argparse
import json
import sys

from ..passes.config import ConfigError, split_cli_config


def _graph_diff(args: argparse.Namespace, config) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusewright",
        description="torch.compile graph-rewrite passes. Config flags anywhere: "
        "--compilation-config JSON, -cc.KEY=VALUE (nested keys with dots).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gd = sub.add_parser("graph-diff", help="compile with fusewright off and on; compare kernels and outputs")
    gd.add_argument("target", nargs="?", help="path/to/file.py:factory or package.module:factory")
    gd.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    gd.add_argument("--json", metavar="PATH", help="write the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, rest = split_cli_config(argv)
    except ConfigError as exc:
        print(f"fusewright: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    if args.command == "graph-diff":
        return _graph_diff(args, config)
    return 2

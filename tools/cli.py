"""The `fusewright` command line: a small dispatcher.

Each subcommand lives in its own module, listed in :data:`SUBCOMMANDS`. A subcommand
module provides:

* `HELP` - one line for `fusewright --help`;
* `add_arguments(parser)` - adds its options to an `argparse` parser;
* `main(args, config) -> int` - runs it; `config` is the `PassConfig` built from
  `--compilation-config` / `-cc.KEY=VALUE`, which may appear anywhere on the line.

Registering a subcommand is one line in `SUBCOMMANDS`. Benchmarks are not
subcommands of their own: they register in `fusewright.tools.bench.BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..passes.config import ConfigError, split_cli_config

# name -> module. Modules are imported when the parser is built, so keep their top level
# light (no torch.compile work, no heavy imports that can fail).
SUBCOMMANDS: dict[str, str] = {
    "graph-diff": "fusewright.tools.cli_graph_diff",
    "bench": "fusewright.tools.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusewright",
        description="torch.compile graph-rewrite passes. Config flags anywhere: "
        "--compilation-config JSON, -cc.KEY=VALUE (nested keys with dots).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        cmd = sub.add_parser(name, help=getattr(module, "HELP", None), description=doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, rest = split_cli_config(argv)
    except ConfigError as exc:
        print(f"fusewright: error: {exc}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(rest)
    except SystemExit as exc:  # argparse: --help exits 0, a usage error exits 2
        return int(exc.code or 0)
    return int(args._module.main(args, config) or 0)


if __name__ == "__main__":  # python -m fusewright.tools.cli, where the console script is not installed
    sys.exit(main())

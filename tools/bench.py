"""`fusewright bench NAME [options]`: kernel benchmarks, stock Inductor vs fusewright.

Each benchmark is a module registered in :data:`BENCHMARKS` (name -> module) that
provides `add_arguments(parser)` and `main(args, config) -> int`; `config` is the
`PassConfig` from `--compilation-config` / `-cc.KEY=VALUE`. A module is imported only
when its benchmark is run, so one broken or missing benchmark does not break the CLI.
(A module that only has `main(argv)` is called with the remaining arguments.)

    fusewright bench --list
    fusewright bench rope --help
"""

from __future__ import annotations

import argparse
import importlib
import sys

HELP = "run a kernel benchmark (fusewright bench --list)"

BENCHMARKS: dict[str, str] = {
    "norm-quant": "fusewright.tools.bench_norm_quant",
    "act-quant": "fusewright.tools.bench_act_quant",
    "rope": "fusewright.tools.bench_rope",
    "noop-casts": "fusewright.tools.bench_noop_casts",
    "compile": "fusewright.tools.bench_compile",
    "deopaque": "fusewright.tools.bench_deopaque",
    "models": "fusewright.tools.bench_models",
    "tp": "fusewright.tools.bench_tp",  # run under torchrun: one process per GPU
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", nargs="?", metavar="NAME",
                        help="one of: " + ", ".join(BENCHMARKS))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                        help="options of the benchmark (fusewright bench NAME --help)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")


def _error(message: str) -> int:
    print(f"fusewright bench: error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace, config) -> int:
    if args.list or not args.benchmark:
        for name, module in BENCHMARKS.items():
            print(f"{name:12s} {module}")
        return 0 if args.list else _error("name a benchmark: " + ", ".join(BENCHMARKS))
    name = args.benchmark
    if name not in BENCHMARKS:
        return _error(f"unknown benchmark '{name}'; available: {', '.join(BENCHMARKS)}")
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ImportError as exc:
        return _error(f"benchmark '{name}' is not available ({BENCHMARKS[name]}: {exc})")
    if not hasattr(module, "add_arguments"):
        return int(module.main(list(args.bench_args)) or 0)
    parser = argparse.ArgumentParser(prog=f"fusewright bench {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    try:
        bench_args = parser.parse_args(args.bench_args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(module.main(bench_args, config) or 0)

"""`fusewright graph-diff`: prove which kernels a rewrite removed.

  fusewright graph-diff [TARGET]        live: compile TARGET with fusewright off, then on
  fusewright graph-diff BEFORE AFTER    offline: diff two sets of Inductor output code
  fusewright graph-diff CODE            offline: list one set's kernels, flag no-ops

TARGET is path/to/file.py:factory or package.module:factory; the factory returns
(model_or_fn, example_inputs). Without TARGET the built-in example is compiled.
BEFORE/AFTER/CODE are output-code files (TORCH_LOGS=output_code logs too) or
TORCH_COMPILE_DEBUG directories. Output code from several ranks (rank0/ rank1/
directories, `[rankN]:` log prefixes) gives one report per rank; --rank N keeps one.
Collectives show as their own kind; a collective that disappears, appears or changes
between BEFORE and AFTER fails the run (exit 1) unless --allow-collective-changes.
Config: --compilation-config JSON, -cc.KEY=VALUE.

Exit codes: 0 done, 1 an --expect-* check failed or a collective changed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "compile with fusewright off and on (or read output code); diff kernels, graphs and outputs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="TARGET | BEFORE AFTER | CODE",
                        help="a target to compile, or output-code files/dirs to read")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None,
                        help="compile with dynamic shapes (default: torch.compile's choice)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('{rank}' in PATH: the rank of a "
                        "live run under torchrun, or of --rank)")
    parser.add_argument("--svg", metavar="PATH", help="write a picture of the diff (SVG): FX graph (live mode), kernels as dataflow")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--rtol", type=float, default=None, help="output comparison rtol (default: per dtype)")
    parser.add_argument("--atol", type=float, default=None, help="output comparison atol (default: per dtype)")
    parser.add_argument("--expect-no-noop", action="store_true",
                        help="exit 1 if no-op kernels remain (after side; the only side offline)")
    parser.add_argument("--expect-fewer-kernels", action="store_true",
                        help="exit 1 unless the after side launches fewer kernels")
    parser.add_argument("--expect-rewrites", action="append", default=[], metavar="PASS=N",
                        help="exit 1 unless PASS rewrote exactly N constructs (repeatable; live mode)")
    parser.add_argument("--expect-close", action="store_true", help="exit 1 if the outputs differ")
    parser.add_argument("--rank", metavar="N", default=None,
                        help="per-rank output code: report rank N only (default: one report per rank)")
    parser.add_argument("--allow-collective-changes", action="store_true",
                        help="do not fail (exit 1) when a collective disappears, appears or changes")
    parser.add_argument("--show", action="append", default=[], metavar="KERNEL",
                        help="print the source of the kernels with this name (repeatable; '*noop' = every no-op)")
    parser.add_argument("--verbose", "-v", action="store_true", help="list unchanged kernels of large diffs too")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _error(message: str) -> int:
    print(f"fusewright graph-diff: error: {message}", file=sys.stderr)
    return 2


def _parse_expect_rewrites(items: list[str]) -> dict[str, int]:
    if not items:
        return {}
    try:
        from ..passes.registry import builtin_passes

        known = [p.name for p in builtin_passes()]
    except Exception:  # a pass module that does not import: fall back to the config flags
        from ..passes.config import PassConfig

        known = [f for f in PassConfig.keys() if isinstance(getattr(PassConfig(), f), bool)
                 and f not in ("verify", "strict")]
    out = {}
    for item in items:
        name, eq, count = item.partition("=")
        if not eq or not count.strip().isdigit():
            raise ValueError(f"--expect-rewrites wants PASS=N (e.g. fuse_norm_quant=1), got '{item}'")
        if name not in known:
            raise ValueError(f"--expect-rewrites: unknown pass '{name}'; passes: {', '.join(known)}")
        out[name] = int(count)
    return out


def _mode(inputs: list[str]) -> str:
    if len(inputs) > 2:
        raise ValueError(f"expected TARGET, BEFORE AFTER, or CODE; got {len(inputs)} arguments")
    if len(inputs) == 2:
        return "offline"
    if len(inputs) == 1:
        arg = inputs[0]
        if os.path.exists(arg) and not arg.endswith(".py:") and (os.path.isdir(arg) or ":" not in arg):
            return "single"
    return "live"


def main(args: argparse.Namespace, config) -> int:
    from rich.console import Console

    from .graph_diff import GraphDiffError, check_expectations

    # piped output (CI logs, files) gets a readable width instead of rich's 80 columns
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(width=wide)
    try:
        expect_rewrites = _parse_expect_rewrites(args.expect_rewrites)
        mode = _mode(args.inputs)
        if expect_rewrites and mode != "live":
            raise ValueError("--expect-rewrites needs live mode (a TARGET): output code does not say "
                             "which pass ran")
        report = _run(mode, args, config, console)
    except (GraphDiffError, ValueError) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted")
    except Exception as exc:  # a bug of ours: still one line unless --debug
        if args.debug:
            raise
        return _error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)")

    from .render import print_report, render_html, render_svg

    print_report(report, console, verbose=args.verbose)
    if args.show:
        _show(report, args.show, console)
    try:
        # under torchrun every rank writes: `--json diff_rank{rank}.json` keeps them apart
        for name in ("json", "svg", "html"):
            path = getattr(args, name)
            if path and "{rank}" in path:
                setattr(args, name, path.replace("{rank}", report.rank if report.rank is not None else "all"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report.to_dict(), f, indent=2, default=str)
        if args.svg:
            with open(args.svg, "w") as f:
                f.write(render_svg(report))
        if args.html:
            with open(args.html, "w") as f:
                f.write(render_html(report))
    except OSError as exc:
        return _error(f"cannot write {exc.filename}: {exc.strerror}")
    unmet = check_expectations(report, no_noop=args.expect_no_noop, fewer_kernels=args.expect_fewer_kernels,
                               rewrites=expect_rewrites, close=args.expect_close,
                               collectives_unchanged=not args.allow_collective_changes)
    for line in unmet:
        print(f"fusewright graph-diff: expectation unmet: {line}", file=sys.stderr)
    return 1 if unmet else 0


def _run(mode: str, args: argparse.Namespace, config, console):
    from .graph_diff import DEFAULT_TARGET, live_diff, load_target, offline_diff, single_report

    if mode == "offline":
        return offline_diff(*args.inputs, rank=args.rank)
    if mode == "single":
        return single_report(args.inputs[0], rank=args.rank)
    if args.rank is not None:
        raise ValueError("--rank reads per-rank output code (BEFORE AFTER or CODE); a live run under torchrun "
                         "reports its own rank")
    import torch

    target = args.inputs[0] if args.inputs else DEFAULT_TARGET
    device = args.device
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    if device is None and target == DEFAULT_TARGET:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fn, fn_args, fn_kwargs = load_target(target, device)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("loading", total=None)
        report = live_diff(fn, fn_args, config, kwargs=fn_kwargs, dynamic=args.dynamic, rtol=args.rtol,
                           atol=args.atol, target=target, device=device,
                           progress=lambda msg: progress.update(task, description=msg))
    return report


def _show(report, names: list[str], console) -> None:
    """Print the generated source of the named kernels, side by side label first."""
    from rich.syntax import Syntax

    sides = [report.before] + ([report.after] if report.after is not None else [])
    for name in names:
        found = [(side.label, k) for side in sides for k in side.kernels
                 if k.name == name or (name == "*noop" and k.is_noop)]
        if not found:
            console.print(f"[yellow]--show {name}: no such kernel[/]")
        for label, k in found:
            console.rule(f"{label}: {k.name} (graph {k.graph}, {k.kind})")
            if k.source:
                lexer = "cpp" if k.kind == "cpp" else "python"
                source = k.source
                if "@triton.jit" in source:  # the imports and autotune metadata above it are noise here
                    source = source[source.index("@triton.jit"):]
                console.print(Syntax(source, lexer, line_numbers=False, word_wrap=True))
            else:
                console.print(f"({k.kind}: no generated source; reads {k.reads}, writes {k.writes})")

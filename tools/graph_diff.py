"""graph-diff: which kernels a rewrite removed, which no-op kernels remain, do outputs agree.

Two ways in, one report out:

* live (`live_diff`): compile a model twice with Inductor (fusewright off, then on),
  Dynamo reset and the FX graph cache off before each (a cache hit would skip the
  passes; kernel binary caches stay on: keyed by kernel source, they cannot change
  what is generated, and turning them off costs seconds of C++ compiles per graph); keep every compiled graph's post-grad FX
  graph (around the passes) and output code; run both on the example inputs.
* offline (`offline_diff`): two sets of output code (files, `TORCH_LOGS` logs or debug
  directories) from anywhere; no plugin involved. One set alone (`single_report`) lists
  kernels and flags no-ops.

:class:`GraphDiffReport` holds both sides' kernels, the kernel diff (matched by what
kernels compute: kernel signature, then kind and fused ops; never by numbered names),
the FX graph diff, the pass counts and the numerics, and writes the JSON report whose
top-level keys the design brief fixes: `before`/`after` (`kernel_count`,
`noop_kernel_count`, `kernels[]` with `name`, `kind`, `is_noop`), `rewrites`,
`numerics` (`max_abs_diff`, `ok`). Further keys only add to that.

Tensor-parallel code: output code from several ranks (see `output_code_files.load_output_codes`)
is diffed rank by rank (kernels are only ever paired within a rank); `before`/`after`
sum over the ranks and `ranks` holds each rank's own report (`rank=` selects one).
Collectives are paired on their own, in launch order, and never as removed/added
kernels when a rewrite leaves them alone; the `collectives` section lists them and
says, loudly, when one disappeared, appeared or communicates something else.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..passes.config import PassConfig
from .fx_diff import GraphDiff, collective_changes, diff_graph_lists
from .kernel_match import KernelMatch, match_kernels
from .output_code import Kernel, OutputCode, OutputCodeError, parse_output_code, summarize
from .output_code_files import group_by_rank, load_output_codes, rank_sort_key
from .output_compare import Numerics, compare_outputs

SCHEMA_VERSION = 1
DEFAULT_TARGET = "fusewright.tools.example:example"


class GraphDiffError(Exception):
    """Bad input for graph-diff: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- sides
@dataclasses.dataclass
class Side:
    """One compile (live) or one set of output-code files (offline)."""

    label: str
    codes: list[OutputCode]
    graphs_before: list = dataclasses.field(default_factory=list)  # post-grad FX, before the passes
    graphs_after: list = dataclasses.field(default_factory=list)  # post-grad FX, after the passes
    outputs: Any = None

    @property
    def kernels(self) -> list[Kernel]:
        return [k for code in self.codes for k in code.kernels]

    @property
    def estimated_bytes(self) -> int | None:
        known = [k.bytes for k in self.kernels if k.bytes is not None]
        return sum(known) if known else None

    @property
    def ranks(self) -> list[str]:
        return sorted({c.rank for c in self.codes if c.rank is not None}, key=rank_sort_key)

    def summary(self) -> dict[str, Any]:
        out = summarize(self.kernels)
        out["graph_count"] = len(self.codes)
        out["estimated_bytes"] = self.estimated_bytes
        out["sources"] = [c.label for c in self.codes]
        if self.ranks:
            out["ranks"] = self.ranks
        return out


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class GraphDiffReport:
    mode: str  # live, offline, single
    before: Side
    after: Side | None
    kernel_diff: list[KernelMatch] = dataclasses.field(default_factory=list)
    fx: list[GraphDiff] = dataclasses.field(default_factory=list)
    rewrites: dict[str, int] = dataclasses.field(default_factory=dict)
    passes: dict[str, Any] = dataclasses.field(default_factory=dict)  # fusewright's Report.to_dict()
    numerics: Numerics = dataclasses.field(default_factory=lambda: Numerics(None, None))
    target: str | None = None
    device: str | None = None
    config: dict[str, Any] | None = None
    # Room for later sections (per-op lowering, per-rank code): extra[name] = JSON-able data.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    rank: str | None = None  # the rank this report is about (one rank's code, or a live run in a process group)
    rank_reports: dict[str | None, "GraphDiffReport"] = dataclasses.field(default_factory=dict)  # per rank
    fx_collective_problems: list[str] = dataclasses.field(default_factory=list)  # live: fx_diff.collective_changes

    def counts(self, status: str) -> int:
        return sum(m.status == status for m in self.kernel_diff)

    def collectives(self) -> dict[str, Any]:
        """Every collective on both sides, paired, and the problems: one disappeared, one
        appeared, one communicates something else (op, arguments, tensor shapes), or (live)
        the FX graph around the collectives changed in a way no rewrite may change it."""
        rows, problems = [], []
        if self.after is None:
            rows = [_collective_row(None, k, "kernel") for k in self.before.kernels if k.kind == "collective"]
        for m in self.kernel_diff:
            k = m.after or m.before
            if k.kind != "collective":
                continue
            rows.append(_collective_row(m.before, m.after, m.status))
            where = (f"rank {k.rank}, " if k.rank is not None else "") + f"graph {k.graph}"
            if m.status == "removed":
                problems.append(f"{where}: collective {_describe_collective(m.before)} disappeared")
            elif m.status == "added":
                problems.append(f"{where}: collective {_describe_collective(m.after)} appeared")
            elif m.status == "changed":
                problems.append(f"{where}: collective changed: {_describe_collective(m.before)} -> "
                                f"{_describe_collective(m.after)}")
        problems += self.fx_collective_problems
        count = lambda side: sum(k.kind == "collective" for k in side.kernels) if side is not None else 0
        return {"before_count": count(self.before), "after_count": count(self.after),
                "unchanged": sum(r["status"] == "unchanged" for r in rows), "ok": not problems,
                "problems": problems, "collectives": rows}

    def to_dict(self) -> dict[str, Any]:
        empty = {"kernel_count": 0, "noop_kernel_count": 0, "kernels": []}
        return {
            "schema_version": SCHEMA_VERSION,
            "mode": self.mode,
            "target": self.target,
            "device": self.device,
            "before": self.before.summary(),
            "after": self.after.summary() if self.after else empty,
            "rewrites": dict(self.rewrites),
            "numerics": self.numerics.to_dict(),
            "kernel_diff": {
                "removed": self.counts("removed"), "added": self.counts("added"),
                "changed": self.counts("changed"), "unchanged": self.counts("unchanged"),
                "matches": [m.to_dict() for m in self.kernel_diff],
            },
            "fx_diff": [g.to_dict() for g in self.fx],
            "passes": self.passes,
            "config": self.config,
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            "collectives": self.collectives(),
            **({"rank": self.rank} if self.rank is not None else {}),
            **({"ranks": {(r if r is not None else "unknown"): _rank_dict(sub)
                          for r, sub in self.rank_reports.items()}} if self.rank_reports else {}),
            **self.extra,
        }


def _rank_dict(sub: "GraphDiffReport") -> dict[str, Any]:
    d = sub.to_dict()
    for key in ("schema_version", "versions", "config", "passes", "target", "device"):
        d.pop(key, None)
    return d


def _describe_collective(k: Kernel) -> str:
    c = k.collective or {}
    args = ", ".join([*c.get("tensors", []), *c.get("args", [])])
    return f"{k.name}({args})"


def _collective_row(before: Kernel | None, after: Kernel | None, status: str) -> dict[str, Any]:
    k = after or before
    return {"status": status, "op": k.name, "rank": k.rank, "graph": k.graph,
            "before": (before.collective if before else None), "after": (after.collective if after else None)}


# ----------------------------------------------------------------------------- targets
def load_target(spec: str | None, device: str | None = None) -> tuple[Callable, tuple, dict]:
    """`path/to/file.py:factory` or `package.module:factory` -> (fn, args, kwargs).

    The factory returns `(model_or_fn, example_inputs)`; inputs may be a tuple/list of
    positional arguments, a dict of keyword arguments, or a single tensor. A factory with
    a `device` parameter is given `--device`; otherwise the model and tensor inputs are
    moved there when `--device` is set.
    """
    spec = spec or DEFAULT_TARGET
    if ":" not in spec:
        raise GraphDiffError(f"target '{spec}': expected path/to/file.py:factory or package.module:factory")
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise GraphDiffError(f"target '{spec}': expected path/to/file.py:factory or package.module:factory")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where)
            if not path.is_file():
                raise GraphDiffError(f"target '{spec}': no such file {where}")
            name = f"_fusewright_target_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            sys.path.insert(0, str(path.resolve().parent))
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(where)
    except GraphDiffError:
        raise
    except Exception as exc:
        raise GraphDiffError(f"target '{spec}': cannot import {where}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise GraphDiffError(f"target '{spec}': {where} has no callable '{attr}'")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        result = factory(device=device) if "device" in params else factory()
    except Exception as exc:
        raise GraphDiffError(f"target '{spec}': factory raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and callable(result[0])):
        raise GraphDiffError(f"target '{spec}': factory must return (model_or_fn, example_inputs), "
                             f"got {type(result).__name__}")
    fn, inputs = result
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise GraphDiffError(f"target '{spec}': example_inputs must be a tuple, list, dict or tensor, "
                             f"got {type(inputs).__name__}")
    if device and "device" not in params:
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(device)
        args = tuple(torch.utils._pytree.tree_map(move, list(args)))
        kwargs = torch.utils._pytree.tree_map(move, kwargs)
    return fn, args, kwargs


# ----------------------------------------------------------------------------- live
def _clone_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
    return tuple(torch.utils._pytree.tree_map(clone, list(args))), torch.utils._pytree.tree_map(clone, kwargs)


def live_diff(fn: Callable, inputs: Sequence[Any], config: PassConfig | None = None, *,
              kwargs: dict | None = None, dynamic: bool | None = None, rtol: float | None = None,
              atol: float | None = None, progress: Callable[[str], None] | None = None,
              target: str | None = None, device: str | None = None) -> GraphDiffReport:
    """Compile `fn` with fusewright off, then on; compare kernels, graphs and outputs."""
    from ..testing import compile_and_capture

    step = progress or (lambda msg: None)
    config = PassConfig.resolve(config)
    kwargs = kwargs or {}
    runs = []
    for label, enable in (("stock Inductor", False), ("fusewright", True)):
        step(f"compiling with {label}")
        args, kw = _clone_inputs(tuple(inputs), kwargs)
        bound = (lambda *a, _kw=kw: fn(*a, **_kw)) if kw else fn
        try:
            runs.append(compile_and_capture(bound, args, config, enable=enable, dynamic=dynamic))
        except Exception as exc:
            raise GraphDiffError(f"compiling with {label} failed: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    step("reading output code")
    sides = []
    for (label, _), run in zip((("before", 0), ("after", 1)), runs):
        codes = [parse_output_code(code, f"{label} graph {i}", graph=i) for i, code in enumerate(run.codes)]
        sides.append(Side(label, codes, run.graphs_before, run.graphs_after, run.outputs))
    before, after = sides
    step("diffing")
    report = GraphDiffReport(
        mode="live", before=before, after=after,
        kernel_diff=match_kernels(before.kernels, after.kernels),
        fx=diff_graph_lists(after.graphs_before, after.graphs_after),
        rewrites=runs[1].report.rewrites(), passes=runs[1].report.to_dict(),
        numerics=compare_outputs(before.outputs, after.outputs, rtol, atol),
        target=target, device=device, config=config.to_dict() if hasattr(config, "to_dict") else None,
        fx_collective_problems=[f"graph {i}: {p}" for i, (b, a) in enumerate(zip(after.graphs_before,
                                                                                  after.graphs_after))
                                for p in collective_changes(b, a)],
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        report.rank = str(torch.distributed.get_rank())  # each rank diffs its own compile
        for code in before.codes + after.codes:
            code.set_rank(report.rank)
    return report


# ----------------------------------------------------------------------------- offline
def _load(path: str) -> list[OutputCode]:
    try:
        return load_output_codes(path)
    except OutputCodeError as exc:
        raise GraphDiffError(str(exc)) from None


def _rank_label(rank: str | None) -> str:
    return "unknown" if rank is None else rank if not rank.isdigit() else f"rank {rank}"


def _select_rank(groups: dict, rank: str | int | None, where: str) -> list[OutputCode] | None:
    if rank is None:
        return None
    ranked = [r for r in groups if r is not None]
    if not ranked:
        raise GraphDiffError(f"--rank {rank}: {where} holds no per-rank output code (ranks come from `[rankN]:` "
                             "log prefixes, rankN path components, or TORCH_COMPILE_DEBUG's rank_N trace logs)")
    key = str(rank)
    if key not in groups:
        raise GraphDiffError(f"--rank {rank}: no such rank in {where}; ranks: {', '.join(map(str, ranked))}")
    return groups[key]


def offline_diff(before_path: str, after_path: str, rank: str | int | None = None) -> GraphDiffReport:
    """Diff two sets of output code: files, TORCH_LOGS logs or debug directories.

    Per-rank code is diffed rank by rank: one report per rank in `rank_reports`, the
    sides summed over ranks; `rank` keeps one rank's code only."""
    target = f"{before_path} -> {after_path}"
    b_codes, a_codes = _load(before_path), _load(after_path)
    b_groups, a_groups = group_by_rank(b_codes), group_by_rank(a_codes)
    if rank is not None:
        if set(b_groups) == set(a_groups) == {None}:
            _select_rank(b_groups, rank, f"{before_path} or {after_path}")  # raises: no ranks anywhere
        # a side without ranks (one process's code) is taken whole
        before = Side("before", b_codes if set(b_groups) == {None} else _select_rank(b_groups, rank, before_path))
        after = Side("after", a_codes if set(a_groups) == {None} else _select_rank(a_groups, rank, after_path))
        return GraphDiffReport(mode="offline", before=before, after=after, rank=str(rank), target=target,
                               kernel_diff=match_kernels(before.kernels, after.kernels))
    if set(b_groups) == set(a_groups) == {None} or (len(b_groups) == len(a_groups) == 1
                                                     and set(b_groups) != set(a_groups)):
        # no ranks, or one process on each side (a rank-0 log against a plain one): one diff
        before, after = Side("before", b_codes), Side("after", a_codes)
        return GraphDiffReport(mode="offline", before=before, after=after, target=target,
                               kernel_diff=match_kernels(before.kernels, after.kernels))
    if set(b_groups) != set(a_groups):
        labels = lambda g: ", ".join(_rank_label(r) for r in g) or "none"
        raise GraphDiffError(f"the two sides hold different ranks: BEFORE {labels(b_groups)}; AFTER "
                             f"{labels(a_groups)} (pick one with --rank N)")
    subs = {}
    for r in b_groups:
        before, after = Side("before", b_groups[r]), Side("after", a_groups[r])
        subs[r] = GraphDiffReport(mode="offline", before=before, after=after, rank=r, target=target,
                                  kernel_diff=match_kernels(before.kernels, after.kernels))
    return GraphDiffReport(mode="offline", before=Side("before", b_codes), after=Side("after", a_codes),
                           kernel_diff=[m for sub in subs.values() for m in sub.kernel_diff], target=target,
                           rank_reports=subs)


def single_report(path: str, rank: str | int | None = None) -> GraphDiffReport:
    """One set of output code: its kernels and no-op flags (no diff); per rank where it has ranks."""
    codes = _load(path)
    groups = group_by_rank(codes)
    if rank is not None:
        return GraphDiffReport(mode="single", before=Side("code", _select_rank(groups, rank, path)), after=None,
                               target=path, rank=str(rank))
    subs = {}
    if set(groups) != {None}:
        subs = {r: GraphDiffReport(mode="single", before=Side("code", g), after=None, target=path, rank=r)
                for r, g in groups.items()}
    return GraphDiffReport(mode="single", before=Side("code", codes), after=None, target=path, rank_reports=subs)


# ----------------------------------------------------------------------------- expectations
def check_expectations(report: GraphDiffReport, *, no_noop: bool = False, fewer_kernels: bool = False,
                       rewrites: dict[str, int] | None = None, close: bool = False,
                       collectives_unchanged: bool = True) -> list[str]:
    """Unmet expectations, each as one sentence naming what was expected and what was found.
    A changed collective is always one (a rewrite must not change what is communicated),
    unless `collectives_unchanged=False`."""
    unmet = []
    if collectives_unchanged:
        problems = report.collectives()["problems"]
        for problem in problems[:10]:
            unmet.append(f"collectives changed: {problem}")
        if len(problems) > 10:
            unmet.append(f"collectives changed: {len(problems) - 10} more")
    final = report.after or report.before
    if no_noop:
        noops = [k for k in final.kernels if k.is_noop]
        if noops:
            names = ", ".join(k.name for k in noops[:5]) + (" ..." if len(noops) > 5 else "")
            unmet.append(f"--expect-no-noop: {len(noops)} no-op kernel(s) remain: {names}")
    if fewer_kernels:
        if report.after is None:
            unmet.append("--expect-fewer-kernels needs two sides to compare")
        elif len(report.after.kernels) >= len(report.before.kernels):
            unmet.append(f"--expect-fewer-kernels: kernels {len(report.before.kernels)} -> "
                         f"{len(report.after.kernels)}, not fewer")
    for name, want in (rewrites or {}).items():
        got = report.rewrites.get(name, 0)
        if got != want:
            unmet.append(f"--expect-rewrites {name}={want}: got {got}")
    if close and report.numerics.ok is False:
        unmet.append(f"--expect-close: outputs differ (max abs diff {report.numerics.max_abs_diff:g}; "
                     f"{report.numerics.detail})")
    return unmet


# ----------------------------------------------------------------------------- kernel dataflow
def kernel_graphs(report: GraphDiffReport) -> list[GraphDiff]:
    """Per compiled graph, the kernels as a dataflow graph (kernel -> the kernels reading what
    it wrote), both sides in one networkx graph with `status` on nodes and edges, in the same
    form as the FX diff so the same renderer draws it."""
    import networkx as nx

    from .fx_diff import ADDED, REMOVED, UNCHANGED

    match_id: dict[int, tuple[str, KernelMatch]] = {}
    for j, m in enumerate(report.kernel_diff):
        for k in (m.before, m.after):
            if k is not None:
                match_id[id(k)] = (f"k{j}", m)
    sides = [report.before] + ([report.after] if report.after is not None else [])
    count = max(len(s.codes) for s in sides)
    out = []
    for g in range(count):
        union = nx.DiGraph()
        edge_sets = []
        for side in sides:
            edges: set[tuple[str, str]] = set()
            if g < len(side.codes):
                code = side.codes[g]
                last: dict[str, str] = {}

                def source_of(buf: str) -> str | None:
                    if buf in last:
                        return last[buf]
                    if buf in code.inputs:
                        uid = f"in:{buf}"
                        union.add_node(uid, name=buf, op="placeholder", target="input", val="", source=None,
                                       status=UNCHANGED)
                        return uid
                    return None

                for k in code.kernels:
                    uid, m = match_id.get(id(k), (f"x{id(k)}", None))
                    if uid not in union:
                        shown = m.after or m.before if m else k
                        tag = "no-op" if shown.is_noop else (shown.movement or "")
                        union.add_node(uid, name=shown.name, op="kernel", target=_kernel_label(shown),
                                       val=" ".join(x for x in (tag, _fmt_bytes(shown.bytes)) if x),
                                       source=shown.noop_reason or ", ".join(shown.ops),
                                       status=m.status if m and m.status != "kernel" else UNCHANGED)
                    for buf in dict.fromkeys(k.reads):
                        src = source_of(buf)
                        if src is not None and src != uid:
                            edges.add((src, uid))
                    for buf in k.writes:
                        last[buf] = uid
                if code.outputs:
                    union.add_node("out", name="output", op="output", target="output", val="", source=None,
                                   status=UNCHANGED)
                    for buf in code.outputs:
                        src = source_of(buf)
                        if src is not None:
                            edges.add((src, "out"))
            edge_sets.append(edges)
        before_e = edge_sets[0]
        after_e = edge_sets[1] if len(edge_sets) > 1 else edge_sets[0]
        for u, v in before_e | after_e:
            status = UNCHANGED if (u, v) in before_e and (u, v) in after_e else REMOVED if (u, v) in before_e \
                else ADDED
            union.add_edge(u, v, status=status)
        out.append(GraphDiff(g, union))
    return out


def _kernel_label(k: Kernel) -> str:
    kind = k.short_kind.replace("persistent", "per").replace("pointwise", "poi").replace("reduction", "red") \
        .replace("template", "tem")
    what = ", ".join(k.ops[:3]) if k.kind not in ("custom_op", "extern", "aten_fallback", "collective") else k.name
    return f"{kind}: {what}" if what else f"{kind}: {k.name}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1024:.0f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"

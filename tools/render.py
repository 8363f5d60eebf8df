"""Showing a graph-diff report: rich tables in the terminal, an SVG of the FX diff, an HTML page.

The SVG is drawn by hand (no graphviz or matplotlib needed): nodes in layers by
longest path from the inputs, ordered within a layer by the mean position of their
inputs; removed nodes red, added green, unchanged grey; hovering a node shows its
target, value and model source line. Large graphs keep the changed nodes and their
direct neighbours and say how many unchanged nodes were left out.
"""

from __future__ import annotations

import html
from typing import Any

import networkx as nx
from rich.markup import escape

from .fx_diff import ADDED, REMOVED, UNCHANGED, GraphDiff
from .graph_diff import GraphDiffReport, kernel_graphs

COLORS = {REMOVED: ("#fde2e1", "#c0392b"), ADDED: ("#def7e3", "#1e8449"), UNCHANGED: ("#f2f3f4", "#99a3a4"),
          "changed": ("#fff6d5", "#b7950b")}
STATUS_STYLE = {"removed": "red", "added": "green", "changed": "yellow", "unchanged": "dim"}
MAX_NODES = 140


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------------------- terminal
def print_report(report: GraphDiffReport, console, verbose: bool = False) -> None:
    """The report's tables; with per-rank code, one report per rank, then the totals."""
    if report.rank_reports:
        for rank, sub in report.rank_reports.items():
            console.rule(f"[bold]rank {rank if rank is not None else '(unknown)'}[/]")
            _print_one(sub, console, verbose)
        console.rule("[bold]all ranks[/]")
        b, a = report.before, report.after
        console.print(f"{len(report.rank_reports)} ranks; kernels {len(b.kernels)}"
                      + (f" -> {len(a.kernels)}; removed {report.counts('removed')}, added "
                         f"{report.counts('added')}, changed {report.counts('changed')}" if a is not None else "")
                      + f"; no-op kernels {sum(k.is_noop for k in b.kernels)}"
                      + (f" -> {sum(k.is_noop for k in a.kernels)}" if a is not None else ""))
        _print_collectives(report, console)
        return
    _print_one(report, console, verbose)


def _print_collectives(report: GraphDiffReport, console) -> None:
    """Collectives in one line when untouched; every problem in red when not."""
    c = report.collectives()
    if c["problems"]:
        console.print(f"[bold white on red] COLLECTIVES CHANGED [/] [bold red]{len(c['problems'])} problem(s): a "
                      "rewrite must not change what is communicated or move computation across a wait_tensor[/]")
        for problem in c["problems"]:
            console.print(f"  [red]{problem}[/]")
    elif c["before_count"] or c["after_count"]:
        per = "" if report.after is None else f" -> {c['after_count']}, all unchanged"
        console.print(f"collectives: {c['before_count']}{per}")


def _print_one(report: GraphDiffReport, console, verbose: bool = False) -> None:
    from rich.table import Table

    if report.mode == "single":
        table = Table(title=f"kernels in {report.target}", title_justify="left")
        for col in ("#", "kernel", "kind", "fused ops", "no-op", "est. bytes"):
            table.add_column(col)
        for i, k in enumerate(report.before.kernels):
            table.add_row(str(i), k.name, k.short_kind, _ops(k), _noop_cell(k), fmt_bytes(k.bytes))
        console.print(table)
        b = report.before
        console.print(f"{len(b.kernels)} kernel(s) in {len(b.codes)} graph(s); "
                      f"{sum(k.is_noop for k in b.kernels)} no-op; est. {fmt_bytes(b.estimated_bytes)} moved")
        _print_collectives(report, console)
        return
    title = "fusewright graph-diff" + (f": {report.target}" if report.target else "") + (
        f" (rank {report.rank})" if report.rank is not None else "")
    table = Table(title=title, title_justify="left")
    for col in ("", "before", "after", "kind", "fused ops", "no-op", "est. bytes"):
        table.add_column(col, overflow="fold")
    for m in report.kernel_diff:
        if m.status == "unchanged" and not verbose and len(report.kernel_diff) > 30:
            continue
        k = m.after or m.before
        style = STATUS_STYLE[m.status]
        bytes_cell = fmt_bytes(k.bytes) if m.status != "changed" else \
            f"{fmt_bytes(m.before.bytes)} -> {fmt_bytes(m.after.bytes)}"
        noop = _noop_cell(m.before) if m.status == "removed" else _noop_cell(k)
        table.add_row(f"[{style}]{m.status}[/]", m.before.name if m.before else "",
                      m.after.name if m.after else "", k.short_kind, _ops(k), noop, bytes_cell)
    console.print(table)
    b, a = report.before, report.after
    nb, na = len(b.kernels), len(a.kernels)
    delta = na - nb
    console.print(
        f"kernels: {nb} -> {na} ([{'green' if delta < 0 else 'red' if delta > 0 else 'dim'}]{delta:+d}[/]); "
        f"no-op kernels: {sum(k.is_noop for k in b.kernels)} -> {sum(k.is_noop for k in a.kernels)}; "
        f"est. bytes: {fmt_bytes(b.estimated_bytes)} -> {fmt_bytes(a.estimated_bytes)}; "
        f"removed {report.counts('removed')}, added {report.counts('added')}, "
        f"changed {report.counts('changed')}, unchanged {report.counts('unchanged')}")
    _print_collectives(report, console)
    if report.mode == "live":
        _print_passes(report, console)
        _print_fx(report, console)
        n = report.numerics
        if n.ok is None:
            console.print("outputs: not compared")
        else:
            verdict = "[green]agree[/]" if n.ok else f"[red]DIFFER[/] ({escape(str(n.detail))})"
            console.print(f"outputs: {verdict}; max abs diff {n.max_abs_diff:g}"
                          + ("; bitwise equal" if n.bitwise else ""))


def _ops(k) -> str:
    ops = ", ".join(k.ops[:8]) + (" ..." if len(k.ops) > 8 else "")
    return ops or ", ".join(k.body_ops[:6])


def _noop_cell(k) -> str:
    if k is None:
        return ""
    if k.is_noop:
        return f"[bold red]no-op[/] {escape(k.noop_reason or '')}"
    if k.movement:
        return f"[yellow]{k.movement}[/]"
    if k.noop_stores:
        return f"[yellow]{k.noop_stores}/{k.stores} stores copy only[/]"
    return ""


def _print_passes(report: GraphDiffReport, console) -> None:
    from rich.table import Table

    passes = report.passes.get("passes", {})
    if not passes:
        console.print("rewrites: none (no pass ran)")
        return
    table = Table(title="fusewright passes", title_justify="left")
    for col in ("pass", "matched", "rewritten", "skipped", "lowered to (why) / variants"):
        table.add_column(col, overflow="fold")
    for name, stats in passes.items():
        # free text from the passes ("rope[interleaved] -> aten"): escaped, or rich reads
        # the brackets as markup and drops them
        reasons = escape("; ".join(sorted({s["reason"] for s in stats.get("skipped", [])}))[:200])
        skipped = f"{len(stats.get('skipped', []))}" + (f" ({reasons})" if reasons else "")
        errors = stats.get("errors") or []
        # The passes record what each match was lowered to, and why, as detail strings
        # (lowering/registry.py Choice.detail; variant names for the other passes).
        details = escape("; ".join(f"{detail} x{count}"
                                   for detail, count in sorted((stats.get("details") or {}).items())))
        table.add_row(name, str(stats.get("matched", 0)), str(stats.get("rewritten", 0)),
                      skipped + (f" [red]{len(errors)} failed[/]" if errors else ""), details)
    console.print(table)


def _print_fx(report: GraphDiffReport, console) -> None:
    from rich.table import Table

    rows = [(g.graph, row) for g in report.fx for row in g.by_source()]
    if not rows:
        console.print("FX graph: no nodes removed or added")
        return
    table = Table(title="FX graph changes by model source line", title_justify="left")
    for col in ("graph", "source", "removed", "added"):
        table.add_column(col, overflow="fold")
    for graph, row in rows:
        table.add_row(str(graph), row["source"], f"[red]{_count(row['removed'])}[/]",
                      f"[green]{_count(row['added'])}[/]")
    console.print(table)


def _count(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())


# ----------------------------------------------------------------------------- SVG
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 210, 38, 24, 46, 20


def _visible(g: nx.DiGraph) -> tuple[nx.DiGraph, int]:
    if g.number_of_nodes() <= MAX_NODES:
        return g, 0
    changed = {n for n, d in g.nodes(data=True) if d["status"] != UNCHANGED}
    changed |= {n for u, v, d in g.edges(data=True) if d["status"] != UNCHANGED for n in (u, v)}
    keep = set(changed)
    for n in changed:
        keep |= set(g.predecessors(n)) | set(g.successors(n))
    sub = g.subgraph(keep).copy()
    return sub, g.number_of_nodes() - sub.number_of_nodes()


def _layout(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    layer: dict[str, int] = {}
    for n in nx.topological_sort(g):
        layer[n] = max((layer[p] + 1 for p in g.predecessors(n)), default=0)
    rows: dict[int, list[str]] = {}
    for n in nx.topological_sort(g):
        rows.setdefault(layer[n], []).append(n)
    pos: dict[str, tuple[float, float]] = {}
    for y in sorted(rows):
        order = rows[y]
        if y > 0:  # barycentre of the inputs' x positions keeps edges short
            def bary(n: str) -> float:
                xs = [pos[p][0] for p in g.predecessors(n) if p in pos]
                return sum(xs) / len(xs) if xs else 0.0
            order = sorted(order, key=bary)
        for i, n in enumerate(order):
            pos[n] = (float(i), float(y))
    return pos


def graph_svg(diff: GraphDiff, title: str = "") -> tuple[str, int, int]:
    """(svg fragment, width, height) of one graph diff, drawn at the origin."""
    g, hidden = _visible(diff.union)
    pos = _layout(g)
    cols = max((x for x, _ in pos.values()), default=0) + 1
    rows = max((y for _, y in pos.values()), default=0) + 1
    width = int(max(MARGIN * 2 + cols * (NODE_W + GAP_X), MARGIN * 2 + 9 * len(title) + (420 if hidden else 0)))
    height = int(MARGIN * 2 + 30 + rows * (NODE_H + GAP_Y))
    xy = {n: (MARGIN + x * (NODE_W + GAP_X), MARGIN + 30 + y * (NODE_H + GAP_Y)) for n, (x, y) in pos.items()}
    parts = [f'<text x="{MARGIN}" y="{MARGIN + 12}" class="title">{html.escape(title)}'
             + (f" ({hidden} unchanged nodes away from the changes not shown)" if hidden else "") + "</text>"]
    for u, v, d in sorted(g.edges(data=True), key=lambda e: e[2]["status"] != UNCHANGED):
        (x1, y1), (x2, y2) = xy[u], xy[v]
        sx, sy, ex, ey = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2, y2
        color = COLORS[d["status"]][1]
        dash = ' stroke-dasharray="5,3"' if d["status"] == REMOVED else ""
        width_px = 1.2 if d["status"] == UNCHANGED else 2.2
        if pos[v][1] - pos[u][1] > 1 and abs(sx - ex) < NODE_W:
            # an edge that skips layers would run under the boxes between: bow it out to the side
            off = NODE_W * 0.75
            c1, c2 = f"{sx + off:.0f},{sy + (ey - sy) / 3:.0f}", f"{ex + off:.0f},{ey - (ey - sy) / 3:.0f}"
        else:
            c1, c2 = f"{sx:.0f},{sy + GAP_Y / 2:.0f}", f"{ex:.0f},{ey - GAP_Y / 2:.0f}"
        parts.append(f'<path d="M{sx:.0f},{sy:.0f} C{c1} {c2} '
                     f'{ex:.0f},{ey:.0f}" stroke="{color}" stroke-width="{width_px}" fill="none"{dash} '
                     f'marker-end="url(#arrow-{d["status"]})"/>')
    for n, d in g.nodes(data=True):
        x, y = xy[n]
        fill, stroke = COLORS.get(d["status"], COLORS[UNCHANGED])
        label = d["name"] if d["op"] in ("placeholder", "get_attr") else d["target"]
        tip_head = f"{d['status']}: {d['name']}" + (f" = {d['target']}" if d["op"] != "kernel" else "")
        label = label if len(label) <= 30 else label[:28] + ".."
        val = (d.get("val") or "")[:32]
        tip = f"{tip_head} {d.get('val') or ''}\n{d.get('source') or ''}"
        parts.append(
            f'<g class="node {d["status"]}"><title>{html.escape(tip)}</title>'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{1 if d["status"] == UNCHANGED else 2}"/>'
            f'<text x="{x + NODE_W / 2}" y="{y + 16}" class="op">{html.escape(label)}</text>'
            f'<text x="{x + NODE_W / 2}" y="{y + 30}" class="val">{html.escape(val)}</text></g>')
    return "\n".join(parts), width, height


_STYLE = """<style>
 text { font-family: ui-monospace, Menlo, Consolas, monospace; text-anchor: middle; }
 .title { font-size: 15px; font-weight: bold; text-anchor: start; fill: #222; }
 .op { font-size: 11.5px; fill: #111; } .val { font-size: 10px; fill: #555; }
 .legend { font-size: 12px; text-anchor: start; fill: #222; }
 .removed .op { text-decoration: line-through; }
</style>"""


def render_svg(report: GraphDiffReport) -> str:
    """A standalone SVG: every compiled graph's FX diff (live mode), then its kernels as a
    dataflow graph (kernel -> kernels reading what it wrote), stacked top to bottom."""
    frags, y, width = [], 40, 520
    sections = [(d, f"compiled graph {d.graph}, FX: removed {len(d.nodes(REMOVED))}, added "
                    f"{len(d.nodes(ADDED))}, unchanged {len(d.nodes(UNCHANGED))}") for d in report.fx]
    for d in kernel_graphs(report):
        kinds = [n for n, a in d.union.nodes(data=True) if a["op"] == "kernel"]
        counts = {s: sum(d.union.nodes[n]["status"] == s for n in kinds) for s in ("removed", "added", "changed")}
        sections.append((d, f"compiled graph {d.graph}, kernels: " + (
            ", ".join(f"{s} {c}" for s, c in counts.items()) if report.after is not None else f"{len(kinds)}")))
    for d, title in sections:
        frag, w, h = graph_svg(d, title)
        frags.append(f'<g transform="translate(0,{y})">{frag}</g>')
        y += h
        width = max(width, w)
    markers = "".join(
        f'<marker id="arrow-{s}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{c[1]}"/></marker>'
        for s, c in COLORS.items())
    legend = "".join(
        f'<rect x="{MARGIN + i * 120}" y="12" width="14" height="14" rx="3" fill="{COLORS[s][0]}" '
        f'stroke="{COLORS[s][1]}" stroke-width="2"/><text x="{MARGIN + 20 + i * 120}" y="24" '
        f'class="legend">{s}</text>' for i, s in enumerate((REMOVED, ADDED, "changed", UNCHANGED)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + MARGIN}" '
            f'viewBox="0 0 {width} {y + MARGIN}">{_STYLE}<defs>{markers}</defs>'
            f'<rect width="100%" height="100%" fill="white"/>{legend}' + "\n".join(frags) + "</svg>")


# ----------------------------------------------------------------------------- HTML
def render_html(report: GraphDiffReport) -> str:
    """One self-contained page: summary, kernel diff, pass counts, FX changes, the SVG."""
    d = report.to_dict()
    esc = html.escape
    rows = []
    for m in report.kernel_diff or [_single(k) for k in report.before.kernels]:
        k = m.after or m.before
        noop = (f"no-op: {k.noop_reason}" if k.is_noop else k.movement or "")
        rows.append(f'<tr class="{m.status}"><td>{m.status}</td><td>{esc(m.before.name if m.before else "")}</td>'
                    f'<td>{esc(m.after.name if m.after else "")}</td><td>{esc(k.short_kind)}</td>'
                    f'<td>{esc(_ops(k))}</td><td>{esc(noop)}</td><td>{fmt_bytes(k.bytes)}</td></tr>')
    before, after = d["before"], d["after"]
    summary = (f"kernels {before['kernel_count']} &rarr; {after['kernel_count']}, no-op kernels "
               f"{before['noop_kernel_count']} &rarr; {after['noop_kernel_count']}")
    num = d["numerics"]
    if num["ok"] is not None:
        summary += f"; outputs {'agree' if num['ok'] else 'DIFFER'} (max abs diff {num['max_abs_diff']:g})"
    rewrites = ", ".join(f"{esc(k)}={v}" for k, v in d["rewrites"].items()) or "none"
    coll = d["collectives"]
    if coll["problems"]:
        summary += ('<div style="background:#c0392b;color:white;padding:6px 10px;margin:8px 0;font-weight:bold">'
                    "COLLECTIVES CHANGED: " + "<br>".join(esc(p) for p in coll["problems"]) + "</div>")
    elif coll["before_count"]:
        summary += f"; collectives {coll['before_count']} &rarr; {coll['after_count']}, unchanged"
    if report.rank_reports:
        summary += "<br>per rank: " + "; ".join(
            f"rank {esc(str(r))}: kernels {sub.to_dict()['before']['kernel_count']} &rarr; "
            f"{sub.to_dict()['after']['kernel_count']}" for r, sub in report.rank_reports.items())
    fx_rows = "".join(
        f"<tr><td>{g.graph}</td><td>{esc(r['source'])}</td><td class='rm'>{esc(_count(r['removed']))}</td>"
        f"<td class='add'>{esc(_count(r['added']))}</td></tr>" for g in report.fx for r in g.by_source())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fusewright graph-diff</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
 table {{ border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }}
 td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; font-family: ui-monospace, monospace;
          max-width: 380px; overflow-wrap: anywhere; vertical-align: top; }}
 tr.removed td {{ background: #fde2e1; }} tr.added td {{ background: #def7e3; }}
 tr.changed td {{ background: #fff6d5; }} tr.unchanged td {{ color: #777; }}
 td.rm {{ color: #c0392b; }} td.add {{ color: #1e8449; }} td:first-child {{ white-space: nowrap; }}
 .svg {{ overflow: auto; border: 1px solid #ddd; }}
</style></head><body>
<h1>fusewright graph-diff</h1>
<p><b>{esc(str(report.target or ''))}</b> ({esc(report.mode)} mode{', device ' + esc(report.device) if report.device else ''})</p>
<p>{summary}<br>rewrites: {rewrites}</p>
<h2>Kernels</h2>
<table><tr><th></th><th>before</th><th>after</th><th>kind</th><th>fused ops</th><th>no-op / movement</th><th>est. bytes</th></tr>
{''.join(rows)}</table>
<h2>FX graph changes by model source line</h2>
<table><tr><th>graph</th><th>source</th><th>removed</th><th>added</th></tr>{fx_rows or '<tr><td colspan=4>none</td></tr>'}</table>
<h2>Graph diff (FX graph, then kernels as dataflow)</h2>
<div class="svg">{render_svg(report)}</div>
</body></html>
"""


def _single(k) -> Any:
    from .kernel_match import KernelMatch

    return KernelMatch("kernel", k, None)

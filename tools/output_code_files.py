"""Finding and reading Inductor output-code dumps and logs, and which rank each came from.

`load_output_codes(path)` accepts an output-code file, a `TORCH_LOGS=output_code` log
(one or many graphs), or a directory (every `output_code.py` below it, else every
output-code module in it). Anything else raises :class:`OutputCodeError` with a
one-line reason. Parsing one module is `output_code.parse_output_code`.

Per-rank code (tensor parallel runs) carries its rank in `OutputCode.rank`: from a
`[rankN]:` prefix on the log lines (torch's logging adds it once a process group
exists), from a path component naming the rank (`rank0/`, `rank_1`, `..._rank1.py`,
torchrun's `--log-dir` layout `attempt_0/1/`), or, for `TORCH_COMPILE_DEBUG`'s
`run_*-pid_N` directories, from the `rank_N` trace logs beside them that record each
process id; an unknown rank of a pid directory is labelled `pid N`.
`group_by_rank(codes)` splits a list by rank.
"""

from __future__ import annotations

import re
from pathlib import Path

from .output_code import OutputCode, OutputCodeError, _looks_like_output_code, parse_output_code


# ----------------------------------------------------------------------------- loading
_LOG_PREFIX = re.compile(r"^[VIWEDC]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] (?:\[[^\]]*\] )*")
# torch's logging puts `[rank0]:` before a record's first line once a process group exists;
# torchrun --tee puts `[default0]:` (role + local rank) before every line
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)(\d+)\]:")


def split_log_ranks(text: str) -> list[tuple[str | None, str]]:
    """(rank, module) for each output-code module in a log, ranks in order of first appearance.

    A record's continuation lines carry no prefix: they belong to the rank of the last
    prefixed line. (Two ranks writing one file interleave whole records, not lines of one.)"""
    by_rank: dict[str | None, list[str]] = {}
    rank: str | None = None
    for raw in text.splitlines():
        line = raw
        while True:  # `[default1]:[rank1]:V1122 ...`
            m = _RANK_PREFIX.match(line)
            if not m:
                break
            rank, line = m.group(1), line[m.end():]
        by_rank.setdefault(rank, []).append(line)
    if set(by_rank) == {None}:
        return [(None, m) for m in split_log(text)]
    return [(r, m) for r, lines in by_rank.items() for m in split_log("\n".join(lines))]


def split_log(text: str) -> list[str]:
    """The output-code modules in a `TORCH_LOGS=output_code` log, in order (one process's log;
    `split_log_ranks` separates the ranks of a multi-process log first)."""
    if any(_RANK_PREFIX.match(line) for line in text.splitlines()[:2000]):
        return [m for _, m in split_log_ranks(text)]
    modules: list[str] = []
    current: list[str] | None = None
    for raw in text.splitlines():
        prefixed = _LOG_PREFIX.match(raw)
        line = raw[prefixed.end():] if prefixed else raw
        if "Output code written to:" in line or (prefixed and current is not None and "[__output_code]" not in raw):
            if current is not None:
                modules.append("\n".join(current))
                current = None
            continue
        if line.rstrip().endswith("Output code:") and (prefixed or line.startswith("Output code:")):
            if current is not None:
                modules.append("\n".join(current))
            current = []
            continue
        if current is not None:
            current.append(line)
    if current is not None:
        modules.append("\n".join(current))
    return [m for m in modules if m.strip()]


def load_output_codes(path: str | Path) -> list[OutputCode]:
    """Every compiled graph's output code found at `path` (file, log or directory).

    Where the code comes from several ranks, each `OutputCode` has its `rank` and graph
    indices count per rank."""
    p = Path(path)
    if not p.exists():
        raise OutputCodeError(f"{path}: no such file or directory")
    if p.is_dir():
        files = sorted(p.rglob("output_code.py"))
        if not files:
            files = sorted(f for f in p.rglob("*.py") if _looks_like_output_code(_read(f)))
        if not files:
            raise OutputCodeError(f"{path}: directory holds no Inductor output code (no output_code.py below it)")
        pids = _pid_ranks(p)
        codes = [parse_output_code(_read(f), str(f)).set_rank(rank_of_path(f, p, pids)) for f in files]
        labels = {c.rank for c in codes}
        if len(labels) == 1 and (next(iter(labels)) or "").startswith("pid "):
            for c in codes:  # one process's debug directory: not a per-rank run
                c.set_rank(None)
        return _number_graphs(codes)
    text = _read(p)
    if re.search(r"Output code:\s*$", text, re.M):  # a log: one or many modules
        modules = split_log_ranks(text)
        if not modules:
            raise OutputCodeError(f"{path}: log holds no output code (run with TORCH_LOGS=output_code)")
        file_rank = rank_of_path(p, p.parent)
        codes = [parse_output_code(m, f"{path}#{i}" + (f" rank {r}" if r is not None else "")).set_rank(
            r if r is not None else file_rank) for i, (r, m) in enumerate(modules)]
        return _number_graphs(codes)
    return [parse_output_code(text, str(p)).set_rank(rank_of_path(p, p.parent))]


# ----------------------------------------------------------------------------- ranks
_RANK_IN_NAME = re.compile(r"(?:^|[^a-z0-9])rank[_-]?(\d+)(?![0-9])", re.I)
_PID_DIR = re.compile(r"-pid_(\d+)$")
_TRACE_PID = re.compile(r"^[VIWEDC]\d{4} \S+\s+(\d+) ")


def rank_of_path(f: Path, root: Path, pids: dict[str, str] | None = None) -> str | None:
    """The rank a file's path names, below `root` (the directory given) or in the file name."""
    try:
        parts = f.resolve().relative_to(root.resolve()).parts
    except ValueError:
        parts = (f.name,)
    for part in reversed(parts):
        m = _RANK_IN_NAME.search(part)
        if m:
            return str(int(m.group(1)))
    for i, part in enumerate(parts[:-1]):  # torchrun --log-dir: .../attempt_0/<rank>/...
        if re.fullmatch(r"attempt_\d+", part) and parts[i + 1].isdigit():
            return str(int(parts[i + 1]))
    for part in (root.name, *parts):  # TORCH_COMPILE_DEBUG: run_<time>-pid_<pid>
        m = _PID_DIR.search(part)
        if m:
            return (pids or {}).get(m.group(1), f"pid {m.group(1)}")
    return None


def _pid_ranks(root: Path) -> dict[str, str]:
    """pid -> rank, from the `*rank_N*.log` trace logs TORCH_COMPILE_DEBUG writes beside the
    `run_*-pid_N` directories (each line of one names the writing process's pid)."""
    out: dict[str, str] = {}
    bases = [root, root.parent] if _PID_DIR.search(root.name) else [root]
    for base in bases:
        for log in list(base.glob("*rank_*.log")) + list(base.glob("tlparse/*rank_*.log")):
            m = _RANK_IN_NAME.search(log.name)
            try:
                with log.open(errors="replace") as fh:
                    first = fh.readline()
            except OSError:
                continue
            pid = _TRACE_PID.match(first)
            if m and pid:
                out[pid.group(1)] = str(int(m.group(1)))
    return out


def _number_graphs(codes: list[OutputCode]) -> list[OutputCode]:
    """Graph indices in order, counted per rank (a rank's graphs are its compiles)."""
    seen: dict[str | None, int] = {}
    for code in codes:
        n = seen.get(code.rank, 0)
        seen[code.rank] = n + 1
        code.set_rank(code.rank, graph=n)
    return codes


def group_by_rank(codes: list[OutputCode]) -> dict[str | None, list[OutputCode]]:
    """Codes by rank, ranks in numeric order (then pid labels); None holds code of no known rank."""
    groups: dict[str | None, list[OutputCode]] = {}
    for code in codes:
        groups.setdefault(code.rank, []).append(code)
    return dict(sorted(groups.items(), key=lambda kv: rank_sort_key(kv[0])))


def rank_sort_key(rank: str | None) -> tuple:
    if rank is None:
        return (0, 0, "")
    return (1, int(rank), "") if rank.isdigit() else (2, 0, rank)


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except UnicodeDecodeError:
        raise OutputCodeError(f"{p}: not a text file") from None
    except OSError as exc:
        raise OutputCodeError(f"{p}: cannot read: {exc.strerror}") from None

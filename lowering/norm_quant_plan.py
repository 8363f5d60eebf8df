"""Tile plans of the fused RMSNorm -> quant kernel: heuristic, measured table, limits.

`plan(spec, hidden, m=rows)` gives the chunk width and count, the group tile, rows per
program and warps; measured plans (lowering/norm_quant_tuning.json, written by
`fusewright bench norm-quant --sweep --write-tuning`) override the heuristic.
`supports(spec, hidden)` says why a spec cannot take the Triton kernel, if it cannot.
"""

from __future__ import annotations

import functools
import itertools
import json
import os

import torch
import triton

from .norm_quant_spec import NormQuantSpec, SpecError

# dtype and mode codes passed to the kernel as constexpr
_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_RES_CODE = {"none": 0, "input_dtype": 1, "f32": 2}
_W_CODE = {"none": 0, "after_cast": 1, "before_cast": 2, "one_plus": 3}
_INV_CODE = {"rsqrt": 0, "recip_sqrt": 1, "div_sqrt": 2}
_KIND_CODE = {"fp8_static": 0, "fp8_per_token": 1, "fp8_per_group": 2, "int8_per_token": 3}
_APPLY_CODE = {"div": 0, "mul_recip": 1, "mul": 2}


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


# Size classes of the tuning table. Below SMALL_M rows a launch is latency-bound (fewer than
# ~8 rows per SM); below LARGE_M (T = 4096 is the usual prefill chunk) a launch is a few waves
# of programs, so ramp-up and the last wave weigh more than at T = 16384 and another plan
# can win. "mid" falls back to "large" where it was not measured.
SMALL_M = 1024
LARGE_M = 8192
TUNING_PATH = os.path.join(os.path.dirname(__file__), "norm_quant_tuning.json")
ENV_TUNING = "FUSEWRIGHT_NQ_TUNING"


@functools.lru_cache(maxsize=4)
def _tuning_table(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f).get("configs", {})
    except (OSError, ValueError):
        return {}


def tuning_key(spec: NormQuantSpec, hidden: int, m: int | None) -> str:
    """Key of the tile table: register pressure differs between per-token kinds (the whole
    normalised row stays live until its amax is known) and the chunk-local ones (static,
    per group), and with a residual (two inputs, one more output). Column-major group scales
    get their own family: a row's scales land T elements apart, so rows per program decide
    whether the scale stores coalesce. Per-token int8 (`+int8`), ue8m0 group scales
    (`+ue8m0`) and static scales (`+static`) are qualifiers of their own: measured plans
    differ for them."""
    fam = "token" if spec.quant.kind in ("fp8_per_token", "int8_per_token") else "local"
    if spec.quant.kind == "int8_per_token":
        # rounding and clamping to int8 add work per element: the fp8 plans that win at
        # T = 4096 lost 3-11% on it (docs/benchmarks.md, session 9)
        fam += "+int8"
    if spec.norm.residual != "none":
        fam += "+res"
    if spec.quant.kind == "fp8_per_group" and spec.quant.col_major:
        fam += "+col"
    if spec.quant.kind == "fp8_per_group" and spec.quant.ue8m0:
        # power-of-two scales multiply where the others divide, and the two run fastest with
        # different plans (T = 4096, H = 5120: 91% of the limit against 83% with group-128's
        # plan; docs/benchmarks.md, session 10)
        fam += "+ue8m0"
    if spec.quant.kind == "fp8_static":
        # no scale to reduce per chunk: at T = 4096, H = 5120 and 7168 static runs at 98% with
        # a grid of one-row programs and 92-94% with group-128's persistent plans, which win
        # for the group kinds (docs/benchmarks.md, session 11)
        fam += "+static"
    return f"{fam}/{hidden}/{size_class(m)}"


def size_class(m: int | None) -> str:
    """small / mid / large: the tuning table's size class of a launch of `m` rows (None: large)."""
    if m is None or m >= LARGE_M:
        return "large"
    return "small" if m < SMALL_M else "mid"


def _lookup(table: dict, key: str) -> dict:
    """The table entry for `key`, else the same family and size at the nearest measured hidden
    size, else (a family with qualifiers not measured: `+int8`, `+res`, `+col`, `+ue8m0`,
    `+static`) a family with fewer of them. Qualifiers are dropped last first, and an earlier
    one is kept as long as any family keeping it is measured: `local+res+col+ue8m0` tries
    `local+res+col`, `local+res+ue8m0`, `local+res`, then `local+col+ue8m0` (a residual
    changes registers and bytes per element more than the scale layout does)."""
    fam, hidden, size = key.split("/")
    sizes = ("mid", "large") if size == "mid" else (size,)
    base, *quals = fam.split("+")
    # masks in descending binary order, the first qualifier the most significant bit
    fams = ["+".join((base, *(q for q, keep in zip(quals, mask) if keep)))
            for mask in itertools.product((True, False), repeat=len(quals))]
    for f, sz in ((f, sz) for f in fams for sz in sizes):
        cands = [(abs(int(k.split("/")[1]) - int(hidden)), v) for k, v in table.items()
                 if k.split("/")[0] == f and k.split("/")[2] == sz]
        if cands:
            distance, entry = min(cands, key=lambda c: c[0])
            # A chunk width fits the hidden size it was measured at (2048 is ideal at 4096
            # and wastes 30% of the lanes at 2880): borrow only the rest from a neighbour.
            return entry if distance == 0 else {k: v for k, v in entry.items() if k != "CH"}
    return {}


def plan(spec: NormQuantSpec, hidden: int, tuning: dict | None = None, m: int | None = None) -> dict:
    """Tile plan for hidden size `hidden` and `m` rows: chunk width CH (a power of two), chunk
    count NCH (<= 8), group tile GS x CG, rows per program, warps, and for persistent programs
    (PERSIST per SM) the weight prefetch WPRE and the pipeline depth PIPE (0: the next row
    prefetched into registers; S >= 2: a compiler-pipelined loop, S - 1 rows in flight in
    shared memory), or SEQ: runs of SEQ consecutive rows, processed in turn, one program per
    run or (with PERSIST) PERSIST programs per SM looping over runs (for column-major group
    scales, stored once per run). Sources, later ones win:
    the heuristic below, then either the measured table (norm_quant_tuning.json, or the file
    named by $FUSEWRIGHT_NQ_TUNING) or `tuning` (benchmarks, tests). `tuning` replaces the
    table's entry rather than updating it: a plan timed by a sweep must be the plan it names,
    not one with the shipped entry's PERSIST, WPRE or PIPE under it."""
    q = spec.quant
    gs = q.group_size if q.kind == "fp8_per_group" else 0
    if gs and gs & (gs - 1):
        raise SpecError(f"group size {gs} is not a power of two: no Triton tiling for it")
    if tuning is None:
        t = _lookup(_tuning_table(os.environ.get(ENV_TUNING) or TUNING_PATH), tuning_key(spec, hidden, m))
    else:
        t = tuning
    # the smallest power-of-two chunk that covers the row in <= 8 chunks, at least 1024
    # columns for large rows (128-bit loads for 4 warps), at least one group
    ch_min = max(triton.next_power_of_2(triton.cdiv(hidden, 8)), gs or 1)
    ch = max(t.get("CH") or min(1024, triton.next_power_of_2(hidden)), ch_min)
    nch = triton.cdiv(hidden, ch)
    if nch > 8:
        raise SpecError(f"hidden size {hidden} needs {nch} chunks of {ch} (max 8)")
    gs_tile = gs or min(128, ch)
    rows = t.get("ROWS")
    if rows is None:
        # small rows: several per program so a program still moves ~8 KB
        rows = _pow2_floor(max(1, min(16, 4096 // max(ch * nch, 1))))
    warps = t.get("num_warps")
    if warps is None:
        # 8 elements (one 128-bit load of bf16) per thread per chunk; at T=64 on an H100 4 warps
        # beat 8 and 16 for every family (norm_quant_tuning.json)
        warps = max(1, min(8, ch * rows // 256))
    # weight prefetch (loaded before the row's reduction): shortens a row's latency, which is
    # the cost at small T; at large T it holds registers across the reduction for nothing
    wpre = t.get("WPRE", size_class(m) == "small" if m is not None else False)
    pipe = int(t.get("PIPE", 0))
    if pipe == 1 or pipe < 0:
        raise SpecError(f"PIPE={pipe}: the persistent loop's pipeline depth is 0 (the next row prefetched "
                        "into registers) or a stage count >= 2")
    persist = int(t.get("PERSIST", 0)) if rows == 1 else 0
    if pipe and not persist:
        raise SpecError(f"PIPE={pipe} pipelines the persistent loop: it needs PERSIST >= 1 and ROWS = 1 "
                        f"(got PERSIST={t.get('PERSIST', 0)}, ROWS={rows})")
    seq = int(t.get("SEQ", 0))
    if seq and (seq & (seq - 1) or not 2 <= seq <= 64 or rows != 1 or pipe):
        raise SpecError(f"SEQ={seq}: programs of SEQ consecutive rows take a power of two in [2, 64], ROWS = 1 "
                        f"and no PIPE (got ROWS={rows}, PIPE={pipe})")
    return dict(CH=ch, NCH=nch, GS=gs_tile, CG=ch // gs_tile, ROWS=rows, num_warps=warps,
                num_stages=t.get("num_stages", 1), PERSIST=persist, WPRE=int(bool(wpre)), PIPE=pipe, SEQ=seq)


def supports(spec: NormQuantSpec, hidden: int) -> str | None:
    """None when the kernel can run `spec` at hidden size `hidden`, else why not (for the
    registry's `supports` check of the `triton` implementation on CUDA)."""
    try:
        spec.check_hidden(hidden)
        plan(spec, hidden, None, None)
    except SpecError as exc:
        return str(exc)
    if spec.norm.input_dtype not in _DT_CODE or (spec.norm.weight_dtype or torch.float32) not in _DT_CODE:
        return "unsupported dtype"
    return None

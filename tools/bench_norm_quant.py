"""`fusewright bench norm-quant`: fused RMSNorm + quant Triton kernels vs stock Inductor.

For each variant and shape: the Triton kernel (`lowering/norm_quant_triton.launch`) and
stock Inductor compiling the unfused graph (the pure-torch reference of the same spec,
i.e. the eager spelling), measured in the same process. Large token counts: L2 flushed
before every repetition (a 256 MB buffer read, `--flush`), CUDA events around one call
replayed from a CUDA graph (so host launch overhead is not timed), median.
Token counts <= 256: 20 calls captured in one CUDA graph, replayed, time per call (the
launch-bound regime a decode step runs in). The limit is the variant's minimum bytes
(3TH + scales; with a residual add 7TH + scales) over the device-to-device copy
bandwidth measured in the same run.

    fusewright bench norm-quant                      # default table
    fusewright bench norm-quant --quick --json out.json
    fusewright bench norm-quant --sweep              # tile plans per family, H and size class
    # re-tune T=4096 only, merged into the shipped table
    fusewright bench norm-quant --sweep --sweep-sizes mid --families token,local,local+col --write-tuning lowering/norm_quant_tuning.json

The sweep compiles its plans in `--compile-workers` processes before timing them. Every
kernel is assembled by the ptxas a compiled model uses (torch's, tools/ptxas.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

from ..lowering.norm_quant_spec import NormQuantSpec, NormSpec, QuantSpec
from .cuda_graph import capture as capture_graph
from .cuda_graph import FLUSH_MODES, flush_l2
from .ptxas import use_torch_ptxas

HELP = "fused RMSNorm+quant kernels vs stock Inductor"

_FLOOR_TOKEN = 1e-12
_FLOOR_GROUP = 1e-10


def variants() -> dict[str, NormQuantSpec]:
    """The benchmarked variants. The dynamic ones divide by the scale, as the baseline
    spellings (shared/baseline/baseline.py) do; `token_recip` is vLLM's multiply-by-reciprocal."""
    n = NormSpec(eps=1e-6)
    na = NormSpec(eps=1e-6, residual="input_dtype")
    tok = QuantSpec(kind="fp8_per_token", apply="div", floor=_FLOOR_TOKEN)
    g128 = QuantSpec(kind="fp8_per_group", group_size=128, apply="div", floor=_FLOOR_GROUP)
    return {
        "static": NormQuantSpec(n, QuantSpec(kind="fp8_static", apply="div")),
        "token": NormQuantSpec(n, tok),
        "token_recip": NormQuantSpec(n, QuantSpec(kind="fp8_per_token", apply="mul_recip", floor=1 / (448 * 512))),
        "group128": NormQuantSpec(n, g128),
        "group64_col_ue8m0": NormQuantSpec(n, QuantSpec(kind="fp8_per_group", group_size=64, col_major=True,
                                                        ue8m0=True, apply="div", floor=_FLOOR_GROUP)),
        # the two halves of group64_col_ue8m0, to tell their costs apart
        "group64_col": NormQuantSpec(n, QuantSpec(kind="fp8_per_group", group_size=64, col_major=True, apply="div",
                                                  floor=_FLOOR_GROUP)),
        "group128_ue8m0": NormQuantSpec(n, QuantSpec(kind="fp8_per_group", group_size=128, ue8m0=True, apply="div",
                                                     floor=_FLOOR_GROUP)),
        "int8_token": NormQuantSpec(n, QuantSpec(kind="int8_per_token", scale_form="const_div", scale_const=127.0,
                                                 apply="mul", clamp_lo=-128.0, clamp_hi=127.0, floor=1e-5,
                                                 floor_on="amax", out_dtype=torch.int8)),
        "add_static": NormQuantSpec(na, QuantSpec(kind="fp8_static", apply="div")),
        "add_token": NormQuantSpec(na, tok),
        "add_group128": NormQuantSpec(na, g128),
    }


def min_bytes(spec: NormQuantSpec, T: int, H: int) -> int:
    n = T * H
    b = 7 * n if spec.norm.residual != "none" else 3 * n
    if spec.quant.kind == "fp8_per_group":
        b += 4 * n // spec.quant.group_size
    elif spec.quant.dynamic:
        b += 4 * T
    return b


# ------------------------------------------------------------------ timing
class Timer:
    """CUDA-event timing of graph replays.

    `flush` says how L2 is emptied before each `hbm` call (cuda_graph.flush_l2): "read"
    (the default) leaves clean lines, so the timed kernel is charged for its own bytes
    only; "write" leaves up to 50 MB of dirty lines for it to write back, a large share
    of a call that moves tens of MB."""

    def __init__(self, reps: int = 30, flush: str = "read"):
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush must be one of {FLUSH_MODES}, got {flush!r}")
        self.reps = reps
        self.flush_mode = flush
        self.flush = torch.zeros(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
        self._copies: dict[int, float] = {}


    def hbm(self, fn) -> float:
        """Median µs of one call of `fn`, L2 flushed before each call.

        The call is replayed from a CUDA graph: timing `fn()` directly would include the
        host's launch overhead whenever it exceeds the GPU work queued in front of it (a
        Triton launch with ~60 arguments can take 100+ µs of Python; the first H100 run of
        this bench measured that instead of the kernel). A graph replay costs the host
        ~10 µs, hidden behind the flush and a GPU sleep."""
        g = capture_graph(fn, 1)
        times = []
        for _ in range(self.reps):
            flush_l2(self.flush, self.flush_mode)
            torch.cuda._sleep(100_000)
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return statistics.median(times)

    def graph(self, fn, calls: int = 20) -> float:
        """µs per call of `fn`, `calls` of them captured in one CUDA graph (median of replays)."""
        g = capture_graph(fn, calls)
        times = []
        for _ in range(self.reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
        return statistics.median(times)


    def copy_us(self, nbytes: int) -> float:
        """µs of an elementwise bf16 copy (`torch.neg(out=)`) moving `nbytes` (read + write),
        timed as `hbm` times a kernel: the practical limit for a kernel that moves that many
        bytes, fixed costs (launch, ramp-up, tail) included. Cached per size."""
        n = max(1, nbytes // 4)
        if n not in self._copies:
            a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            b = torch.empty_like(a)
            self._copies[n] = self.hbm(lambda: torch.neg(a, out=b))
            del a, b
        return self._copies[n]


def copy_bandwidth(timer: Timer, detail: dict | None = None) -> float:
    """Bytes/s of the faster of two 1 GiB device-to-device copies, L2 flushed: cudaMemcpy
    (`dst.copy_(src)`) and an elementwise kernel reading and writing bf16 (`torch.neg(out=)`).
    Session 1's runs measured only the memcpy, 3.00 TB/s in one and 2.43 TB/s in the next,
    with fused kernels above the latter; the kernel copy is what a fused kernel competes
    with. `detail`, if given, receives both figures."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    memcpy = 2 * 2**30 / (timer.hbm(lambda: y.copy_(x)) * 1e-6)
    a, b = x.view(torch.bfloat16), y.view(torch.bfloat16)
    a.normal_()
    kernel = 2 * 2**30 / (timer.hbm(lambda: torch.neg(a, out=b)) * 1e-6)
    if detail is not None:
        detail.update(copy_memcpy_TBps=round(memcpy / 1e12, 3), copy_kernel_TBps=round(kernel / 1e12, 3))
    return max(memcpy, kernel)


def make_inputs(spec: NormQuantSpec, T: int, H: int, device: str = "cuda"):
    """Random (x, weight, residual, static scale) for `spec`, None where it takes none."""
    x = torch.randn(T, H, device=device, dtype=spec.norm.input_dtype)
    w = torch.randn(H, device=device, dtype=spec.norm.weight_dtype) if spec.norm.weight != "none" else None
    r = torch.randn_like(x) if spec.norm.residual != "none" else None
    s = torch.tensor(0.05, device=device) if spec.quant.kind == "fp8_static" else None
    return x, w, r, s


def _inductor_fn(spec: NormQuantSpec):
    from ..lowering.norm_quant_reference import reference

    def unfused(x, w, r, s):
        return reference(spec, x, w, r, s)

    return torch.compile(unfused, dynamic=False)


def bench_one(timer: Timer, bw: float, name: str, spec: NormQuantSpec, T: int, H: int,
              tuning: dict | None = None, inductor: bool = True) -> dict:
    from ..lowering.norm_quant_triton import launch

    args = make_inputs(spec, T, H)
    small = T <= 256
    measure = timer.graph if small else timer.hbm
    info: dict = {}
    launch(spec, *args, tuning=tuning, info=info)
    if info.get("PERSIST") and info.get("n_regs") is not None:
        # more programs per SM than fit start only as others finish: shown beside the plan
        info["fit"] = _resident(info)
    ours = measure(lambda: launch(spec, *args, tuning=tuning))
    row = dict(variant=name, T=T, H=H, timer="cuda_graph" if small else "l2_flushed",
               triton_us=round(ours, 2), plan=info)
    lim = min_bytes(spec, T, H) / bw * 1e6
    row["limit_us"] = round(lim, 2)
    row["triton_pct_of_limit"] = round(100 * lim / ours, 1)
    if not small:
        same = timer.copy_us(min_bytes(spec, T, H))
        row["copy_same_bytes_us"] = round(same, 2)
        row["triton_pct_of_same_bytes_copy"] = round(100 * same / ours, 1)
    if inductor:
        torch._dynamo.reset()
        cf = _inductor_fn(spec)
        theirs = measure(lambda: cf(*args))
        row["inductor_us"] = round(theirs, 2)
        row["inductor_pct_of_limit"] = round(100 * lim / theirs, 1)
        if not small:
            row["inductor_pct_of_same_bytes_copy"] = round(100 * row["copy_same_bytes_us"] / theirs, 1)
        row["speedup"] = round(theirs / ours, 3)
    return row


DEFAULT_SHAPES = [(T, H) for T in (4096, 16384) for H in (4096, 5120, 7168, 8192)]
SMALL_SHAPES = [(T, 7168) for T in (1, 16, 64, 256)] + [(T, 4096) for T in (1, 16, 64, 256)]
QUICK_SHAPES = [(4096, 4096), (16384, 7168), (16, 7168), (256, 4096)]
# --sweep: tile configs per family (lowering/norm_quant_triton.tuning_key) and hidden size;
# the fastest goes into the tuning table (--write-tuning, shipped as norm_quant_tuning.json)
SWEEP_FAMILIES = {"token": "token", "token+int8": "int8_token", "local": "group128", "local+res": "add_group128",
                  "token+res": "add_token", "local+col": "group64_col", "local+ue8m0": "group128_ue8m0",
                  "local+col+ue8m0": "group64_col_ue8m0", "local+static": "static"}
_TARGET_H = (4096, 5120, 7168, 8192)
# local+col at all four target widths: at 8192 a plan no sweep had timed won by 11 points
# (session 9). A family swept at fewer widths than the table's other entries would borrow,
# at the missing ones, the nearest width's plan of its own family before its parent's
# (`_lookup`), so the qualified families are swept at all four.
SWEEP_H = {"token": _TARGET_H, "token+int8": _TARGET_H, "local": _TARGET_H, "local+res": (4096, 7168),
           "token+res": (4096, 7168), "local+col": _TARGET_H, "local+ue8m0": _TARGET_H, "local+col+ue8m0": _TARGET_H,
           "local+static": _TARGET_H}
SWEEP_SIZES = ("large", "mid", "small")
# PERSIST = programs per SM of the persistent variant (same compiled kernel for any count)
# (the session-1 sweep's winners were CH 1024 / 4 warps and CH 2048 / 8 warps everywhere;
# the persistent variant never won at T = 16384)
SWEEP_LARGE = [{"CH": 1024, "num_warps": 4}, {"CH": 1024, "num_warps": 8}, {"CH": 2048, "num_warps": 8},
               {"CH": 2048, "num_warps": 16}, {"CH": 1024, "num_warps": 4, "PERSIST": 4},
               # persistent with the weight held in registers across a program's rows
               {"CH": 1024, "num_warps": 4, "PERSIST": 2, "WPRE": 1}]
# T = 4096 is a few waves of programs: ramp-up and the last wave weigh more, so smaller and
# larger programs, several rows per program (col-major scales: the scales of consecutive rows
# are adjacent) and persistent loops all get a chance
SWEEP_MID = SWEEP_LARGE + [
    {"CH": 512, "num_warps": 2}, {"CH": 512, "num_warps": 4}, {"CH": 1024, "num_warps": 2},
    {"CH": 2048, "num_warps": 4}, {"CH": 4096, "num_warps": 8}, {"CH": 4096, "num_warps": 16},
    {"CH": 1024, "num_warps": 4, "PERSIST": 2}, {"CH": 1024, "num_warps": 4, "PERSIST": 8},
    {"CH": 2048, "num_warps": 8, "PERSIST": 2}, {"CH": 2048, "num_warps": 8, "PERSIST": 4},
    {"CH": 1024, "num_warps": 4, "WPRE": 1}, {"CH": 2048, "num_warps": 8, "WPRE": 1},
    {"CH": 1024, "num_warps": 8, "ROWS": 2}, {"CH": 512, "num_warps": 4, "ROWS": 4},
    {"CH": 512, "num_warps": 8, "ROWS": 8},
    {"CH": 2048, "num_warps": 4, "PERSIST": 4, "WPRE": 1}, {"CH": 512, "num_warps": 4, "PERSIST": 8, "WPRE": 1},
    {"CH": 1024, "num_warps": 4, "PERSIST": 8, "WPRE": 1},
    # software-pipelined persistent loops (PIPE stages: PIPE - 1 rows in flight through shared
    # memory per program), as many programs per SM as fit ("fit": resolved per shape from the
    # compiled kernel's registers and shared memory). Session 7 timed 8 such plans per shape:
    # all lost, by 1-14% (docs/benchmarks.md); the two best stayed, and the first has won at
    # H = 7168 for group64_col since session 9 and for group128 since session 11
    {"CH": 1024, "num_warps": 4, "PERSIST": "fit", "PIPE": 3, "WPRE": 1},
    {"CH": 2048, "num_warps": 8, "PERSIST": "fit", "PIPE": 3, "WPRE": 1},
]
# Column-major group scales: programs of SEQ consecutive rows, which store each group's
# scales of their rows as one SEQ * 4-byte piece (session 11: group 64 runs 5-11 points
# slower with column-major scales than with row-major ones at T = 4096). Registers: SEQ
# scales per chunk are held on top of the prefetched row (127 per thread for CH 2048 with
# 4 warps at H = 4096, 243 for CH 1024 at 7168; sm_90, triton 3.6), so wider programs too.
# Session 12: SEQ 8 won at H = 4096 and 8192; SEQ with a pipelined loop lost everywhere, and
# at 5120 and 7168 the persistent plans won, so persistent programs over short runs too.
# Session 13: persistent runs of 8 rows (CH 1024) won 5120, runs of 4 (CH 2048) 7168 and 8192
SWEEP_MID_COL = [
    {"CH": 2048, "num_warps": 4, "SEQ": 8, "WPRE": 1}, {"CH": 2048, "num_warps": 4, "SEQ": 4, "WPRE": 1},
    {"CH": 2048, "num_warps": 8, "SEQ": 8, "WPRE": 1}, {"CH": 4096, "num_warps": 8, "SEQ": 8},
    {"CH": 1024, "num_warps": 4, "SEQ": 8, "WPRE": 1}, {"CH": 2048, "num_warps": 4, "SEQ": 16, "WPRE": 1},
    {"CH": 1024, "num_warps": 4, "SEQ": 4, "WPRE": 1}, {"CH": 2048, "num_warps": 4, "SEQ": 8},
    {"CH": 2048, "num_warps": 8, "SEQ": 16, "WPRE": 1},
    {"CH": 2048, "num_warps": 4, "PERSIST": "fit", "SEQ": 2, "WPRE": 1},
    {"CH": 2048, "num_warps": 4, "PERSIST": "fit", "SEQ": 4, "WPRE": 1},
    {"CH": 1024, "num_warps": 4, "PERSIST": "fit", "SEQ": 2, "WPRE": 1},
    # CH 1024 over longer runs: 119-128 registers at H = 5120 and 7168 (4 programs of 4
    # warps per SM; CH 2048 with SEQ takes 149 at 5120)
    {"CH": 1024, "num_warps": 4, "PERSIST": "fit", "SEQ": 4, "WPRE": 1},
    {"CH": 1024, "num_warps": 4, "PERSIST": "fit", "SEQ": 8, "WPRE": 1},
    {"CH": 1024, "num_warps": 4, "PERSIST": "fit", "SEQ": 4},
]
SWEEP_SMALL_H = (4096, 7168)  # the table's lookup takes the nearest measured H
SWEEP_SMALL = [{"CH": 1024, "num_warps": 4}, {"CH": 1024, "num_warps": 8}, {"CH": 1024, "num_warps": 16},
               {"CH": 2048, "num_warps": 8}, {"CH": 2048, "num_warps": 16}]
SWEEP_AT = {"large": (16384, SWEEP_LARGE), "mid": (4096, SWEEP_MID), "small": (64, SWEEP_SMALL)}


def sweep_shapes(families: list[str], sizes: tuple[str, ...], hidden: list[int] | None = None):
    """(family, variant, size class, T, H, plans) of each shape a sweep times, in its order."""
    for fam in families:
        for size in sizes:
            T, cfgs = SWEEP_AT[size]
            if size == "mid" and "+col" in fam:
                cfgs = cfgs + SWEEP_MID_COL
            for H in hidden or (SWEEP_SMALL_H if size == "small" else SWEEP_H[fam]):
                yield fam, SWEEP_FAMILIES[fam], size, T, H, [{"ROWS": 1, **c} for c in cfgs]


def _compile_job(job) -> str | None:
    """Pool worker: compile (and run once) one sweep plan; None, or why it failed."""
    name, T, H, cfg = job
    from ..lowering.norm_quant_triton import launch

    try:
        spec = variants()[name]
        launch(spec, *make_inputs(spec, T, H), tuning=cfg)
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def compile_jobs(shapes: list) -> list[tuple]:
    """(variant, T, H, plan) of each distinct kernel compile of the sweep `shapes` (programs per
    SM change the grid, not the kernel: every persistent plan compiles as PERSIST 1)."""
    jobs = {(name, T, H, json.dumps(dict(c, PERSIST=1) if c.get("PERSIST") else c, sort_keys=True))
            for _, name, _, T, H, cfgs in shapes for c in cfgs}
    return [(name, T, H, json.loads(c)) for name, T, H, c in sorted(jobs)]


def precompile(shapes: list, workers: int) -> None:
    """Compile every plan of the sweep in `workers` processes first, so the timing loop finds
    them in Triton's on-disk cache: one process compiles the ~30 plans of a shape one after
    another (seconds each), which is most of a sweep's time on a device lent by the minute.
    Workers inherit the environment, so the ptxas chosen for the sweep (see `sweep`) too."""
    import multiprocessing

    jobs = compile_jobs(shapes)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        failed = [(j, e) for j, e in zip(jobs, pool.map(_compile_job, jobs)) if e]
    print(f"precompiled {len(jobs)} plans in {workers} processes; {len(failed)} failed", flush=True)
    for job, err in failed:  # the timing loop reports them again, and skips them
        print(f"  {job}: {err}", flush=True)


def sweep(timer: Timer, bw: float, families: list[str], out_path: str | None, env: dict,
          hidden: list[int] | None = None, sizes: tuple[str, ...] = SWEEP_SIZES,
          compile_workers: int = 0) -> list[dict]:
    """Time each tile config per family, hidden size and size class; with `out_path`, the
    fastest go into that tuning table. Entries of an existing table that this sweep did not
    measure are kept, so one size class or hidden size can be re-swept on its own.

    The plans are assembled by torch's ptxas, as in a compiled model (`main` sets it first,
    tools/ptxas.py; the compile workers inherit it)."""
    vs = variants()
    shapes = list(sweep_shapes(families, sizes, hidden))
    if compile_workers > 0:
        precompile(shapes, compile_workers)
    rows = []
    doc = _read_tuning(out_path) if out_path else {}
    table = doc.setdefault("configs", {})

    def best_of(fam, name, T, H, cfgs):
        best = None
        for cfg in cfgs:
            cfg = dict(cfg)
            if cfg.get("PERSIST") == "fit":
                cfg["PERSIST"] = programs_that_fit(vs[name], T, H, cfg)
            try:
                row = bench_one(timer, bw, name, vs[name], T, H, cfg, inductor=False)
            except Exception as exc:  # a config that does not compile is a result, not a crash
                print(f"{name} T={T} H={H} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            row["family"] = fam
            rows.append(row)
            _print_table([row])
            if best is None or row["triton_us"] < best[0]:
                best = (row["triton_us"], cfg)
        return best

    for fam in families:
        for _, name, size, T, H, cfgs in (s for s in shapes if s[0] == fam):
            best = best_of(fam, name, T, H, cfgs)
            if best:
                table[f"{fam}/{H}/{size}"] = dict(best[1], us=best[0], measured_at=f"T={T}",
                                                  run=env.get("date"), l2_flush=env.get("l2_flush"))
        if out_path:  # written after each family, so a cut-off sweep still leaves a table
            doc["environment"] = env
            with open(out_path, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
    return rows


def _read_tuning(path: str) -> dict:
    """The tuning table a sweep writes into: the existing one, whose other keys (its "about",
    earlier runs' environments) and entries it keeps, or a new one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {"about": "tile plans measured by `fusewright bench norm-quant --sweep`; "
                         "keys: family/hidden/size (lowering/norm_quant_triton.tuning_key)"}
    if not isinstance(doc, dict) or not isinstance(doc.get("configs", {}), dict):
        raise ValueError(f"{path}: not a tuning table (a JSON object whose 'configs' maps family/hidden/size "
                         "keys to plans)")
    return doc


def _resident(info: dict) -> int:
    """Programs of a launched kernel (`launch`'s `info`) that fit on one SM of this GPU."""
    from .kernel_aot import resident_programs

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    res = dict(regs=info["n_regs"], shared=info["shared"], num_warps=info["num_warps"])
    # the SM's limits as torch reports them; one it does not report keeps resident_programs'
    # H100 default
    limits = {arg: getattr(props, attr) for arg, attr in (
        ("regs_per_sm", "regs_per_multiprocessor"), ("smem_per_sm", "shared_memory_per_multiprocessor"),
        ("threads_per_sm", "max_threads_per_multi_processor")) if hasattr(props, attr)}
    return resident_programs(res, **limits)


def programs_that_fit(spec: NormQuantSpec, T: int, H: int, cfg: dict) -> int:
    """Programs per SM of the persistent plan `cfg` that can be resident at once on this GPU
    (at least 1): its kernel compiled, its registers and shared memory against the SM's."""
    from ..lowering.norm_quant_triton import launch

    info: dict = {}
    launch(spec, *make_inputs(spec, T, H), tuning=dict(cfg, PERSIST=1), info=info)
    return max(1, _resident(info))


def _print_table(rows: list[dict]) -> None:
    hdr = (f"{'variant':20s} {'T':>6s} {'H':>5s} {'triton us':>10s} {'%lim':>6s} {'%copy':>6s} "
           f"{'inductor us':>12s} {'%lim':>6s} {'speedup':>8s}  plan")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        p = r.get("plan", {})
        ptxt = f"CH{p.get('CH')}x{p.get('NCH')} R{p.get('ROWS')} w{p.get('num_warps')} regs{p.get('n_regs')} spill{p.get('n_spills')}"
        if p.get("PERSIST"):
            ptxt += f" persist{p['PERSIST']}" + (f"(fit {p['fit']})" if "fit" in p else "") + \
                (f" pipe{p['PIPE']}" if p.get("PIPE") else "")
        if p.get("SEQ"):
            ptxt += f" seq{p['SEQ']}"
        if p.get("WPRE"):
            ptxt += " wpre"
        print(f"{r['variant']:20s} {r['T']:6d} {r['H']:5d} {r['triton_us']:10.2f} {r['triton_pct_of_limit']:6.1f} "
              f"{r.get('triton_pct_of_same_bytes_copy', float('nan')):6.1f} "
              f"{r.get('inductor_us', float('nan')):12.2f} {r.get('inductor_pct_of_limit', float('nan')):6.1f} "
              f"{r.get('speedup', float('nan')):8.3f}  {ptxt}", flush=True)


def environment(bw: float) -> dict:
    import triton

    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                copy_bandwidth_TBps=round(bw / 1e12, 3), ptxas=use_torch_ptxas())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(variants()))
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--flush", choices=FLUSH_MODES, default="read",
                        help="how L2 is emptied before each large-T call: read a 256 MB buffer "
                             "(default: L2 left clean) or write it (L2 left dirty, as do_bench does)")
    parser.add_argument("--small", action="store_true", help="also token counts 1..256 under CUDA graphs")
    parser.add_argument("--sweep", action="store_true", help="tile configs per family and H (timed without Inductor)")
    parser.add_argument("--families", default="token,local,local+res", help="--sweep: families to tune")
    parser.add_argument("--sweep-hidden", default=None,
                        help="--sweep: comma-separated hidden sizes instead of the default ones (e.g. 1536)")
    parser.add_argument("--sweep-sizes", default=",".join(SWEEP_SIZES),
                        help="--sweep: size classes to tune (large: T=16384, mid: T=4096, small: T=64)")
    parser.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="--sweep: processes that compile the plans before the timing loop (0: none; "
                             "default %(default)s)")
    parser.add_argument("--write-tuning", metavar="PATH",
                        help="--sweep: write the best plans into this tuning table (entries not swept are kept)")
    parser.add_argument("--shapes", default=None, help="TxH,TxH,... instead of the default shapes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="write environment and rows as JSON")
    parser.add_argument("--write-choice", metavar="PATH", nargs="+",
                        help="turn bench JSON files (--json output) into the `auto` table "
                             "(lowering/norm_quant_auto.json format) and exit")


def choice_rows(rows: list[dict], env: dict) -> list[dict]:
    """`auto` table rows (lowering/norm_quant_choice.py) from bench rows with an Inductor time."""
    from ..lowering.norm_quant_choice import family

    specs = variants()
    out = []
    for r in rows:
        if "inductor_us" not in r or r["variant"] not in specs:
            continue
        out.append(dict(device=env["device"], family=family(specs[r["variant"]]), variant=r["variant"], T=r["T"],
                        H=r["H"], triton_us=r["triton_us"], inductor_us=r["inductor_us"], timer=r["timer"],
                        torch=env["torch"], triton=env["triton"], date=env["date"]))
    return out


def write_choice(inputs: list[str], out_path: str) -> int:
    by_key: dict = {}  # a shape measured again in a later file replaces the earlier row
    for path in inputs:
        with open(path) as f:
            data = json.load(f)
        # a bench JSON (rows + environment), or a choice table written earlier (rows only)
        rows = choice_rows(data["rows"], data["environment"]) if "environment" in data else data["rows"]
        for r in rows:
            by_key[(r["device"], r["variant"], r["T"], r["H"])] = r
    rows = list(by_key.values())
    table = {"about": "rows for `auto` (lowering/norm_quant_choice.py): Triton kernel vs stock Inductor on the "
                      "unfused graph, same run; written by `fusewright bench norm-quant --write-choice` "
                      "(later input files replace rows of the same device, variant and shape)",
             "rows": rows}
    with open(out_path, "w") as f:
        json.dump(table, f, indent=1)
    print(f"{len(rows)} rows -> {out_path}")
    return 0


def main(args: argparse.Namespace, config=None) -> int:
    if getattr(args, "write_choice", None):
        *inputs, out_path = args.write_choice
        if not inputs:
            print("--write-choice needs bench JSON files and an output path", file=sys.stderr)
            return 2
        return write_choice(inputs, out_path)
    if args.sweep:
        bad = [f for f in args.families.split(",") if f not in SWEEP_FAMILIES] + \
              [z for z in args.sweep_sizes.split(",") if z not in SWEEP_AT]
        if bad:
            print(f"fusewright bench norm-quant: unknown --families / --sweep-sizes {bad}; families: "
                  f"{', '.join(SWEEP_FAMILIES)}; sizes: {', '.join(SWEEP_AT)}", file=sys.stderr)
            return 2
    if not torch.cuda.is_available():
        print("fusewright bench norm-quant: needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    vs = variants()
    names = args.variants.split(",") if args.variants else list(vs)
    unknown = [n for n in names if n not in vs]
    if unknown:
        print(f"unknown variants {unknown}; available: {', '.join(vs)}", file=sys.stderr)
        return 2
    use_torch_ptxas()  # before the first Triton compile of the process (tools/ptxas.py)
    timer = Timer(args.reps, flush=args.flush)
    copies: dict = {}
    bw = copy_bandwidth(timer, copies)
    env = dict(environment(bw), l2_flush=timer.flush_mode, **copies)
    print(json.dumps(env), flush=True)
    rows = []
    if args.sweep:
        hidden = [int(h) for h in args.sweep_hidden.split(",")] if args.sweep_hidden else None
        rows = sweep(timer, bw, args.families.split(","), args.write_tuning, env, hidden,
                     tuple(args.sweep_sizes.split(",")), args.compile_workers)
    else:
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        else:
            shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES + (SMALL_SHAPES if args.small else [])
        for name in names:
            for T, H in shapes:
                rows.append(bench_one(timer, bw, name, vs[name], T, H))
                _print_table(rows[-1:])
                if args.json:  # rows as they come: a cut-off run keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))

"""Every Triton kernel of lowering/ compiles for an H100 (sm_90), on a machine without a GPU.

The interpreter tests check the kernels' arithmetic on CPU but never compile them; the GPU
tests compile them only where there is a GPU, which CI has not. Here the real launch code
runs with CPU tensors under `tools.kernel_aot.compile_only`, so each kernel is compiled by
Triton's CUDA backend (and assembled by its ptxas) with the constexprs and plans a GPU run
would use - the shipped tuning plans, each norm-quant plan shape (one program per ROWS rows,
register-prefetch persistent, software-pipelined persistent) and the act-quant row
layouts. The compiled kernels are then checked for what the plans rely on: no register
spills, and asynchronous copies exactly where a plan asks for a pipelined loop.

Runs in a subprocess (the stand-in driver must not leak into other tests); skipped, with
the reason, where this Triton has no CUDA backend that can compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (variant, H, rows, plan override or None for the shipped plan): the norm-quant cases
_NQ_PIPE = (
    ("token", 8192, 4096, {"ROWS": 1, "CH": 1024, "num_warps": 4, "PERSIST": 2, "PIPE": 3}),
    ("static", 5120, 4096, {"ROWS": 1, "CH": 1024, "num_warps": 8, "PERSIST": 1, "PIPE": 3}),
    ("group64_col_ue8m0", 4096, 4096, {"ROWS": 1, "CH": 2048, "num_warps": 8, "PERSIST": 2, "PIPE": 2, "WPRE": 1}),
    ("add_group128", 4096, 4096, {"ROWS": 1, "CH": 1024, "num_warps": 8, "PERSIST": 1, "PIPE": 3}),
)
_NQ_OTHER = (
    ("token", 7168, 4096, {"ROWS": 1, "CH": 1024, "num_warps": 4, "PERSIST": 2}),  # register prefetch
    ("token", 2880, 4096, None),  # masked last chunk
    ("token", 7168, 64, None), ("group128", 7168, 64, None),  # small-T plans
    ("token", 512, 4096, None),  # several rows per program
    # programs of SEQ consecutive rows, column-major group scales stored once per program
    ("group64_col", 4096, 4096, {"ROWS": 1, "CH": 2048, "num_warps": 4, "SEQ": 8, "WPRE": 1}),
    ("group64_col_ue8m0", 5120, 4099, {"ROWS": 1, "CH": 2048, "num_warps": 8, "SEQ": 8, "WPRE": 1}),
    ("group64_col", 7168, 4099, {"ROWS": 1, "CH": 1024, "num_warps": 4, "SEQ": 2, "PERSIST": 4, "WPRE": 1}),
)


def _nq_cases():
    from fusewright.tools.bench_norm_quant import variants

    cases = [(name, 7168, rows, None) for name in variants() for rows in (4096, 16384)]
    return cases + list(_NQ_OTHER) + list(_NQ_PIPE)


def _worker() -> dict:
    """Compile every case; report each one's resources or its error."""
    import triton
    import triton.language as tl

    from fusewright.lowering import act_quant_triton, norm_quant_triton, rms_norm_triton, rope_triton
    from fusewright.tools.bench_act_quant import variants as act_variants
    from fusewright.tools.bench_norm_quant import make_inputs
    from fusewright.tools.bench_norm_quant import variants as nq_variants
    from fusewright.tools.kernel_aot import CompileOnly, compile_only, resources

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(x_ptr + o, tl.load(x_ptr + o) + 1.0)

    out: dict = {"triton": triton.__version__, "cases": {}}
    with compile_only(arch=90):
        try:
            probe = CompileOnly(_probe)
            probe[(1,)](torch.zeros(128), BLOCK=128)
            resources(probe.last)
        except Exception as exc:  # no CUDA backend or no ptxas in this triton: nothing to check
            out["skip"] = f"triton {triton.__version__} cannot compile for sm_90 here: {type(exc).__name__}: {exc}"
            return out

        def record(key, kernel, run):
            try:
                run()
                out["cases"][key] = resources(kernel.last)
            except Exception as exc:
                out["cases"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}

        nq = CompileOnly(norm_quant_triton._rms_norm_quant_kernel)
        norm_quant_triton._rms_norm_quant_kernel = nq
        nvs = nq_variants()
        for name, hidden, rows, tuning in _nq_cases():
            spec = nvs[name]
            torch.manual_seed(0)
            args = make_inputs(spec, rows, hidden, device="cpu")
            record(f"nq:{name}:{hidden}:{rows}:{json.dumps(tuning)}", nq,
                   lambda: norm_quant_triton.launch(spec, *args, tuning=tuning))

        aq = CompileOnly(act_quant_triton._act_quant_kernel)
        act_quant_triton._act_quant_kernel = aq
        avs = act_variants()
        # the default plan of each row layout: split into pieces (14336), one tile (4096),
        # one tile with h held in bf16 (18432); identity rows are one tile
        for name in ("silu_mul_token", "silu_mul_group128_col", "token"):
            spec = avs[name].spec
            for width in (4096, 14336, 18432):
                x = torch.randn(4096, width, dtype=torch.bfloat16)
                up = torch.randn_like(x) if spec.prologue == "silu_mul" else None
                record(f"aq:{name}:{width}", aq, lambda: act_quant_triton.launch(spec, x, up))
        # per-token int8 (its one-instruction conversion) in the split and the one-tile layouts
        from fusewright.lowering.act_quant_spec import ActQuantSpec
        from fusewright.lowering.norm_quant_spec import QuantSpec

        int8 = ActQuantSpec("silu_mul", torch.bfloat16, QuantSpec(
            kind="int8_per_token", out_dtype=torch.int8, scale_const=127.0, clamp_lo=-128.0, clamp_hi=127.0,
            apply="div", floor=1e-5), act_dtype=torch.bfloat16, h_dtype=torch.bfloat16)
        for width in (4096, 14336):
            x = torch.randn(4096, width, dtype=torch.bfloat16)
            record(f"aq:int8:{width}", aq, lambda: act_quant_triton.launch(int8, x, torch.randn_like(x)))

        rn = CompileOnly(rms_norm_triton.rms_norm_kernel)
        for hidden, res in ((4096, False), (7168, True)):
            x = torch.randn(4096, hidden, dtype=torch.bfloat16)
            r = torch.randn_like(x) if res else None
            record(f"rms_norm:{hidden}:res{int(res)}", rn,
                   lambda: rms_norm_triton.launch(rn, x, r, torch.randn(hidden, dtype=torch.bfloat16),
                                                  torch.empty_like(x), torch.empty_like(x) if res else None, 1e-6))

        rp = CompileOnly(rope_triton.rope_kernel)
        for interleaved in (False, True):
            q = torch.randn(1, 4096, 32, 128, dtype=torch.bfloat16)
            k = torch.randn(1, 4096, 8, 128, dtype=torch.bfloat16)
            cos = torch.randn(1, 4096, 1, 64, dtype=torch.bfloat16)
            record(f"rope:interleaved{int(interleaved)}", rp,
                   lambda: rope_triton.launch(rp, q, torch.empty_like(q), k, torch.empty_like(k),
                                              cos.expand(1, 4096, 32, 64), cos.expand(1, 4096, 32, 64),
                                              interleaved=interleaved))
    return out


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-worker"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["cases"]


def test_every_case_compiles_for_sm90(compiled):
    errors = {k: v["error"] for k, v in compiled.items() if "error" in v}
    assert not errors, json.dumps(errors, indent=1)[:6000]
    # each kernel family is there
    for prefix in ("nq:", "aq:", "rms_norm:", "rope:"):
        assert any(k.startswith(prefix) for k in compiled), prefix


def test_no_register_spills(compiled):
    spills = {k: v for k, v in compiled.items() if "error" not in v and (v.get("local") or v.get("stack"))}
    assert all("regs" in v for v in compiled.values() if "error" not in v), "cuobjdump gave no resource usage"
    assert not spills, json.dumps(spills, indent=1)[:4000]


def test_pipelined_plans_issue_async_copies_and_others_do_not(compiled):
    """A PIPE plan's loads go through shared memory by cp.async (the software pipeliner
    took the loop); a plan without PIPE issues none (its loads stay register loads). The
    shipped plans (tuning None) are judged by what the tuning table gives them."""
    from fusewright.lowering.norm_quant_plan import plan
    from fusewright.tools.bench_norm_quant import variants

    vs, pipelined = variants(), 0
    for name, hidden, rows, tuning in _nq_cases():
        res = compiled[f"nq:{name}:{hidden}:{rows}:{json.dumps(tuning)}"]
        stages = plan(vs[name], hidden, tuning, rows)["PIPE"]
        if stages:
            pipelined += 1
            row_bytes = hidden * 2 * (2 if name.startswith("add_") else 1)
            assert res["cp_async"] > 0, (name, tuning, res)
            # at least the PIPE - 1 rows in flight are buffered in shared memory
            assert res["shared"] >= (stages - 1) * row_bytes, (name, tuning, res)
        else:
            assert res.get("cp_async") == 0, (name, hidden, rows, tuning, res)
    assert pipelined >= len(_NQ_PIPE)


def test_fp8_conversions_saturate(compiled):
    """The norm-quant kernel drops its clamp to +-448 on the GPU because the f32 -> e4m3
    conversion saturates (`cvt.rn.satfinite`): every fp8 case must convert only that way."""
    fp8 = {k: v for k, v in compiled.items() if k.startswith("nq:") and "int8" not in k and "error" not in v}
    assert fp8
    bad = {k: (v["cvt_e4m3"], v["cvt_e4m3_satfinite"]) for k, v in fp8.items()
           if not v["cvt_e4m3"] or v["cvt_e4m3"] != v["cvt_e4m3_satfinite"]}
    assert not bad, bad


def test_int8_conversions_saturate_in_one_instruction(compiled):
    """int8 with the int8 range as its clamp converts with `cvt.rni.sat.s8.f32` (rounding,
    clamp and conversion in one), never by a truncating conversion after rint and a clamp."""
    int8 = {k: v for k, v in compiled.items() if k.startswith(("nq:int8", "aq:int8")) and "error" not in v}
    assert any(k.startswith("nq:") for k in int8) and any(k.startswith("aq:") for k in int8)
    bad = {k: (v["cvt_s8_rni_sat"], v["cvt_rzi_int"]) for k, v in int8.items()
           if not v["cvt_s8_rni_sat"] or v["cvt_rzi_int"]}
    assert not bad, bad


def test_int8_rows_in_range_round_with_an_uncontracted_add(compiled):
    """The norm-quant int8 kernels (exact mode, int8 range) also have the in-range conversion:
    rint as RN(t + 1.5 * 2^23) by `add.rn`, the constant used nowhere else (a plain add would
    be contracted with the multiply by the scale into one fma: one rounding, not two)."""
    int8 = {k: v for k, v in compiled.items() if k.startswith("nq:int8") and "error" not in v}
    assert int8
    bad = {k: (v["rint_add_rn"], v["rint_magic"]) for k, v in int8.items()
           if not v["rint_add_rn"] or v["rint_add_rn"] != v["rint_magic"]}
    assert not bad, bad


def test_resident_programs_counts_the_scarcest_resource():
    from fusewright.tools.kernel_aot import resident_programs

    # registers: 168 per thread x 128 threads, allocated per warp in units of 256 -> 3 per SM
    assert resident_programs(dict(regs=168, shared=16, num_warps=4)) == 3
    # 169 registers round up to 5632 per warp: 11 warps fit, 2 programs of 4
    assert resident_programs(dict(regs=169, shared=16, num_warps=4)) == 2
    # shared memory: 96 KB (+1 KB reserved) per program -> 2 of H100's 228 KB
    assert resident_programs(dict(regs=40, shared=98336, num_warps=8)) == 2
    # threads: 16 warps of few registers -> 4 programs of 512 threads
    assert resident_programs(dict(regs=24, shared=0, num_warps=16)) == 4
    # another GPU's limits (an SM with 100 KB of shared memory)
    assert resident_programs(dict(regs=40, shared=49184, num_warps=4), smem_per_sm=102400) == 2


def test_group_scales_are_stored_without_a_layout_conversion(compiled):
    """The per-group kinds store their scales from the registers the group reduction left
    them in (`_store_scales`): a tl.store would have Triton convert them to a layout of its
    own through shared memory, a barrier pair per chunk (up to 5% of the time at T = 4096 on
    an H100, docs/benchmarks.md session 11). No per-group case may keep a conversion. SEQ
    programs are left out: they store their blocks of scales with a tl.store after their
    loop, and how many conversions their loop-carried blocks take depends on the Triton
    version (2 with 3.6, 11 with 3.9 for group64_col at H = 4096)."""
    group = {k: v for k, v in compiled.items()
             if k.startswith("nq:") and "group" in k and '"SEQ"' not in k and "error" not in v}
    assert len(group) >= 10
    bad = {k: v["layout_converts"] for k, v in group.items() if v["layout_converts"]}
    assert not bad, bad


if __name__ == "__main__" and "--compile-worker" in sys.argv:
    print(json.dumps(_worker()))

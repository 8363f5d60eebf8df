"""The fused RMSNorm -> quant Triton kernels on the GPU (`gpu` marker; skipped without CUDA):
the spec matrix of tests/test_norm_quant_triton.py at real hidden sizes, bitwise against
the reference (see that module's docstring for the grid inputs and the rsqrt), plus
random data, special values, negative scales, dynamic token counts under CUDA graphs, the
shipped and other plans."""

from __future__ import annotations


import pytest
import torch

from fusewright.lowering.norm_quant_reference import reference
from fusewright.lowering.norm_quant_spec import NormQuantSpec, NormSpec

from norm_quant_kernel_helpers import (  # tests/, on sys.path by tests/conftest.py
    _CORE, _EDGE_SCALE_SPECS, _NEGATIVE_SCALES, BF16, _check_scale_edges, _check_negative_scale, _q, grid_inputs,
    mismatches, reference_cr, spec_matrix,
)


# ------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu
_GPU_SHAPES = ((1, 4096), (7, 7168), (333, 5120), (130, 2880), (67, 8192), (1000, 4096), (33, 128), (5, 3, 1536),
               (1500, 7168), (2100, 4096))  # the last two take the large-M plans (persistent ones included)


def _gpu_launch():
    from fusewright.lowering.norm_quant_triton import launch

    return launch


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in _CORE],
                         ids=[c[0] for c in spec_matrix() if c[0] in _CORE])
def test_gpu_shapes_bitwise(name, spec):
    """The core specs over every hidden size and token counts that are not multiples of anything."""
    _check_shapes(spec, _GPU_SHAPES)


def _check_shapes(spec, shapes):
    launch = _gpu_launch()
    fails = {}
    for shape in shapes:
        if spec.quant.kind == "fp8_per_group" and shape[-1] % spec.quant.group_size:
            continue
        x, w, r, s = grid_inputs(spec, shape, device="cuda")
        errs = mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))
        if errs:
            fails[str(shape)] = errs
    assert not fails, fails


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in (
    "token-none", "g128-input_dtype", "static-none", "int8-none", "g64_col_ue8m0-none")])
def test_gpu_special_values(name, spec):
    """inf and NaN inputs, values past the fp8 range: propagated / saturated as the reference."""
    launch = _gpu_launch()
    x, w, r, s = grid_inputs(spec, (9, 4096), device="cuda")
    x[3, 5] = float("inf")
    x[4, 100] = float("nan")
    x[5, 7] = float("-inf")
    x[6] = 16384.0  # large but a power of two: the row's sum of squares stays exact
    errs = mismatches(launch(spec, x, w, r, s), reference_cr(spec, x, w, r, s))
    assert not errs, errs


@gpu
@pytest.mark.parametrize("name,spec", _EDGE_SCALE_SPECS.items(), ids=list(_EDGE_SCALE_SPECS))
def test_gpu_scale_edges(name, spec):
    """Groups whose amax is inf next to finite ones (an inf and a huge weight): the per-group
    division without a select divides them by 0 instead of inf (`_finite_group_division`);
    int8 rows past the clamp or with inf or NaN take the saturating conversion, the others
    the in-range one."""
    errs = _check_scale_edges(_gpu_launch(), spec, (67, 7168), "cuda")
    assert not errs, errs


@gpu
def test_gpu_int8_in_range_conversion_exhaustive():
    """`_to_s8_rint_inrange` (add.rn of 1.5 * 2^23, low bytes packed) against torch.round on
    every f32 of magnitude in [2^-24, 127.5), both signs (5.2e8 values)."""
    import triton
    import triton.language as tl

    from fusewright.lowering.norm_quant_triton_math import _to_s8_rint_inrange

    @triton.jit
    def _cv(x_ptr, o_ptr, N, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < N
        tl.store(o_ptr + o, _to_s8_rint_inrange(tl.load(x_ptr + o, mask=m, other=0.0), False), mask=m)

    lo = torch.tensor(2.0 ** -24).view(torch.int32).item()
    hi = torch.tensor(127.5).view(torch.int32).item()
    bad, n = 0, 0
    for start in range(lo, hi, 1 << 26):
        b = torch.arange(start, min(hi, start + (1 << 26)), device="cuda", dtype=torch.int32)
        for sign in (0, -2 ** 31):
            x = (b + sign).view(torch.float32)
            out = torch.empty(x.numel(), dtype=torch.int8, device="cuda")
            _cv[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
            bad += int((out != torch.round(x).to(torch.int8)).sum())
            n += x.numel()
    assert n > 5e8 and bad == 0, (n, bad)


@gpu
@pytest.mark.parametrize("name", sorted(_NEGATIVE_SCALES))
def test_gpu_negative_scales(name):
    """Negative scales take the general division (a run-time test for the static scale)."""
    errs = _check_negative_scale(_gpu_launch(), _NEGATIVE_SCALES[name], (67, 7168), "cuda")
    assert not errs, errs


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in ("token-none", "g128-none", "fast-token_div")])
def test_gpu_random_data_within_one_step(name, spec):
    """Random data (inexact sums) against the unpatched reference: the order of the mean's sum
    and eager's rsqrt may move a value by one quantization step, never more, rarely."""
    launch = _gpu_launch()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 7168, generator=g).to(BF16)
    w = torch.randn(7168, generator=g).to(BF16)
    got = launch(spec, x.cuda(), w.cuda())
    ref = reference(spec, x, w)
    qa, qb = got[0].cpu().float(), ref[0].float()
    sa, sb = got[1].cpu(), ref[1]
    # a one-ulp rstd difference can flip the bf16 rounding of a row's largest element
    assert (sa == sb).float().mean() > 0.99
    assert torch.allclose(sa, sb, rtol=2.0 ** -7, atol=0)
    step = (qb.abs() * 2.0 ** -3).clamp(min=2.0 ** -9)
    assert ((qa - qb).abs() <= step * 1.001).all()
    assert (qa != qb).float().mean() < 1e-3


@gpu
def test_gpu_cuda_graph_dynamic_tokens_one_launch():
    """No host sync and no data-dependent allocation: capture, replay with new data; one kernel."""
    launch = _gpu_launch()
    spec = NormQuantSpec(NormSpec(eps=1e-6, residual="input_dtype"), _q("g128"))
    for T in (1, 16, 257):
        x, w, r, s = grid_inputs(spec, (T, 7168), device="cuda")
        launch(spec, x, w, r)  # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = launch(spec, x, w, r)
        x2, _, r2, _ = grid_inputs(spec, (T, 7168), device="cuda", seed=5)
        x.copy_(x2)
        r.copy_(r2)
        g.replay()
        torch.cuda.synchronize()
        assert not mismatches(outs, reference_cr(spec, x, w, r, None))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        launch(spec, x, w, r)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


@gpu
def test_gpu_op_uses_the_kernel():
    from fusewright.lowering import norm_quant_ops

    spec = NormQuantSpec(NormSpec(eps=1e-6), _q("token"))
    assert norm_quant_ops._triton_launch() is not None
    x, w, r, s = grid_inputs(spec, (64, 4096), device="cuda")
    outs = norm_quant_ops.call(spec, x, w)
    assert not mismatches(outs, reference_cr(spec, x, w, r, s))


_PLANS = ({"PERSIST": 2, "WPRE": 1, "ROWS": 1, "CH": 1024, "num_warps": 4},
          {"PERSIST": 8, "WPRE": 1, "ROWS": 1, "CH": 512, "num_warps": 4},
          {"PERSIST": 4, "WPRE": 1, "ROWS": 1, "CH": 2048, "num_warps": 4},
          {"PERSIST": 0, "WPRE": 1, "ROWS": 1, "CH": 1024, "num_warps": 8},
          # software-pipelined persistent loops: rows in flight through shared memory
          {"PERSIST": 2, "PIPE": 3, "ROWS": 1, "CH": 1024, "num_warps": 4},
          {"PERSIST": 1, "PIPE": 4, "ROWS": 1, "CH": 2048, "num_warps": 8},
          {"PERSIST": 2, "PIPE": 2, "WPRE": 1, "ROWS": 1, "CH": 512, "num_warps": 4},
          # programs of SEQ consecutive rows (column-major group scales stored per program)
          {"SEQ": 8, "WPRE": 1, "ROWS": 1, "CH": 2048, "num_warps": 4},
          {"SEQ": 16, "ROWS": 1, "CH": 1024, "num_warps": 4},
          {"SEQ": 4, "PERSIST": 4, "WPRE": 1, "ROWS": 1, "CH": 2048, "num_warps": 4},
          # the session-13 table's persistent SEQ plans (column-major group scales, 5120-8192)
          {"SEQ": 8, "PERSIST": 4, "WPRE": 1, "ROWS": 1, "CH": 1024, "num_warps": 4},
          {"SEQ": 4, "PERSIST": 3, "WPRE": 1, "ROWS": 1, "CH": 2048, "num_warps": 4})


@gpu
@pytest.mark.parametrize("name,spec", [c for c in spec_matrix() if c[0] in _CORE], ids=[c[0] for c in spec_matrix() if c[0] in _CORE])
def test_gpu_prefill_sizes_and_plans_bitwise(name, spec):
    """The shipped plans at the benchmark's T = 4096 / 16384 shapes, and persistent plans that
    hold the weight in registers across rows (PERSIST with WPRE) or are software-pipelined
    (PIPE), programs of SEQ consecutive rows, tokens not a multiple of the programs."""
    launch = _gpu_launch()
    fails = {}
    for T, H in ((4096, 4096), (4099, 5120), (4096, 7168), (4096, 8192), (16384, 8192)):
        if spec.quant.kind == "fp8_per_group" and H % spec.quant.group_size:
            continue
        x, w, r, s = grid_inputs(spec, (T, H), device="cuda")
        ref = reference_cr(spec, x, w, r, s)
        for plan in (None,) + _PLANS:
            errs = mismatches(launch(spec, x, w, r, s, tuning=plan), ref)
            if errs:
                fails[f"{T}x{H} {plan}"] = errs
    assert not fails, fails


@gpu
@pytest.mark.parametrize("name,spec", spec_matrix(full=True), ids=[n for n, _ in spec_matrix(full=True)])
def test_gpu_matrix_bitwise(name, spec):
    """Every spec at H = 7168 (7 chunks) and 67 tokens; the core specs cover the other shapes."""
    _check_shapes(spec, ((67, 7168),))

"""The fused RoPE kernel on CUDA: compiled for real, against eager PyTorch (skipped without CUDA)."""

import pytest
import torch

from fusewright.lowering import rope_ops
from fusewright.testing import compile_and_capture, count_targets

pytestmark = pytest.mark.gpu
aten = torch.ops.aten


def _wan(x, fc, fs):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = fc[..., 0::2], fs[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _tables(s, d, full=True):
    ang = torch.rand(1, s, 1, d // 2, device="cuda") * 6.28
    if full:
        return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape_q,shape_k", [((2, 33, 5, 64), (2, 33, 3, 64)), ((1, 300, 40, 128), (1, 300, 40, 128)),
                                             ((1, 17, 2, 12), (1, 17, 2, 12))])
def test_kernel_bitwise_vs_eager_math(interleaved, shape_q, shape_k):
    torch.manual_seed(0)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape_k, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(shape_q[1], shape_q[-1], full=False)
    qo, ko = torch.ops.fusewright.rope_qk(q, k, cos, sin, interleaved)
    # eager launches switch FMA contraction off: every product rounds like eager PyTorch
    assert torch.equal(qo, rope_ops.rope_reference(q, cos, sin, interleaved))
    assert torch.equal(ko, rope_ops.rope_reference(k, cos, sin, interleaved))
    single = torch.ops.fusewright.rope(q, cos, sin, interleaved)
    assert torch.equal(single, qo)


def test_kernel_strided_x_and_inline_sliced_tables():
    torch.manual_seed(0)
    base = torch.randn(2, 6, 24, 64, device="cuda", dtype=torch.bfloat16)
    x = base.transpose(1, 2)  # [2, 24, 6, 64], non-contiguous, unit stride on D
    fc, fs = _tables(24, 64)
    cos, sin = fc[..., 0::2], fs[..., 1::2]
    out = torch.ops.fusewright.rope(x, cos, sin, True)
    assert out.is_contiguous()
    assert torch.equal(out, rope_ops.rope_reference(x, cos, sin, True))


def test_pass_triton_lowering_compiles_and_matches():
    torch.manual_seed(0)
    q = torch.randn(1, 64, 4, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 4, 32, device="cuda", dtype=torch.bfloat16)
    fc, fs = _tables(64, 32)

    def fn(q, k, fc, fs):
        return _wan(q, fc, fs), _wan(k, fc, fs)

    run = compile_and_capture(fn, (q, k, fc, fs), config={"lowering": {"rope": "triton"}, "strict": True})
    stats = run.report["rewrite_rope"]
    assert stats.rewritten == 2 and stats.details["triton:launches"] == 1
    after = run.graphs_after[0]
    assert count_targets(after, aten.slice_scatter.default) == 0
    assert count_targets(after, torch.ops.fusewright.rope_qk.default) == 1
    eager = fn(q, k, fc, fs)
    for got, want in zip(run.outputs, eager):
        assert torch.equal(got, want)


def test_op_called_inside_compiled_model_under_cuda_graphs():
    torch.manual_seed(0)
    q = torch.randn(1, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(128, 64, full=False)

    def fn(q, k, cos, sin):
        return torch.ops.fusewright.rope_qk(q * 2, k, cos, sin, False)

    compiled = torch.compile(fn, mode="reduce-overhead")
    for _ in range(3):
        got = compiled(q, k, cos, sin)
    want = fn(q, k, cos, sin)
    for g, w in zip(got, want):
        # traced launches may contract to FMA: at most one bf16 ulp
        assert (g.float() - w.float()).abs().max() <= w.float().abs().max() * 2**-7

"""The fused RMSNorm Triton op (`rms_norm` / `fused_add_rms_norm`, registered as `triton`).

CPU: the kernel itself under TRITON_INTERPRET=1, in a subprocess (the variable must be
set before Triton is imported), against the aten spelling. Tolerances:

* bitwise on "grid" inputs (multiples of 1/8, small: every partial sum of x*x is exact in
  f32, so the summation order, the one step the aten spelling leaves open, cannot change
  a bit) against the aten spelling with a correctly rounded rsqrt, which the kernel
  computes (eager CPU `torch.rsqrt` is a vector library's and not correctly rounded);
* on random data against the eager aten implementation: at most 2 ulps of x's dtype for
  bf16/f16 (a one-ulp f32 difference in the row statistic can move the normalised value
  by one ulp, and the weight multiply rounds once more), at most 8 f32 ulps for f32
  (summation order and rsqrt compound without an intermediate rounding to absorb them);
* the new residual of the fused-add form is always bitwise `x + residual`.

Also: the registry choosing it when configured, and a de-opaqued RMSNorm lowering to it.
GPU tests (`gpu` marker) check the compiled kernel and run under torch.compile with a
dynamic token count and CUDA graphs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fusewright.lowering import auto, registry, rms_norm_ops, rms_norm_triton
from fusewright.lowering.registry import OpCall, TensorInfo, choose
from fusewright.testing import compile_and_capture, count_targets

pytestmark = pytest.mark.usefixtures("no_env_config")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place (same sign-magnitude ordering as floats)."""
    bits, mask = (torch.int32, 0x7FFFFFFF) if a.dtype == F32 else (torch.int16, 0x7FFF)
    ai, bi = a.view(bits).long(), b.view(bits).long()
    ai = torch.where(ai < 0, -(ai & mask), ai)
    bi = torch.where(bi < 0, -(bi & mask), bi)
    return int((ai - bi).abs().max()) if a.numel() else 0


def correctly_rounded_reference(x, weight, eps):
    """The aten spelling with the rsqrt the kernel computes (f64, rounded once)."""
    h = x.float()
    v = h.pow(2).mean(-1, keepdim=True) + eps
    n = (h * (1 / v.double().sqrt()).float()).to(x.dtype)
    return n if weight is None else weight * n


def grid(shape, dtype, g, scale=32):
    return (torch.randint(-scale, scale + 1, shape, generator=g).float() / 8).to(dtype)


SHAPES = [(7, 2880), (7, 160), (3, 5, 160), (2, 7), (1, 1000)]
ULP_BOUND = {"bfloat16": 2, "float16": 2, "float32": 8}


def _interp_worker() -> dict:
    """Runs in a subprocess with TRITON_INTERPRET=1 (set before triton is imported)."""
    aten = registry.implementations("rms_norm")["aten"]
    fused_aten = registry.implementations("fused_add_rms_norm")["aten"]
    run = rms_norm_ops.run_interpreted
    out = {"exact_cases": 0, "exact_failures": [], "worst_ulps": {}, "residual_failures": []}

    def exact(name, got, want):
        out["exact_cases"] += 1
        if not torch.equal(got, want):
            out["exact_failures"].append(f"{name}: {ulps(got, want)} ulps")

    for dtype in (BF16, F16, F32):
        dname = str(dtype).replace("torch.", "")
        for shape in SHAPES:
            g = torch.Generator().manual_seed(len(shape) * 10007 + shape[-1])
            x, r, w = grid(shape, dtype, g, 16), grid(shape, dtype, g, 16), grid(shape[-1:], dtype, g, 16)
            name = f"{dname} {shape}"
            exact(f"{name} weight", run(x, None, w, 1e-6)[0], correctly_rounded_reference(x, w, 1e-6))
            exact(f"{name} no weight", run(x, None, None, 1e-6)[0], correctly_rounded_reference(x, None, 1e-6))
            y, s = run(x, r, w, 1e-5)
            exact(f"{name} fused add", y, correctly_rounded_reference(x + r, w, 1e-5))
            if not torch.equal(s, x + r):
                out["residual_failures"].append(name)
            # random data against the eager aten implementation
            x = (torch.randn(shape, generator=g) * 3).to(dtype)
            r, w = torch.randn(shape, generator=g).to(dtype), torch.randn(shape[-1:], generator=g).to(dtype)
            worst = max(ulps(run(x, None, w, 1e-6)[0], aten.run({"x": x, "weight": w}, {"eps": 1e-6})),
                        ulps(run(x, None, None, 1e-6)[0], aten.run({"x": x, "weight": None}, {"eps": 1e-6})))
            y, s = run(x, r, w, 1e-6)
            want_y, want_s = fused_aten.run({"x": x, "residual": r, "weight": w}, {"eps": 1e-6})
            worst = max(worst, ulps(y, want_y))
            if not torch.equal(s, want_s):
                out["residual_failures"].append(f"{name} random")
            out["worst_ulps"][dname] = max(out["worst_ulps"].get(dname, 0), worst)
    # a row stride other than H (a slice of a wider tensor: no copy), and token counts
    # around the program's row block (rows are masked; the launch depends on H only)
    g = torch.Generator().manual_seed(3)
    w = grid((160,), BF16, g)
    x = grid((9, 200), BF16, g)[:, :160]
    exact("strided rows", run(x, None, w, 1e-6)[0], correctly_rounded_reference(x, w, 1e-6))
    for t in (1, 5, 25, 26, 27):
        xt = grid((t, 160), BF16, g)
        exact(f"T={t}", run(xt, None, w, 1e-6)[0], correctly_rounded_reference(xt, w, 1e-6))
    return out


@pytest.fixture(scope="module")
def interp_result():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interp-worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreted_kernel_bitwise_on_exact_sums(interp_result):
    assert interp_result["exact_cases"] == 3 * len(SHAPES) * 3 + 6
    assert not interp_result["exact_failures"], interp_result["exact_failures"]


def test_interpreted_kernel_within_ulps_of_the_aten_implementation(interp_result):
    worst = interp_result["worst_ulps"]
    assert set(worst) == set(ULP_BOUND)
    assert all(worst[d] <= ULP_BOUND[d] for d in worst), worst


def test_interpreted_fused_add_writes_the_rounded_sum(interp_result):
    assert not interp_result["residual_failures"]


def test_launch_depends_on_hidden_size_only():
    for h in (7, 160, 2880, 4096, 8192, 32768):
        cfg = rms_norm_triton.launch_config(h)
        assert cfg["BLOCK_H"] >= h and cfg["BLOCK_H"] * cfg["ROWS"] <= max(4096, cfg["BLOCK_H"])
    assert rms_norm_triton.supports(32769, BF16).startswith("hidden size")


def test_launch_traces_with_a_symbolic_token_count_and_no_host_sync():
    """What Inductor sees of the CUDA path (traced on CPU tensors: nothing runs)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.library import wrap_triton

    def fn(x, r, w):
        return rms_norm_ops._launch(wrap_triton(rms_norm_triton.rms_norm_kernel), x, r, w, 1e-6)

    x = torch.empty(5, 160, dtype=BF16)
    gm = make_fx(fn, tracing_mode="symbolic")(x, x.clone(), torch.empty(160, dtype=BF16))
    (launch,) = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    kwargs = launch.kwargs["kwargs"]
    assert isinstance(kwargs["M"], torch.fx.Node)  # the token count stays symbolic
    assert kwargs["H"] == 160 and kwargs["BLOCK_H"] == 256  # the hidden size is specialised
    assert isinstance(launch.kwargs["grid"][0][0], torch.fx.Node)
    assert "_local_scalar_dense" not in gm.code and "item" not in gm.code


def test_op_checks_fake_and_cpu_reference():
    x = torch.randn(3, 8).to(BF16)
    w = torch.randn(8).to(BF16)
    assert torch.equal(torch.ops.fusewright.rms_norm(x, w, 1e-6), rms_norm_ops.rms_norm_reference(x, w, 1e-6))
    y, s = torch.ops.fusewright.fused_add_rms_norm(x, x, None, 1e-6)
    assert torch.equal(s, x + x) and torch.equal(y, rms_norm_ops.rms_norm_reference(x + x, None, 1e-6))
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.fusewright.rms_norm(x, w.float(), 1e-6)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        torch.ops.fusewright.rms_norm(torch.ones(2, 4, dtype=torch.int32), None, 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        torch.ops.fusewright.fused_add_rms_norm(x, x.float(), None, 1e-6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx_ = torch.empty(5, 3, 64, dtype=F16)
        out = torch.ops.fusewright.fused_add_rms_norm(fx_, fx_, None, 1e-6)
        assert [tuple(o.shape) for o in out] == [(5, 3, 64)] * 2 and out[0].dtype == F16


# ------------------------------------------------------------------ the registry
def _call(device="cuda", dtype=BF16, hidden=4096, stride=None, weight_dtype=None, op="rms_norm"):
    x = TensorInfo((64, hidden), dtype, device, stride or (hidden, 1))
    tensors = {"x": x, "weight": TensorInfo((hidden,), weight_dtype or dtype, device, (1,))}
    if op == "fused_add_rms_norm":
        tensors["residual"] = x
    return OpCall.make(op, tensors, eps=1e-6, dtype=str(dtype).replace("torch.", ""))


def test_registry_supports_and_configured_choice(monkeypatch):
    for op in ("rms_norm", "fused_add_rms_norm"):
        impl = registry.implementations(op)["triton"]
        assert impl.supports(_call(op=op)) is None
        assert choose(_call(op=op), ("triton", "aten")).name == "triton"
        assert "dtype torch.float64" in impl.supports(_call(op=op, dtype=torch.float64))
        assert "not contiguous" in impl.supports(_call(op=op, stride=(1, 64)))
        assert "hidden size 65536" in impl.supports(_call(op=op, hidden=65536))
        assert "weight must be" in impl.supports(_call(op=op, weight_dtype=F32))
        cpu = _call(op=op, device="cpu")
        assert "runs on CUDA" in impl.supports(cpu)
        choice = choose(cpu, ("triton", "aten"))
        assert choice.name == "aten" and choice.reason.startswith("triton: the Triton kernel runs on CUDA")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert choose(cpu, ("triton", "aten")).name == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")


def test_auto_keeps_aten_on_cuda_unless_measuring_is_asked_for(tmp_path, monkeypatch):
    class Timer:
        calls = 0

        def __call__(self, call, impls):
            Timer.calls += 1
            return {"aten": 2e-5, "triton": 1e-5}

    tuner = auto.Tuner(measure=Timer(), directory=tmp_path)
    choice = choose(_call(), ("auto",), tuner=tuner)
    assert choice.name == "aten" and Timer.calls == 0
    assert choice.reason.startswith("auto: rule for cuda: aten is decomposable: Inductor fuses it")
    monkeypatch.setenv(auto.ENV_MEASURE, "1")
    assert choose(_call(), ("auto",), tuner=tuner).name == "triton" and Timer.calls == 1


# ------------------------------------------------------------------ de-opaqued graphs
@torch.library.custom_op("fwtest9t::rms_norm_fn", mutates_args=())
def opaque_rms_norm_fn(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ops.rms_norm_reference(x, weight, eps)


@opaque_rms_norm_fn.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("fwtest9t::fused_add_rms_norm", mutates_args=("input", "residual"))
def opaque_fused_add(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    total = input + residual
    residual.copy_(total)
    input.copy_(rms_norm_ops.rms_norm_reference(total, weight, epsilon))


def block(x, r, w):
    y = torch.ops.fwtest9t.rms_norm_fn(x * 2, w, 1e-6)
    # the in-place op works on buffers of its own: functionalization keeps them apart
    # from the functional op's output
    h, res = x + 1, r.clone()
    torch.ops.fwtest9t.fused_add_rms_norm(h, res, w, 1e-5)
    return y, h, res


CONFIG = {"deopaque": {"fwtest9t::rms_norm_fn": "rms_norm", "fwtest9t::fused_add_rms_norm": "fused_add_rms_norm"},
          "fuse_norm_quant": False, "rewrite_rope": False, "strict": True}


def test_de_opaqued_graph_lowers_to_the_fused_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets supports() accept CPU tensors
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(7, 160, generator=g).to(BF16), torch.randn(7, 160, generator=g).to(BF16)
    w = (1 + 0.1 * torch.randn(160, generator=g)).to(BF16)
    config = dict(CONFIG, lowering={"rms_norm": "triton,aten", "fused_add_rms_norm": "triton,aten"})
    run = compile_and_capture(block, (x, r, w), config)
    stats = run.report["deopaque"]
    assert stats.rewritten == 2 and not stats.skipped
    impls = sorted(registry.parse_detail(d)["impl"] for d in stats.details)
    assert impls == ["triton", "triton"] and all("priority triton,aten" in d for d in stats.details)
    after = run.graphs_after[0]
    assert count_targets(after, torch.ops.fusewright.rms_norm.default) == 1
    assert count_targets(after, torch.ops.fusewright.fused_add_rms_norm.default) == 1
    assert count_targets(after, torch.ops.fwtest9t.rms_norm_fn.default) == 0
    # On CPU the compiled graph calls the op's CPU implementation, the aten spelling run
    # eagerly, as the stand-in opaque ops do: bitwise (the kernel's own numerics are
    # checked under the interpreter above and on the GPU below).
    for got, want in zip(run.outputs, block(x, r, w)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("shape", [(7, 2880), (333, 5120), (4096, 4096), (5, 3, 160), (1, 8192)])
def test_gpu_kernel_numerics(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x, r = grid(shape, dtype, g, 16).cuda(), grid(shape, dtype, g, 16).cuda()
    w = grid(shape[-1:], dtype, g, 16).cuda()
    y = torch.ops.fusewright.rms_norm(x, w, 1e-6)
    assert torch.equal(y.cpu(), correctly_rounded_reference(x.cpu(), w.cpu(), 1e-6))
    y, s = torch.ops.fusewright.fused_add_rms_norm(x, r, None, 1e-5)
    assert torch.equal(s, x + r)
    assert torch.equal(y.cpu(), correctly_rounded_reference((x + r).cpu(), None, 1e-5))
    xr = (torch.randn(shape, generator=g) * 3).to(dtype)
    wr = torch.randn(shape[-1:], generator=g).to(dtype)
    y = torch.ops.fusewright.rms_norm(xr.cuda(), wr.cuda(), 1e-6).cpu()
    assert ulps(y, rms_norm_ops.rms_norm_reference(xr, wr, 1e-6)) <= (8 if dtype == F32 else 2)


@gpu
def test_gpu_compiled_dynamic_tokens_and_cuda_graphs():
    w = torch.randn(2880, device="cuda", dtype=BF16)

    def fn(x, r):
        y, s = torch.ops.fusewright.fused_add_rms_norm(x * 2, r, w, 1e-6)
        return y.float().sum(-1), s

    compiled = torch.compile(fn, dynamic=True)
    for t in (3, 17, 129):
        x = torch.randn(t, 2880, device="cuda", dtype=BF16)
        r = torch.randn(t, 2880, device="cuda", dtype=BF16)
        got, want = compiled(x, r), fn(x, r)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-2)
    graphed = torch.compile(fn, mode="reduce-overhead")
    x = torch.randn(64, 2880, device="cuda", dtype=BF16)
    r = torch.randn(64, 2880, device="cuda", dtype=BF16)
    for _ in range(3):
        got = graphed(x, r)
    assert torch.equal(got[1], fn(x, r)[1])


@gpu
def test_gpu_de_opaqued_graph_lowers_to_the_kernel():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(64, 4096, generator=g).to(BF16).cuda(), torch.randn(64, 4096, generator=g).to(BF16).cuda()
    w = (1 + 0.1 * torch.randn(4096, generator=g)).to(BF16).cuda()
    config = dict(CONFIG, lowering={"rms_norm": "triton", "fused_add_rms_norm": "triton"})
    run = compile_and_capture(block, (x, r, w), config)
    assert run.report["deopaque"].rewritten == 2
    assert count_targets(run.graphs_after[0], torch.ops.fusewright.fused_add_rms_norm.default) == 1
    eager = block(x, r, w)
    for got, want in zip(run.outputs, eager):
        assert ulps(got.cpu(), want.cpu()) <= 2
    # auto on CUDA keeps the decomposable aten sequence
    run = compile_and_capture(block, (x, r, w), dict(CONFIG, lowering="auto"))
    assert all(registry.parse_detail(d)["impl"] == "aten" for d in run.report["deopaque"].details)


if __name__ == "__main__" and sys.argv[1:] == ["--interp-worker"]:
    print(json.dumps(_interp_worker()))

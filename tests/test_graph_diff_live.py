"""graph-diff on output code captured live from CPU compiles (C++ kernels), the live diff
(two compiles, graph breaks, FX diff, numerics), target loading and fusewright.testing.

Compiles: 2 single compiles + one live diff (2 compiles of a target with a graph break)."""

from pathlib import Path

import pytest
import torch

from fusewright import testing
from fusewright.tools.graph_diff import (
    GraphDiffError,
    check_expectations,
    live_diff,
    load_target,
)
from fusewright.tools.output_compare import compare_outputs

pytestmark = pytest.mark.usefixtures("no_env_config")

BF16 = torch.bfloat16
TARGETS = Path(__file__).parent / "fixtures" / "targets"


@torch.library.custom_op("fw_graph_diff_live::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def chain(x):
    # each step feeds an opaque op, so each pointwise step is a kernel of its own
    a = opaque(x)
    b = opaque(a.float().view(-1).to(BF16))  # bf16 -> f32 -> bf16 round trip: no-op
    c = opaque((b.float() * 2).to(BF16))  # cast, then compute: not a no-op
    d = opaque(c.view(x.shape).t().contiguous())  # transpose made contiguous: layout copy
    return opaque(d.float())  # widening cast: real


def test_cpu_kernels_noops_and_negatives():
    run = testing.compile_and_capture(chain, (torch.randn(16, 64, dtype=BF16),), enable=False)
    cpp = [k for k in testing.kernels(run) if k.kind == "cpp"]
    assert [(k.is_noop, k.movement) for k in cpp] == [
        (True, None), (False, None), (False, "layout copy"), (False, "cast bf16->f32")]
    assert cpp[0].noop_reason == "in-place identity: writes back what it read (through bf16->f32->bf16)"
    assert "mult" in cpp[1].body_ops
    assert [k.kind for k in testing.kernels(run)].count("custom_op") == 5
    assert [k.name for k in testing.noop_kernels(run)] == [cpp[0].name]
    with pytest.raises(AssertionError, match=r"1 no-op kernel\(s\) remain: cpp_fused_.*in-place identity"):
        testing.assert_no_noop_kernels(run)


def test_cpu_identity_copy():
    run = testing.compile_and_capture(lambda x: x.clone(), (torch.randn(16, 64, dtype=BF16),), enable=False)
    (kernel,) = testing.kernels(run)
    assert kernel.kind == "cpp" and kernel.is_noop and kernel.noop_reason == "copy: stores what it loaded"
    assert kernel.bytes == 2 * 16 * 64 * 2


def test_cpu_dynamic_shapes_bytes_from_example_sizes():
    def roundtrip(x):
        return opaque(opaque(x).float().view(-1).to(BF16))

    run = testing.compile_and_capture(roundtrip, (torch.randn(16, 64, dtype=BF16),), enable=False, dynamic=True)
    (kernel,) = [k for k in testing.kernels(run) if k.kind == "cpp"]
    assert "s" in run.codes[0].split("def call", 1)[1]  # symbolic sizes in call()
    assert kernel.is_noop and kernel.bytes == 2 * 16 * 64 * 2


@pytest.fixture(scope="module")
def diff():
    """The round-trip target (graph break included) compiled with fusewright off and on."""
    torch._dynamo.reset()
    fn, args, kwargs = load_target(f"{TARGETS / 'roundtrip.py'}:factory")
    steps = []
    report = live_diff(fn, args, {"fuse_norm_quant": False}, progress=steps.append,
                       target="roundtrip.py:factory")
    report.extra["steps"] = steps
    return report


def test_live_diff_removes_the_noop_kernel(diff):
    assert diff.extra["steps"][:2] == ["compiling with stock Inductor", "compiling with fusewright"]
    assert len(diff.before.codes) == len(diff.after.codes) == 2  # graph break: two graphs each
    removed = [m.before for m in diff.kernel_diff if m.status == "removed"]
    assert len(removed) == 1 and removed[0].is_noop and removed[0].graph == 0
    assert diff.counts("added") == 0 and diff.counts("unchanged") == len(diff.after.kernels)
    assert diff.rewrites["eliminate_noop_casts"] == 1 and diff.rewrites.get("fuse_norm_quant", 0) == 0
    assert diff.numerics.ok and diff.numerics.bitwise and diff.numerics.max_abs_diff == 0.0
    assert diff.before.estimated_bytes > diff.after.estimated_bytes


def test_fx_diff_maps_changes_to_the_source_line(diff):
    graph0, graph1 = diff.fx
    assert graph0.changed and not graph1.changed
    (row,) = graph0.by_source()
    assert row["source"].startswith("roundtrip.py:") and "float().view(-1).to(BF16)" in row["source"]
    assert row["removed"].count("prims.convert_element_type") == 2
    # edges are diffed too: the opaque op now reads the (re-viewed) input directly
    assert graph0.edges("removed") and graph0.edges("added")


def test_report_json_schema(diff):
    d = diff.to_dict()
    for side in ("before", "after"):
        assert d[side]["kernel_count"] == len(d[side]["kernels"])
        assert d[side]["noop_kernel_count"] == sum(k["is_noop"] for k in d[side]["kernels"])
        assert all({"name", "kind", "is_noop"} <= set(k) for k in d[side]["kernels"])
    assert d["before"]["noop_kernel_count"] == 1 and d["after"]["noop_kernel_count"] == 0
    assert d["rewrites"]["eliminate_noop_casts"] == 1
    assert set(d["numerics"]) >= {"max_abs_diff", "ok"} and d["numerics"]["ok"] is True
    assert d["fx_diff"][0]["nodes"]["removed"] and d["passes"]["passes"]["eliminate_noop_casts"]["rewritten"] == 1


def test_expectations_and_pytest_helpers(diff):
    assert check_expectations(diff, no_noop=True, fewer_kernels=True, rewrites={"eliminate_noop_casts": 1},
                              close=True) == []
    unmet = check_expectations(diff, rewrites={"fuse_norm_quant": 1, "eliminate_noop_casts": 2})
    assert unmet == ["--expect-rewrites fuse_norm_quant=1: got 0", "--expect-rewrites eliminate_noop_casts=2: got 1"]
    testing.assert_no_noop_kernels(diff)
    testing.assert_fewer_kernels(diff)
    testing.assert_rewrites(diff, eliminate_noop_casts=1)
    testing.assert_outputs_close(diff)
    with pytest.raises(AssertionError, match="expected at least 2 fewer"):
        testing.assert_fewer_kernels(diff, by=2)
    with pytest.raises(AssertionError, match="rewrite_rope expected 1, got 0"):
        testing.assert_rewrites(diff, rewrite_rope=1)
    with pytest.raises(AssertionError, match="no-op kernel"):
        testing.assert_no_noop_kernels([c.code for c in diff.before.codes])


# ----------------------------------------------------------------------------- numerics
def test_compare_outputs():
    x = torch.randn(8, dtype=BF16)
    same = compare_outputs((x, 3), (x.clone(), 3))
    assert same.ok and same.bitwise and same.max_abs_diff == 0
    near = compare_outputs(x.float(), x.float() + 1e-7)
    assert near.ok and not near.bitwise
    far = compare_outputs(x.float(), x.float() + 1)
    assert not far.ok and far.max_abs_diff == pytest.approx(1.0) and "8 of 8 elements" in far.detail
    nan = torch.tensor([float("nan"), 1.0])
    assert compare_outputs(nan, nan.clone()).ok
    assert not compare_outputs(nan, torch.tensor([0.0, 1.0])).ok
    assert compare_outputs([x], (x,)).detail == "outputs differ in structure"
    assert "torch.bfloat16 vs" in compare_outputs(x, x.float()).detail
    fp8 = torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn)
    assert compare_outputs(fp8, fp8.clone()).bitwise
    assert not compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3])).ok
    assert compare_outputs(x.float(), x.float() + 1, atol=2.0).ok


# ----------------------------------------------------------------------------- targets
def test_load_target_forms():
    fn, args, kwargs = load_target(f"{TARGETS / 'roundtrip.py'}:factory_with_device", device="cpu")
    assert callable(fn) and args == () and set(kwargs) == {"x"}
    fn, args, kwargs = load_target(None, device="cpu")  # the built-in example
    assert isinstance(fn, torch.nn.Module) and len(args) == 3
    fn, args, _ = load_target("fusewright.tools.example:example", device="cpu")
    assert args[0].dtype == BF16


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected path/to/file.py:factory"),
    ("missing/file.py:f", "no such file"),
    ("fusewright.no_such_module:f", "cannot import fusewright.no_such_module: ModuleNotFoundError"),
    ("{t}:nothing", "has no callable 'nothing'"),
    ("{t}:not_callable", "has no callable 'not_callable'"),
    ("{t}:wrong_return", r"must return \(model_or_fn, example_inputs\), got int"),
    ("{t}:", "expected path/to/file.py:factory"),
])
def test_load_target_errors(spec, message):
    with pytest.raises(GraphDiffError, match=message):
        load_target(spec.format(t=TARGETS / "roundtrip.py"))


def test_failed_compile_is_a_graph_diff_error():
    fn, args, _ = load_target(f"{TARGETS / 'roundtrip.py'}:fails_to_compile")
    with pytest.raises(GraphDiffError, match="compiling with stock Inductor failed: RuntimeError: boom"):
        live_diff(fn, args)


@pytest.mark.models
def test_tiny_llama_with_fp8_linears():
    """A real transformers Llama layer (tiny config, random weights, torchao-style FP8
    rowwise activation quant): every launch classified, RMSNorm->quant rewrites visible in
    the FX diff at modeling_llama.py's lines, outputs unchanged."""
    pytest.importorskip("transformers")
    fn, args, kwargs = load_target("fusewright.tools.model_zoo:llama", device="cpu")
    report = live_diff(fn, args, kwargs=kwargs, target="llama")
    kinds = {k.kind for side in (report.before, report.after) for k in side.kernels}
    assert kinds <= {"cpp", "extern", "aten_fallback", "custom_op"} and "cpp" in kinds and "extern" in kinds
    assert report.rewrites.get("fuse_norm_quant", 0) >= 1
    rows = [row for g in report.fx for row in g.by_source()]
    assert any(row["source"].startswith("modeling_llama.py") and "rsqrt" in row["removed"] for row in rows)
    assert report.numerics.ok
    d = report.to_dict()
    assert d["before"]["kernel_count"] == len(report.before.kernels) > 5


@pytest.mark.gpu
def test_cuda_live_diff_removes_a_triton_noop_kernel():
    fn, args, kwargs = load_target(f"{TARGETS / 'roundtrip.py'}:factory_with_device", device="cuda")
    report = live_diff(fn, args, {"fuse_norm_quant": False}, kwargs=kwargs)
    removed = [m.before for m in report.kernel_diff if m.status == "removed"]
    assert [(k.kind, k.is_noop) for k in removed] == [("triton_pointwise", True)]
    assert not testing.noop_kernels(report) and report.numerics.bitwise

"""graph-diff reading output code, without compiling: real Triton output code captured on an
H100 (tests/fixtures/triton, torch 2.11 / triton 3.6, made by tools/capture_fixtures.py),
C++ kernel snippets, TORCH_LOGS logs, debug directories, and malformed input."""

import json
from pathlib import Path

import pytest

from fusewright.tools.graph_diff import offline_diff, single_report
from fusewright.tools.kernel_match import match_kernels
from fusewright.tools.kernels import lossless, read_cpp, read_triton
from fusewright.tools.output_code import OutputCodeError, ops_from_name, parse_kernels, parse_output_code
from fusewright.tools.output_code_files import load_output_codes, split_log

TRITON = Path(__file__).parent / "fixtures" / "triton"


def kernels_of(case):
    return [k for code in load_output_codes(TRITON / f"{case}.py") for k in code.kernels]


def generated(case):
    """The Inductor-generated kernels (not extern/custom-op launches) of a fixture."""
    return [k for k in kernels_of(case) if k.kind.startswith("triton") or k.kind == "cpp"]


def test_fixtures_were_captured_on_a_gpu():
    manifest = json.loads((TRITON / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and "H100" in manifest["device_name"]
    assert manifest["torch"].startswith("2.11")


# ----------------------------------------------------------------------------- no-op positives
@pytest.mark.parametrize("case, reason", [
    ("identity_clone", "copy: stores what it loaded"),
    ("same_dtype_copy", "copy: stores what it loaded"),
    ("roundtrip_view_into_opaque", "in-place identity: writes back what it read (through bf16->f32->bf16)"),
    ("dynamic_roundtrip", "in-place identity: writes back what it read (through bf16->f32->bf16)"),
])
def test_triton_noop_kernels(case, reason):
    (kernel,) = generated(case)
    assert kernel.kind == "triton_pointwise"
    assert kernel.is_noop and kernel.noop_reason == reason
    assert kernel.movement is None


def test_lossy_trip_that_inductor_already_dropped_is_an_identity():
    # The model wrote f32 -> bf16 -> view -> f32; Inductor 2.11 dropped the bf16 rounding
    # itself, so the kernel it emitted really does write back what it read.
    (kernel,) = generated("lossy_roundtrip")
    assert kernel.is_noop and "bf16" not in (kernel.noop_reason or "")


# ----------------------------------------------------------------------------- no-op negatives
def test_cast_then_compute_is_not_a_noop():
    (kernel,) = generated("cast_then_compute")
    assert not kernel.is_noop and kernel.movement is None
    assert {"mult", "add"} <= set(kernel.body_ops)
    assert kernel.ops == ["_to_copy", "mul", "add"]


def test_layout_copy_and_widening_cast_are_movement_not_noops():
    (layout,) = generated("layout_copy")
    assert not layout.is_noop and layout.movement == "layout copy"
    (widen,) = generated("widening_cast")
    assert not widen.is_noop and widen.movement == "cast bf16->f32"


def _edit_kernel(case: str, old: str, new: str) -> str:
    code = (TRITON / f"{case}.py").read_text()
    assert old in code
    return code.replace(old, new)


def test_a_lossy_round_trip_is_not_a_noop():
    code = _edit_kernel("lossy_roundtrip", "tmp1 = tmp0.to(tl.float32)", "tmp1 = tmp0.to(tl.bfloat16)")
    (kernel,) = [k for k in parse_kernels(code) if k.kind.startswith("triton")]
    assert not kernel.is_noop and kernel.movement == "lossy round trip f32->bf16->f32"


def test_one_computed_store_makes_the_kernel_compute():
    code = _edit_kernel("identity_clone", "tl.store(out_ptr0 + (x0), tmp0, None)",
                        "tl.store(out_ptr0 + (x0), tmp0 * tmp0, None)")
    (kernel,) = parse_kernels(code)
    assert not kernel.is_noop and kernel.body_ops == ["mult"]


def test_indirect_copy_is_a_gather_not_a_noop():
    code = _edit_kernel("identity_clone", "tmp0 = tl.load(in_ptr0 + (x0), None).to(tl.float32)",
                        "tmp9 = x0 // 2\n    tmp0 = tl.load(in_ptr0 + (tmp9), None).to(tl.float32)")
    (kernel,) = parse_kernels(code)
    assert not kernel.is_noop and kernel.movement == "gather/scatter copy (indirect index)"


def test_bitcast_is_not_a_conversion():
    code = _edit_kernel("identity_clone", "tl.store(out_ptr0 + (x0), tmp0, None)",
                        "tmp1 = tmp0.to(tl.int16, bitcast=True)\n    tl.store(out_ptr0 + (x0), tmp1, None)")
    (kernel,) = parse_kernels(code)
    assert not kernel.is_noop


def test_lossless_table():
    assert lossless("bf16", "f32") and lossless("f16", "f64") and lossless("f8e4m3", "bf16")
    assert not lossless("f32", "bf16") and not lossless("bf16", "f16") and not lossless("i64", "f64")
    assert not lossless(None, "f32")


# ----------------------------------------------------------------------------- classification
def test_reduction_kinds_and_fused_ops():
    (persistent,) = generated("rms_norm_fp8_persistent")
    assert persistent.kind == "triton_persistent_reduction"
    assert {"rsqrt", "amax", "clamp", "mean"} <= set(persistent.ops)
    assert {"rsqrt", "sum"} <= set(persistent.body_ops) and persistent.stores == 2
    kinds = [k.kind for k in generated("rms_norm_fp8_looped")]
    assert kinds == ["triton_reduction", "triton_persistent_reduction", "triton_reduction",
                     "triton_persistent_reduction", "triton_pointwise"]
    assert not any(k.is_noop for k in generated("rms_norm_fp8_looped"))


def test_extern_template_user_and_custom_op_kernels():
    mm, relu = kernels_of("mm_extern")
    assert (mm.kind, mm.name, relu.kind) == ("extern", "mm", "triton_pointwise")
    assert mm.bytes == 3 * 128 * 128 * 2  # a, b and out, bf16
    (template,) = kernels_of("mm_template")
    assert template.kind == "triton_template" and template.ops == ["mm", "relu"] and "dot" in template.body_ops
    user, mul = kernels_of("user_triton")
    assert (user.kind, user.name, mul.kind) == ("triton_user", "add_one_kernel_0", "triton_pointwise")
    assert not user.is_noop and "add" in user.body_ops
    opaque = kernels_of("layout_copy")[0]
    assert opaque.kind == "custom_op" and opaque.name == "fw_fixture.opaque"
    assert opaque.source_nodes == ["opaque_default"]


def test_bytes_where_shapes_are_known():
    (clone,) = generated("identity_clone")
    assert clone.bytes == 2 * 64 * 256 * 2  # read + write of a bf16 [64, 256]
    (inplace,) = generated("roundtrip_view_into_opaque")
    assert inplace.bytes == 2 * 64 * 256 * 2  # in_out_ptr: read and written
    # dynamic shapes: sizes come from the example values in get_args()
    (dyn,) = generated("dynamic_roundtrip")
    assert dyn.bytes == 2 * 64 * 256 * 2


def test_ops_from_name():
    assert ops_from_name("triton_poi_fused__to_copy_add_mul_3") == ["_to_copy", "add", "mul"]
    assert ops_from_name("cpp_fused_native_layer_norm_0") == ["native_layer_norm"]
    assert ops_from_name("add_one_kernel_0") == []


# ----------------------------------------------------------------------------- C++ bodies
CPP = '''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const {src}* in_ptr0,
                       {dst}* out_ptr0)
{{
    for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(1L))
    {{
        auto tmp0 = in_ptr0[static_cast<int64_t>(x0)];
        {body}
        out_ptr0[static_cast<int64_t>({out_index})] = {result};
    }}
}}
'''


@pytest.mark.parametrize("src, dst, body, result, out_index, noop, movement", [
    ("at::BFloat16", "at::BFloat16", "auto tmp1 = c10::convert<float>(tmp0);\n auto tmp2 = c10::convert<at::BFloat16>(tmp1);",
     "tmp2", "x0", True, None),
    ("float", "float", "auto tmp1 = c10::convert<at::BFloat16>(tmp0);\n auto tmp2 = c10::convert<float>(tmp1);",
     "tmp2", "x0", False, "lossy round trip f32->bf16->f32"),
    ("float", "float", "auto tmp1 = static_cast<float>(2.0);\n auto tmp2 = tmp0 * tmp1;", "tmp2", "x0", False, None),
    ("at::Half", "at::Half", "", "tmp0", "63L - x0", False, "layout copy"),
    ("at::BFloat16", "float", "auto tmp1 = c10::convert<float>(tmp0);", "tmp1", "x0", False, "cast bf16->f32"),
])
def test_cpp_scalar_kernels(src, dst, body, result, out_index, noop, movement):
    info = read_cpp(CPP.format(src=src, dst=dst, body=body, result=result, out_index=out_index))
    assert info.is_noop is noop and info.movement == movement


# ----------------------------------------------------------------------------- logs and dirs
def test_torch_logs_output_code_log_and_debug_dir_give_the_same_kernels():
    files = [k.name for i in (0, 1) for k in parse_output_code((TRITON / f"graph_break.{i}.py").read_text()).kernels]
    log = load_output_codes(TRITON / "graph_break_output_code.log")
    debug = load_output_codes(TRITON / "debug")
    assert len(log) == len(debug) == 2
    assert [k.name for c in log for k in c.kernels] == files == [k.name for c in debug for k in c.kernels]
    assert [c.kernels[0].graph for c in debug] == [0, 1]


def test_split_log_ignores_other_log_lines():
    text = (TRITON / "graph_break_output_code.log").read_text()
    noisy = "I1122 05:39:29.000000 989 torch/_dynamo/x.py:1] [0/0] something else\n" + text
    assert len(split_log(noisy)) == 2


# ----------------------------------------------------------------------------- diff
def test_kernels_match_by_body_not_by_numbered_name():
    code = (TRITON / "identity_clone.py").read_text().replace("triton_poi_fused_clone_0", "triton_poi_fused_clone_7")
    (renamed,) = parse_kernels(code)
    (original,) = generated("identity_clone")
    assert renamed.signature == original.signature
    # a same-dtype copy is the same kernel under another name
    (copy,) = generated("same_dtype_copy")
    assert copy.signature == original.signature
    statuses = [m.status for m in match_kernels([original], [renamed])]
    assert statuses == ["unchanged"]


def test_offline_diff_statuses():
    report = offline_diff(str(TRITON / "roundtrip_view_into_opaque.py"), str(TRITON / "cast_then_compute.py"))
    statuses = [(m.status, (m.before or m.after).kind) for m in report.kernel_diff]
    assert statuses.count(("unchanged", "custom_op")) == 1
    assert ("removed", "triton_pointwise") in statuses and ("added", "triton_pointwise") in statuses
    d = report.to_dict()
    assert d["before"]["noop_kernel_count"] == 1 and d["after"]["noop_kernel_count"] == 0
    assert d["rewrites"] == {} and d["numerics"]["ok"] is None


def test_changed_kernel_keeps_its_role():
    before = generated("identity_clone")
    after = parse_kernels(_edit_kernel("identity_clone", "tl.store(out_ptr0 + (x0), tmp0, None)",
                                       "tl.store(out_ptr0 + (x0), tmp0 + 1, None)"))
    assert [m.status for m in match_kernels(before, after)] == ["changed"]


def test_single_report_lists_kernels():
    report = single_report(str(TRITON / "debug"))
    assert report.after is None and len(report.before.codes) == 2
    assert report.to_dict()["before"]["noop_kernel_count"] == 1


# ----------------------------------------------------------------------------- malformed
def test_malformed_inputs(tmp_path):
    with pytest.raises(OutputCodeError, match="no such file"):
        load_output_codes(tmp_path / "missing.py")
    plain = tmp_path / "plain.py"
    plain.write_text("print('hello')\n")
    with pytest.raises(OutputCodeError, match="not Inductor output code"):
        load_output_codes(plain)
    broken = tmp_path / "broken.py"
    broken.write_text((TRITON / "identity_clone.py").read_text().replace("return (buf0, )", "return (buf0, "))
    with pytest.raises(OutputCodeError, match="not valid output code: .* at line"):
        load_output_codes(broken)
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"\xff\xfe\x00def call(async_compile")
    with pytest.raises(OutputCodeError, match="not a text file"):
        load_output_codes(binary)
    cut = tmp_path / "cut.py"
    cut.write_text((TRITON / "identity_clone.py").read_text()[:3000])  # truncated before call()
    with pytest.raises(OutputCodeError, match="not Inductor output code"):
        load_output_codes(cut)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputCodeError, match="no Inductor output code"):
        load_output_codes(tmp_path / "empty")
    log = tmp_path / "x.log"
    log.write_text("V1122 05:39:29.622000 989 torch/_inductor/graph.py:2552] [0/0] [__output_code] Output code: \n")
    with pytest.raises(OutputCodeError, match="log holds no output code"):
        load_output_codes(log)


def test_unreadable_kernel_source_does_not_stop_the_module():
    code = _edit_kernel("identity_clone", "def triton_poi_fused_clone_0(", "def triton_poi_fused_clone_0((")
    (kernel,) = parse_kernels(code)
    assert kernel.kind == "triton_pointwise" and not kernel.is_noop and kernel.signature


def test_read_triton_on_garbage():
    kind, info = read_triton("this is not python(", "triton_red_fused_sum_0")
    assert kind == "triton_reduction" and info is None


def test_kernel_dataflow_graph_diff():
    from fusewright.tools.graph_diff import kernel_graphs

    (graph,) = kernel_graphs(offline_diff(str(TRITON / "roundtrip_view_into_opaque.py"),
                                          str(TRITON / "cast_then_compute.py")))
    g = graph.union
    name = lambda n: g.nodes[n]["name"]
    removed, added = graph.nodes("removed"), graph.nodes("added")
    assert [name(n) for n in removed] == ["triton_poi_fused__to_copy_opaque_view_0"]
    assert [name(n) for n in added] == ["triton_poi_fused__to_copy_add_mul_opaque_0"]
    # the first opaque op fed the no-op copy before, and feeds the compute kernel after
    assert sorted((name(u), name(v)) for u, v in graph.edges("removed")) == [
        ("fw_fixture.opaque", "triton_poi_fused__to_copy_opaque_view_0"),
        ("triton_poi_fused__to_copy_opaque_view_0", "fw_fixture.opaque")]
    assert len(graph.edges("added")) == 2
    assert ("in:arg0_1" in g) and ("out" in g)


def test_match_order_interleaves_added_kernels():
    from fusewright.tools.output_code import Kernel

    k = lambda name, sig: Kernel(name, "triton_pointwise", [name], signature=sig)
    before = [k("a", "1"), k("b", "2"), k("c", "3")]
    after = [k("a2", "1"), k("new", "9"), k("c2", "3")]
    assert [(m.status, m.before and m.before.name, m.after and m.after.name)
            for m in match_kernels(before, after)] == [
        ("unchanged", "a", "a2"), ("removed", "b", None), ("added", None, "new"), ("unchanged", "c", "c2")]

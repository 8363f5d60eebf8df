"""graph-diff on tensor-parallel code: collectives as their own kind, per-rank output code,
and the FX check that no rewrite moves computation across a wait_tensor (synthetic input;
real two-process code is covered in test_tensor_parallel.py)."""

import json
import textwrap

import pytest
import torch
import torch.fx as fx

from fusewright.tools.cli import main as cli_main
from fusewright.tools.fx_diff import collective_changes, collective_fingerprint
from fusewright.tools.graph_diff import GraphDiffError, check_expectations, offline_diff, single_report
from fusewright.tools.output_code import parse_output_code
from fusewright.tools.output_code_files import load_output_codes, split_log_ranks

# ----------------------------------------------------------------------------- synthetic output code
_HEADER = """\
# AOT ID: ['0_inference']
import torch
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.select_algorithm import extern_kernels
aten = torch.ops.aten
assert_size_stride = torch._C._dynamo.guards.assert_size_stride
empty_strided_cuda = torch._C._dynamo.guards._empty_strided_cuda
empty_strided_cpu = torch._C._dynamo.guards._empty_strided_cpu
reinterpret_tensor = torch._C._dynamo.guards._reinterpret_tensor
async_compile = AsyncCompile()
"""

_TRITON_NOOP = """\
triton_poi_fused__to_copy_view_0 = async_compile.triton('triton_poi_fused__to_copy_view_0', '''
import triton
import triton.language as tl
from torch._inductor.runtime import triton_helpers, triton_heuristics
@triton_heuristics.pointwise(
    size_hints={'x': 2048}, filename=__file__,
    triton_meta={'signature': {'in_ptr0': '*bf16', 'out_ptr0': '*bf16', 'xnumel': 'i32', 'XBLOCK': 'constexpr'}},
    inductor_meta={'kernel_name': 'triton_poi_fused__to_copy_view_0'},
)
@triton.jit
def triton_poi_fused__to_copy_view_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 2048
    xoffset = tl.program_id(0) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:]
    x0 = xindex
    tmp0 = tl.load(in_ptr0 + (x0), None).to(tl.float32)
    tmp1 = tmp0.to(tl.bfloat16)
    tl.store(out_ptr0 + (x0), tmp1, None)
''', device_str='cuda')
"""

_TRITON_ADD = """\
triton_poi_fused_add_1 = async_compile.triton('triton_poi_fused_add_1', '''
import triton
import triton.language as tl
from torch._inductor.runtime import triton_helpers, triton_heuristics
@triton_heuristics.pointwise(
    size_hints={'x': 2048}, filename=__file__,
    triton_meta={'signature': {'in_out_ptr0': '*bf16', 'in_ptr0': '*bf16', 'xnumel': 'i32', 'XBLOCK': 'constexpr'}},
    inductor_meta={'kernel_name': 'triton_poi_fused_add_1'},
)
@triton.jit
def triton_poi_fused_add_1(in_out_ptr0, in_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 2048
    xoffset = tl.program_id(0) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:]
    x0 = xindex
    tmp0 = tl.load(in_out_ptr0 + (x0), None).to(tl.float32)
    tmp1 = tl.load(in_ptr0 + (x0), None).to(tl.float32)
    tmp2 = tmp0 + tmp1
    tl.store(in_out_ptr0 + (x0), tmp2, None)
''', device_str='cuda')
"""


def triton_code(*, noop: bool = True, shape=(16, 128), reduce_op="sum", extra_collective: bool = False,
                gather: bool = True) -> str:
    """Output code in the form Inductor writes for a TP layer on CUDA: a matmul, an in-place
    all-reduce and its wait, an optional no-op round trip in front of an opaque op, a residual
    add, and (optionally) an all-gather returning a new buffer."""
    n = shape[0] * shape[1]
    calls = [
        "buf0 = empty_strided_cuda(%r, (%d, 1), torch.bfloat16)" % (shape, shape[1]),
        "extern_kernels.mm(arg0_1, arg1_1, out=buf0)",
        "# Topologically Sorted Source Nodes: [tensor], Original ATen: [_c10d_functional.all_reduce]",
        f"torch.ops._c10d_functional.all_reduce_.default(buf0, '{reduce_op}', '0')",
        "# Topologically Sorted Source Nodes: [wait_tensor], Original ATen: [_c10d_functional.wait_tensor]",
        "torch.ops._c10d_functional.wait_tensor.default(buf0)",
    ]
    if extra_collective:
        calls += ["torch.ops._c10d_functional.all_reduce_.default(buf0, 'sum', '0')",
                  "torch.ops._c10d_functional.wait_tensor.default(buf0)"]
    if noop:
        calls += [f"buf1 = empty_strided_cuda({shape!r}, ({shape[1]}, 1), torch.bfloat16)",
                  f"triton_poi_fused__to_copy_view_0.run(buf0, buf1, {n}, stream=stream0)",
                  "buf2 = torch.ops.fw.opaque.default(buf1)"]
    else:
        calls += ["buf2 = torch.ops.fw.opaque.default(buf0)"]
    calls += [f"assert_size_stride(buf2, {shape!r}, ({shape[1]}, 1))",
              f"triton_poi_fused_add_1.run(buf2, arg0_1, {n}, stream=stream0)"]
    ret = "buf2"
    if gather:
        calls += ["buf3 = torch.ops._c10d_functional.all_gather_into_tensor.default(buf2, 2, '0')",
                  "buf4 = torch.ops._c10d_functional.wait_tensor.default(buf3)"]
        ret = "buf3"
    body = "\n".join("        " + c for c in calls)
    return (_HEADER + _TRITON_NOOP + _TRITON_ADD + "async_compile.wait(globals())\n" + textwrap.dedent(f"""\
        def call(args):
            arg0_1, arg1_1 = args
            args.clear()
            assert_size_stride(arg0_1, {shape!r}, ({shape[1]}, 1))
            with torch.cuda._DeviceGuard(0):
                stream0 = get_raw_stream(0)
        """) + body + f"\n    return ({ret}, )\n")


def cpp_code() -> str:
    """The C++ (CPU) form: a cpp_pybinding kernel, the same collective calls."""
    kernel = '''cpp_fused_add_0 = async_compile.cpp_pybinding(['at::BFloat16*', 'const at::BFloat16*'], r\'\'\'
#include "cpp_prefix.h"
extern "C"  void kernel(at::BFloat16* in_out_ptr0, const at::BFloat16* in_ptr0)
{
    for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(2048L); x0+=static_cast<int64_t>(1L))
    {
        auto tmp0 = in_out_ptr0[static_cast<int64_t>(x0)];
        auto tmp1 = in_ptr0[static_cast<int64_t>(x0)];
        auto tmp2 = static_cast<float>(tmp0);
        auto tmp3 = static_cast<float>(tmp1);
        auto tmp4 = decltype(tmp2)(tmp2 + tmp3);
        auto tmp5 = c10::convert<at::BFloat16>(tmp4);
        in_out_ptr0[static_cast<int64_t>(x0)] = tmp5;
    }
}
\'\'\')
'''
    return _HEADER + kernel + "async_compile.wait(globals())\n" + textwrap.dedent("""\
        def call(args):
            arg0_1, arg1_1 = args
            args.clear()
            buf0 = empty_strided_cpu((16, 128), (128, 1), torch.bfloat16)
            extern_kernels.mm(arg0_1, arg1_1, out=buf0)
            # Topologically Sorted Source Nodes: [tensor], Original ATen: [_c10d_functional.all_reduce]
            torch.ops._c10d_functional.all_reduce_.default(buf0, 'sum', '0')
            torch.ops._c10d_functional.wait_tensor.default(buf0)
            buf1 = torch.ops._c10d_functional.reduce_scatter_tensor.default(buf0, 'sum', 2, '0')
            buf2 = torch.ops._c10d_functional.wait_tensor.default(buf1)
            cpp_fused_add_0(buf0, arg0_1)
            return (buf0, buf2, )
        """)


def test_collectives_are_their_own_kind_triton():
    ks = parse_output_code(triton_code()).kernels
    kinds = [(k.kind, k.name) for k in ks]
    assert ("extern", "mm") in kinds
    colls = [k for k in ks if k.kind == "collective"]
    assert [k.name for k in colls] == ["_c10d_functional.all_reduce_", "_c10d_functional.wait_tensor",
                                       "_c10d_functional.all_gather_into_tensor", "_c10d_functional.wait_tensor"]
    ar = colls[0]
    assert ar.collective == {"op": "all_reduce_", "args": ["'sum'", "'0'"], "tensors": ["(16, 128):bf16"]}
    # in place: the all-reduce and the wait (re)define buf0, so the dataflow runs through them
    assert ar.writes == ["buf0"] and colls[1].writes == ["buf0"]
    assert colls[2].writes == ["buf3"] and colls[2].collective["args"] == ["2", "'0'"]
    assert not any(k.is_noop for k in colls)
    assert [k.is_noop for k in ks if k.kind.startswith("triton")] == [True, False]


def test_collectives_are_their_own_kind_cpp():
    ks = parse_output_code(cpp_code()).kernels
    assert [k.kind for k in ks] == ["extern", "collective", "collective", "collective", "collective", "cpp"]
    rs = ks[3]
    assert rs.name == "_c10d_functional.reduce_scatter_tensor"
    assert rs.collective["args"] == ["'sum'", "2", "'0'"] and rs.writes == ["buf1"]


def test_extern_spelling_of_a_collective_is_not_an_extern_kernel():
    code = triton_code().replace("torch.ops._c10d_functional.all_reduce_.default(",
                                 "extern_kernels._c10d_functional.all_reduce_(")
    ks = parse_output_code(code).kernels
    assert [k.kind for k in ks if "all_reduce" in k.name] == ["collective"]
    assert sum(k.kind == "extern" for k in ks) == 1  # the mm only


def _write_ranks(root, codes_by_rank):
    for rank, code in codes_by_rank.items():
        d = root / f"rank{rank}"
        d.mkdir(parents=True)
        (d / "output_code.py").write_text(code)
    return str(root)


def test_rewrite_that_leaves_collectives_alone_pairs_them_unchanged(tmp_path):
    before = _write_ranks(tmp_path / "before", {0: triton_code(), 1: triton_code()})
    after = _write_ranks(tmp_path / "after", {0: triton_code(noop=False), 1: triton_code(noop=False)})
    report = offline_diff(before, after)
    assert set(report.rank_reports) == {"0", "1"}
    for sub in report.rank_reports.values():
        removed = [m.before.name for m in sub.kernel_diff if m.status == "removed"]
        assert removed == ["triton_poi_fused__to_copy_view_0"]  # the no-op copy, nothing else
        assert sub.counts("added") == 0
        statuses = {m.status for m in sub.kernel_diff if (m.after or m.before).kind == "collective"}
        assert statuses == {"unchanged"}
    c = report.collectives()
    assert c["ok"] and c["before_count"] == c["after_count"] == 8 and c["unchanged"] == 8
    assert check_expectations(report) == []
    d = report.to_dict()
    # the fixed keys stay, per-rank sections are added
    assert d["before"]["kernel_count"] == 16 and d["after"]["kernel_count"] == 14
    assert d["before"]["ranks"] == ["0", "1"]
    assert set(d["ranks"]) == {"0", "1"}
    assert d["ranks"]["1"]["kernel_diff"]["removed"] == 1 and d["ranks"]["1"]["rank"] == "1"
    assert d["ranks"]["0"]["after"]["noop_kernel_count"] == 0
    assert {k["rank"] for k in d["before"]["kernels"]} == {"0", "1"}
    json.dumps(d)


@pytest.mark.parametrize("change, words", [
    (dict(gather=False), "all_gather_into_tensor((16, 128):?, 2, '0') disappeared"),
    (dict(extra_collective=True), "appeared"),
    (dict(reduce_op="avg"), "collective changed: _c10d_functional.all_reduce_((16, 128):bf16, 'sum', '0') -> "
                            "_c10d_functional.all_reduce_((16, 128):bf16, 'avg', '0')"),
    (dict(shape=(16, 256)), "collective changed"),
])
def test_a_changed_collective_is_flagged(tmp_path, change, words):
    before = _write_ranks(tmp_path / "before", {0: triton_code(), 1: triton_code()})
    after = _write_ranks(tmp_path / "after", {0: triton_code(), 1: triton_code(**change)})
    report = offline_diff(before, after)
    c = report.collectives()
    assert not c["ok"]
    assert all(p.startswith("rank 1, graph 0: ") for p in c["problems"]), c["problems"]
    assert any(words in p for p in c["problems"]), c["problems"]
    assert report.rank_reports["0"].collectives()["ok"]
    unmet = check_expectations(report)
    assert unmet and all(u.startswith("collectives changed: rank 1") for u in unmet)
    assert check_expectations(report, collectives_unchanged=False) == []


def test_cli_fails_loudly_on_a_changed_collective(tmp_path, capsys):
    before = _write_ranks(tmp_path / "before", {0: triton_code(), 1: triton_code()})
    after = _write_ranks(tmp_path / "after", {0: triton_code(noop=False), 1: triton_code(gather=False)})
    out = tmp_path / "r.json"
    assert cli_main(["graph-diff", before, after, "--json", str(out)]) == 1
    printed = capsys.readouterr()
    assert "COLLECTIVES CHANGED" in printed.out and "rank 1" in printed.out
    assert "expectation unmet: collectives changed: rank 1, graph 0" in printed.err
    data = json.loads(out.read_text())
    assert data["collectives"]["ok"] is False and data["ranks"]["0"]["collectives"]["ok"] is True
    assert cli_main(["graph-diff", before, after, "--allow-collective-changes"]) == 0
    capsys.readouterr()
    # one rank only: rank 0's diff has untouched collectives
    assert cli_main(["graph-diff", before, after, "--rank", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "(rank 0)" in printed.out and "collectives: 4 -> 4, all unchanged" in printed.out
    data = json.loads(out.read_text())
    assert data["rank"] == "0" and "ranks" not in data and data["before"]["kernel_count"] == 8
    assert cli_main(["graph-diff", before, after, "--rank", "7"]) == 2
    assert "no such rank" in capsys.readouterr().err


def test_sides_with_different_ranks_are_bad_input(tmp_path):
    before = _write_ranks(tmp_path / "before", {0: triton_code(), 1: triton_code()})
    after = _write_ranks(tmp_path / "after", {0: triton_code()})
    with pytest.raises(GraphDiffError, match="different ranks"):
        offline_diff(before, after)
    assert offline_diff(before, after, rank=0).rank == "0"
    # one process on each side, ranked or not (a rank-1 dump against a plain file): one plain diff
    plain = tmp_path / "plain.py"
    plain.write_text(triton_code(noop=False))
    one = offline_diff(str(tmp_path / "before" / "rank1"), str(plain))
    assert not one.rank_reports and one.counts("removed") == 1
    one = offline_diff(str(tmp_path / "before"), str(plain), rank=1)
    assert one.rank == "1"
    flat = tmp_path / "flat.py"
    flat.write_text(triton_code())
    with pytest.raises(GraphDiffError, match="no per-rank output code"):
        single_report(str(flat), rank=0)


# ----------------------------------------------------------------------------- where ranks come from
def _log(rank_modules, interleave=True):
    """A TORCH_LOGS=output_code log of several processes writing one stream, records interleaved."""
    records = []
    for rank, module in rank_modules:
        head = f"[rank{rank}]:V1122 08:00:0{rank}.000000 1234{rank} torch/_inductor/graph.py:2722] [0/0] " \
               "[__output_code] Output code: "
        records.append((rank, [head, *module.splitlines()]))
        records.append((rank, [f"[rank{rank}]:W1122 08:00:09.000000 1234{rank} torch/_dynamo/x.py:1] unrelated"]))
    lines = [line for _, rec in records for line in rec]
    return "\n".join(lines) + "\n"


def test_log_with_rank_prefixes_splits_by_rank(tmp_path):
    text = _log([(1, triton_code(gather=False)), (0, triton_code()), (1, cpp_code())])
    assert [r for r, _ in split_log_ranks(text)] == ["1", "1", "0"]
    log = tmp_path / "out.log"
    log.write_text(text)
    codes = load_output_codes(log)
    assert sorted((c.rank, c.kernels[0].graph) for c in codes) == [("0", 0), ("1", 0), ("1", 1)]
    report = single_report(str(log))
    assert set(report.rank_reports) == {"0", "1"}
    assert len(report.rank_reports["1"].before.codes) == 2
    assert report.to_dict()["ranks"]["0"]["collectives"]["before_count"] == 4
    # torchrun --tee prefixes every line with [defaultN]:
    teed = tmp_path / "teed.log"
    teed.write_text("\n".join(f"[default0]:{line}" for line in _log([(0, triton_code())]).splitlines()))
    assert [c.rank for c in load_output_codes(teed)] == ["0"]


def test_rank_from_paths(tmp_path):
    for rel in ("rank_0/a/output_code.py", "x/rank-1/output_code.py", "logs/attempt_0/2/g/output_code.py",
                "logs/attempt_0/3/h/output_code.py"):
        f = tmp_path / "t" / rel
        f.parent.mkdir(parents=True)
        f.write_text(triton_code())
    assert sorted(c.rank for c in load_output_codes(tmp_path / "t")) == ["0", "1", "2", "3"]
    f = tmp_path / "output_code_rank1.py"
    f.write_text(triton_code())
    assert load_output_codes(f)[0].rank == "1"


def test_torch_compile_debug_pid_dirs(tmp_path):
    root = tmp_path / "torch_compile_debug"
    for pid in ("111", "222"):
        d = root / f"run_2026_11_22_08_03_55_0-pid_{pid}" / "torchinductor" / "model__0_inference_0.0"
        d.mkdir(parents=True)
        (d / "output_code.py").write_text(triton_code())
    # without the trace logs the ranks are unknown: labelled by pid
    assert sorted(c.rank for c in load_output_codes(root)) == ["pid 111", "pid 222"]
    (root / "tlparse").mkdir()
    for rank, pid in (("0", "222"), ("1", "111")):
        (root / "tlparse" / f"dedicated_log_torch_trace_rank_{rank}_abc.log").write_text(
            f'V1122 08:03:55.850000 {pid} torch/_dynamo/utils.py:2350] {{"rank": {rank}}}\n')
    codes = load_output_codes(root)
    assert sorted((c.rank, "pid_222" in c.label) for c in codes) == [("0", True), ("1", False)]
    # one process's debug directory is not per-rank code
    single = tmp_path / "one" / "run_2026-pid_5" / "torchinductor" / "m.0"
    single.mkdir(parents=True)
    (single / "output_code.py").write_text(triton_code())
    assert [c.rank for c in load_output_codes(tmp_path / "one")] == [None]


# ----------------------------------------------------------------------------- FX: nothing crosses a wait
def _tp_graph(variant: str = "plain") -> fx.Graph:
    """x -> mm -> all_reduce -> wait -> (+ residual x) -> out, spelled as post-grad graphs spell it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c10d = torch.ops._c10d_functional
    aten = torch.ops.aten
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    mode = FakeTensorMode()
    with mode:
        xv, wv = torch.empty(16, 128, dtype=torch.bfloat16), torch.empty(128, 128, dtype=torch.bfloat16)
    x.meta["val"], w.meta["val"] = xv, wv

    def call(target, *args):
        node = g.call_function(target, args)
        with mode:
            vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
            if target is c10d.all_reduce.default or target is c10d.wait_tensor.default:
                node.meta["val"] = torch.empty_like(vals[0])
            else:
                node.meta["val"] = target(*vals)
        return node

    if variant == "upstream_rewrite":  # a rewrite in front of the matmul (a fused norm, say): allowed
        scaled = call(aten.div.Tensor, x, 1.0)
    else:
        scaled = call(aten.mul.Tensor, x, 1.0)
    mm = call(aten.mm.default, scaled, w)
    if variant == "moved_add":  # the residual add moved in front of the all-reduce
        mm = call(aten.add.Tensor, mm, x)
    if variant == "new_node_in_front":  # computation created in front of the all-reduce
        mm = call(aten.sub.Tensor, mm, x)
    if variant == "widened":  # communicates f32 instead of bf16
        mm = call(torch.ops.prims.convert_element_type.default, mm, torch.float32)
    ar = call(c10d.all_reduce.default, mm, "sum", "0")
    wait = call(c10d.wait_tensor.default, ar)
    if variant == "widened":
        wait = call(torch.ops.prims.convert_element_type.default, wait, torch.bfloat16)
    if variant == "read_before_wait":
        out = call(aten.add.Tensor, ar, x)
    elif variant == "moved_add":
        out = wait
    else:
        out = call(aten.add.Tensor, wait, x)
    g.output((out,))
    g.lint()
    return g


def test_fingerprint_of_a_tp_graph():
    fp = collective_fingerprint(_tp_graph())
    [c] = fp["collectives"]
    assert c["op"] == "_c10d_functional.all_reduce" and c["args"] == ["'sum'", "'0'"]
    assert c["sends"] == ["bfloat16[16, 128] stride [128, 1]"]
    assert c["after_waits"] == [] and c["from_inputs"] == [0, 1]
    assert c["read_by"] == ["_c10d_functional.wait_tensor"]
    assert fp["waits"] == [{"on": 0}] and fp["outputs"] == [[0]]


def test_no_change_and_upstream_rewrites_pass():
    assert collective_changes(_tp_graph(), _tp_graph()) == []
    assert collective_changes(_tp_graph(), _tp_graph("upstream_rewrite")) == []


@pytest.mark.parametrize("variant, words", [
    ("moved_add", "add_tensor (add.Tensor) moved: now after waits [], feeding collectives [0], was after "
                  "waits [0], feeding collectives []"),
    ("widened", "sends ['float32[16, 128]"),
    ("read_before_wait", "read before its wait_tensor"),
    ("new_node_in_front", "new node sub_tensor (sub.Tensor) after waits [], feeding collectives [0], where the "
                          "rewrite removed nothing"),
])
def test_moving_computation_across_a_collective_is_caught(variant, words):
    problems = collective_changes(_tp_graph(), _tp_graph(variant))
    assert any(words in p for p in problems), problems


def test_same_f32_constant_spelled_two_ways_is_the_same_kernel():
    """Stock Inductor writes `1e-06`, a rewrite's lowering the f32 value it computed
    (`9.999999974752427e-07`): the same constant, so the same kernel (seen on the H200)."""
    def kernel(eps: str) -> str:
        return (_TRITON_ADD.replace("tmp2 = tmp0 + tmp1", f"tmp2 = tmp0 + tl.full([1], {eps}, tl.float32)")
                .replace("triton_poi_fused_add_1", "triton_poi_fused_add_7"))

    def signature(eps: str) -> str:
        code = triton_code(noop=False, gather=False).replace(_TRITON_ADD, kernel(eps)).replace(
            "triton_poi_fused_add_1.run", "triton_poi_fused_add_7.run")
        [k] = [k for k in parse_output_code(code).kernels if k.kind == "triton_pointwise"]
        return k.signature

    assert signature("1e-06") == signature("9.999999974752427e-07")
    assert signature("1e-06") != signature("2e-06")


def test_directory_without_ranks_is_plain_code(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "output_code.py").write_text(triton_code())
    codes = load_output_codes(tmp_path)
    assert [c.rank for c in codes] == [None, None] and [c.kernels[0].graph for c in codes] == [0, 1]
    assert not single_report(str(tmp_path)).rank_reports


def test_unstated_shape_or_dtype_is_not_a_change(tmp_path):
    """A tensor whose dtype one side's code does not state (an opaque op's result) still pairs."""
    before = triton_code()
    after = triton_code(noop=False).replace("assert_size_stride(buf2, (16, 128), (128, 1))", "")
    report = offline_diff(*(_write_ranks(tmp_path / n, {0: c}) for n, c in (("b", before), ("a", after))))
    gathers = [m for m in report.kernel_diff if m.after is not None and "all_gather" in m.after.name]
    assert gathers[0].before.collective["tensors"] == ["(16, 128):?"]
    assert gathers[0].after.collective["tensors"] == ["?:?"]
    assert gathers[0].status == "unchanged" and report.collectives()["ok"]


def test_rank_placeholder_in_output_paths(tmp_path, capsys):
    before = _write_ranks(tmp_path / "before", {0: triton_code(), 1: triton_code()})
    after = _write_ranks(tmp_path / "after", {0: triton_code(noop=False), 1: triton_code(noop=False)})
    assert cli_main(["graph-diff", before, after, "--rank", "1", "--json", str(tmp_path / "d_{rank}.json")]) == 0
    assert cli_main(["graph-diff", before, after, "--json", str(tmp_path / "d_{rank}.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "d_1.json").read_text())["rank"] == "1"
    assert set(json.loads((tmp_path / "d_all.json").read_text())["ranks"]) == {"0", "1"}


def test_live_graph_diff_under_torchrun(tmp_path):
    """`torchrun ... fusewright graph-diff tp_example:tp_layer`: each rank compiles its shard,
    diffs it (FX collective check included) and writes its own report."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusewright",
           "graph-diff", "fusewright.tools.tp_example:tp_layer", "--device", "cpu", "--expect-no-noop",
           "--json", str(tmp_path / "live_{rank}.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in ("0", "1"):
        d = json.loads((tmp_path / f"live_{rank}.json").read_text())
        assert d["rank"] == rank and d["mode"] == "live"
        assert d["rewrites"] == {"fuse_norm_quant": 2, "rewrite_rope": 0, "eliminate_noop_casts": 1,
                                  "fuse_act_quant": 0}  # matched; on CPU auto keeps the graph
        assert d["numerics"]["bitwise"] is True
        assert d["collectives"] == {**d["collectives"], "ok": True, "problems": [], "before_count": 4,
                                    "after_count": 4, "unchanged": 4}
        assert {k["rank"] for k in d["after"]["kernels"]} == {rank}

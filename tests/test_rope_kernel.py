"""The fused RoPE Triton kernel under TRITON_INTERPRET=1, and the op's checks and auto choice (CPU)."""

import pytest
import torch

from fusewright.lowering import registry, rope_lowering, rope_ops, rope_triton

BF16 = torch.bfloat16


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ai, bi = a.view(torch.int16).int(), b.view(torch.int16).int()
    ai = torch.where(ai < 0, -32768 - ai, ai)
    bi = torch.where(bi < 0, -32768 - bi, bi)
    return int((ai - bi).abs().max())


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


CASES = [
    # q shape, k heads (None: single tensor), tables: "full" (Wan, sliced inline) or "half"
    ((1, 9, 3, 16), 2, "full"),
    ((2, 5, 2, 12), 2, "half"),   # D/2 = 6: not a power of two, masked columns
    ((1, 7, 5, 32), None, "half"),
    ((3, 4, 16), 4, "half"),      # 3-D x: padded to 4-D
]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape,hk,tables", CASES)
def test_interpreted_kernel_within_one_ulp_of_reference(interpret, interleaved, shape, hk, tables):
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(shape, generator=g) * 4).to(BF16)
    k = None if hk is None else torch.randn(shape[:-2] + (hk, shape[-1]), generator=g).to(BF16)
    s, d = shape[-3], shape[-1]
    ang = torch.rand(s, 1, d // 2, generator=g) * 6.28
    if tables == "full":
        fc, fs = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        cos, sin = fc[..., 0::2], fs[..., 1::2]  # strided views, as Wan slices them
    else:
        cos, sin = ang.cos(), ang.sin()
    outs = rope_ops.run_interpreted(q, k, cos, sin, interleaved)
    for x, out in zip([q] + ([k] if k is not None else []), outs):
        ref = rope_ops.rope_reference(x, cos, sin, interleaved)
        # the interpreter truncates f32 -> bf16 where GPUs round to nearest even:
        # one ulp at most (tests/test_rope_gpu.py checks bitwise on CUDA)
        assert _ulps(out, ref) <= 1
        assert (out != ref).float().mean() < 0.75


def test_interpreted_kernel_small_blocks_and_strided_x(interpret):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 10, 16, generator=g).to(BF16).transpose(1, 2)  # [2, 10, 6, 16], strided
    cos, sin = torch.randn(1, 10, 1, 8, generator=g), torch.randn(1, 10, 1, 8, generator=g)
    # 16 elements per program: many programs, partial token and head blocks
    (out,) = rope_ops.run_interpreted(x, None, cos, sin, True, elems=64, max_block_h=4)
    assert _ulps(out, rope_ops.rope_reference(x, cos, sin, True)) <= 1


def test_per_head_tables(interpret):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 8, generator=g).to(BF16)
    cos, sin = torch.randn(1, 4, 3, 4, generator=g), torch.randn(1, 4, 3, 4, generator=g)
    (out,) = rope_ops.run_interpreted(q, None, cos, sin, False)
    assert _ulps(out, rope_ops.rope_reference(q, cos, sin, False)) <= 1


def test_launch_config_covers_every_head_and_token():
    cfg = rope_triton.launch_config(n_tok=75600, hq=40, hk=40, half=64)
    assert cfg["BLOCK_T"] * cfg["NTB"] >= 75600
    assert cfg["NQB"] * cfg["BLOCK_H"] >= 40 and cfg["NHB"] == 2 * cfg["NQB"]
    assert cfg["grid"] == (cfg["NTB"] * cfg["NHB"],)
    cfg = rope_triton.launch_config(n_tok=3, hq=5, hk=1, half=6)
    assert cfg["BLOCK_HALF"] == 8 and cfg["BLOCK_T"] <= 4 and cfg["NHB"] == cfg["NQB"] + 1
    assert cfg["grid"] == (cfg["NTB"] * cfg["NHB"],)


def test_blocks_that_do_not_divide_the_shape_cover_every_row(interpret):
    # 7 tokens, 5 q heads, 3 k heads, 2 heads and 2 tokens per program: partial blocks on
    # both axes, and k with fewer heads than q in the same launch
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 7, 5, 8, generator=g).to(BF16)
    k = torch.randn(1, 7, 3, 8, generator=g).to(BF16)
    cos, sin = torch.randn(1, 7, 1, 4, generator=g), torch.randn(1, 7, 1, 4, generator=g)
    qo, ko = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    rope_triton.launch(rope_triton.interpreted_kernel(), q, qo, k, ko, cos.expand(1, 7, 5, 4),
                       sin.expand(1, 7, 5, 4), interleaved=True, elems=32, max_block_h=2)
    # a row no program wrote would still be NaN: a huge ulp distance
    assert _ulps(qo, rope_ops.rope_reference(q, cos, sin, True)) <= 1
    assert _ulps(ko, rope_ops.rope_reference(k, cos, sin, True)) <= 1


def test_op_cpu_impl_is_the_reference_and_checks_inputs():
    x = torch.randn(1, 3, 2, 8).to(BF16)
    cos, sin = torch.randn(3, 1, 4), torch.randn(3, 1, 4)
    assert torch.equal(torch.ops.fusewright.rope(x, cos, sin, True), rope_ops.rope_reference(x, cos, sin, True))
    with pytest.raises(ValueError, match="even last dim"):
        torch.ops.fusewright.rope(torch.randn(1, 3, 2, 7), cos, sin, True)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.fusewright.rope(x, torch.randn(5, 1, 4), sin, True)
    with pytest.raises(ValueError, match="must share"):
        torch.ops.fusewright.rope_qk(x, torch.randn(1, 3, 2, 8), cos, sin, True)  # dtype differs


def test_reference_interleaved_matches_the_writeback_it_replaces():
    x = torch.randn(2, 5, 3, 8).to(BF16)
    cos, sin = torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    assert torch.equal(rope_ops.rope_reference(x, cos, sin, True), out)


# ------------------------------------------------------------------ auto
def _call(elements_per_head=64, heads=2, seq=8, device="cpu", rotation="f32"):
    from fusewright.lowering.registry import TensorInfo

    x = TensorInfo((1, seq, heads, elements_per_head), BF16, device)
    t = TensorInfo((1, seq, 1, elements_per_head // 2), torch.float32, device)
    return rope_lowering.op_call(x, t, t, interleaved=True, rotation=rotation)


def test_auto_uses_measured_rows_for_a_known_device(monkeypatch):
    table = {
        "measured": {"Fake GPU": [
            {"elements": 1000, "us": {"none": 3.0, "aten": 2.0, "triton": 1.0}},
            {"elements": 10**7, "us": {"none": 1.0, "aten": 1.02, "triton": 2.0}},
        ]},
        "rules": {},
    }
    monkeypatch.setattr(rope_lowering, "load_table", lambda: table)
    small = _call(elements_per_head=64, heads=2, seq=8, device="cuda")   # 1024 elements
    assert rope_lowering.shipped_choice_for_call(small, "Fake GPU", ("none", "aten", "triton"))[0] == "triton"
    # the kernel not supported for this call: the fastest of the others
    assert rope_lowering.shipped_choice_for_call(small, "Fake GPU", ("none", "aten"))[0] == "aten"
    big = _call(elements_per_head=128, heads=40, seq=2048, device="cuda")
    choice, why = rope_lowering.shipped_choice_for_call(big, "Fake GPU", ("none", "aten", "triton"))
    # within 3% of the fastest, the rule order for CUDA (aten first) decides
    assert choice == "aten" and "measured on Fake GPU at 10000000 elements" in why
    # a candidate the table never measured (a user's implementation): no answer, auto measures
    assert rope_lowering.shipped_choice_for_call(big, "Fake GPU", ("aten", "vendor")) is None
    assert rope_lowering.shipped_choice_for_call(big, "Other GPU", ("none", "aten")) is None


def test_h100_table_picks_the_kernel_where_it_is_clearly_faster():
    """The shipped H100 rows (session 3): the kernel from S=16384 on; at S=1024-4096 it is
    within 3% of aten and the rule order (aten first) decides; at S=256 aten is faster."""
    rows = rope_lowering.load_table()["measured"]["NVIDIA H100 80GB HBM3"]
    want = {256: "aten", 1024: "aten", 4096: "aten", 16384: "triton", 75600: "triton"}
    assert sorted(row["seq"] for row in rows) == sorted(want)
    for row in rows:
        heads, d = row["heads"], row["head_dim"]
        call = _call(elements_per_head=d, heads=heads, seq=row["seq"], device="cuda")
        choice, why = rope_lowering.shipped_choice_for_call(call, "NVIDIA H100 80GB HBM3", ("none", "aten", "triton"))
        assert choice == want[row["seq"]] and f"at {row['elements']} elements" in why
        # without the kernel, aten beats keeping the writeback at every size
        choice, _ = rope_lowering.shipped_choice_for_call(call, "NVIDIA H100 80GB HBM3", ("none", "aten"))
        assert choice == "aten"


def test_auto_rule_without_measurements_is_documented():
    table = rope_lowering.load_table()
    for backend in ("cuda", "cpu"):
        rule = table["rules"][backend]
        assert rule["with_kernel"] in ("triton", "aten", "none")
        assert rule["without_kernel"] in ("aten", "none")
        assert rule["why"] and "placeholder" not in rule["why"]
    cpu = rope_lowering.shipped_choice_for_call(_call(), "cpu:x86_64:whatever", ("none", "aten", "triton"))
    assert cpu[0] == "aten" and "rule for cpu (rope_auto.json)" in cpu[1]
    # a backend nobody measured: no shipped answer; the registry's rule keeps the writeback
    assert rope_lowering.shipped_choice_for_call(_call(device="meta"), "meta", ("none", "aten", "triton")) is None
    choice = registry.choose(_call(device="meta"), ("auto",))
    assert choice.name == "none" and "rule for meta: none,aten,triton" in choice.reason


def test_every_builtin_implementation_computes_the_reference_without_model_halves():
    """What `auto` measures: each implementation built from x, cos and sin alone."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, 3, 12, generator=g).to(BF16)
    cos, sin = torch.randn(1, 5, 1, 6, generator=g), torch.randn(1, 5, 1, 6, generator=g)
    for interleaved in (True, False):
        params = dict(rope_lowering.op_call(x, cos, sin, interleaved=interleaved, rotation="f32").params)
        want = rope_ops.rope_reference(x, cos, sin, interleaved)
        for name, impl in registry.implementations("rope").items():
            got = impl.run({"x": x, "cos": cos, "sin": sin}, params)
            assert torch.equal(got, want), (name, interleaved)


def test_triton_supports_says_why_not():
    impl = registry.implementations("rope")["triton"]
    assert impl.supports(_call()) is None
    assert "not identified" in impl.supports(_call(rotation="not_identified"))
    assert "numerics='fast'" in impl.supports(_call(rotation="rounds_between_steps"))
    assert registry.implementations("rope")["aten"].supports(_call(rotation="not_identified")) is None


def test_auto_table_and_implementations_are_part_of_the_inductor_cache_key():
    from fusewright.passes.rope import PASS

    files = PASS.source_files()
    assert rope_lowering.TABLE_PATH in files
    assert any(f.endswith("patterns/rope.py") for f in files) and any(f.endswith("rope_triton.py") for f in files)
    assert any(f.endswith("rope_lowering.py") for f in files)
    # the fused implementation's uuid covers the kernel source, not only the build's module
    assert any(str(p).endswith("rope_triton.py") for p in registry.implementations("rope")["triton"].source)

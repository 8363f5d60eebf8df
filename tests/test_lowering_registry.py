"""The lowering registry: implementations, priority lists, `auto` (fake timer, disk cache, processes)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusewright import FusewrightPassManager, PassConfig
from fusewright.lowering import auto, registry
from fusewright.lowering.registry import OpCall, TensorInfo, choose

aten = torch.ops.aten
pytestmark = pytest.mark.usefixtures("no_env_config")


def cuda_call(rows=4096, hidden=4096, dtype=torch.bfloat16):
    """A call described on a CUDA device (only metadata: no CUDA needed)."""
    return OpCall.make("rms_norm", {"x": TensorInfo((rows, hidden), dtype, "cuda", (hidden, 1)),
                                    "weight": TensorInfo((hidden,), dtype, "cuda", (1,))},
                       eps=1e-6, dtype="bfloat16")


def _scale(emit, t, p):
    return emit(aten.mul.Tensor, t["x"], 2.0)


@pytest.fixture
def extra_impls():
    """Two extra rms_norm implementations (the math is irrelevant here: only choosing is tested)."""
    before = registry.implementations("rms_norm")
    made = [registry.register("rms_norm", "triton", _scale, replace=True),
            registry.register("rms_norm", "vendor", _scale, supports=lambda c: c.device_type == "cuda" or "needs CUDA",
                              replace=True)]
    yield made
    for impl in made:
        registry.unregister("rms_norm", impl.name)
        old = before.get(impl.name)
        if old is not None:  # the built-in triton implementation
            registry.register(old.op, old.name, old.build, supports=old.supports_fn, version=old.version,
                              source=old.source, replace=True)


class FakeTimer:
    """A `Measurer` returning fixed times and counting its calls."""

    def __init__(self, times):
        self.times, self.calls = dict(times), 0

    def __call__(self, call, impls):
        self.calls += 1
        return {i.name: self.times[i.name] for i in impls}


# ---------------------------------------------------------------- built-in aten implementations
def test_aten_rms_norm_is_bitwise_the_eager_math():
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    impl = registry.implementations("rms_norm")["aten"]
    h = x.float()
    expected = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w
    assert torch.equal(impl.run({"x": x, "weight": w}, {"eps": 1e-6}), expected)
    assert torch.equal(impl.run({"x": x, "weight": None}, {"eps": 1e-6}),
                       (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype))


def test_aten_fused_add_rms_norm_rounds_the_sum_once():
    torch.manual_seed(0)
    x, r = torch.randn(2, 8, 64, dtype=torch.bfloat16), torch.randn(2, 8, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    impl = registry.implementations("fused_add_rms_norm")["aten"]
    y, s = impl.run({"x": x, "residual": r, "weight": w}, {"eps": 1e-5})
    assert torch.equal(s, x + r)
    h = s.float()
    assert torch.equal(y, (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w)


def test_aten_supports_checks():
    impl = registry.implementations("fused_add_rms_norm")["aten"]
    x = TensorInfo((4, 64), torch.bfloat16, "cpu")
    ok = OpCall.make("fused_add_rms_norm", {"x": x, "residual": x, "weight": None}, eps=1e-6)
    assert impl.supports(ok) is None
    bad = OpCall.make("fused_add_rms_norm", {"x": x, "residual": TensorInfo((4, 64), torch.float32, "cpu"),
                                             "weight": None}, eps=1e-6)
    assert "residual must have x's shape and dtype" in impl.supports(bad)
    ints = OpCall.make("rms_norm", {"x": TensorInfo((4, 64), torch.int8, "cpu"), "weight": None}, eps=1e-6)
    assert "float16/bfloat16/float32" in registry.implementations("rms_norm")["aten"].supports(ints)


# ---------------------------------------------------------------- registering
def test_register_errors():
    with pytest.raises(ValueError, match="already has an implementation named 'aten'"):
        registry.register("rms_norm", "aten", _scale)
    with pytest.raises(ValueError, match="not 'auto'"):
        registry.register("rms_norm", "auto", _scale)
    with pytest.raises(ValueError, match="letters, digits"):
        registry.register("rms_norm", "my-op", _scale)
    with pytest.raises(KeyError, match="unknown semantic op 'layer_norm'; known: rms_norm"):
        registry.register("layer_norm", "aten", _scale)


def test_uuid_covers_implementations_and_reaches_the_pass_manager():
    before, manager_before = registry.uuid(), FusewrightPassManager(PassConfig()).uuid()
    impl = registry.register("rms_norm", "vendor_uuid", _scale, version="1")
    try:
        assert registry.uuid() != before
        assert FusewrightPassManager(PassConfig()).uuid() != manager_before
        v2 = registry.register("rms_norm", "vendor_uuid", _scale, version="2", replace=True)
        assert v2.uuid() != impl.uuid()
    finally:
        registry.unregister("rms_norm", "vendor_uuid")
    assert registry.uuid() == before
    assert FusewrightPassManager(PassConfig()).uuid() == manager_before


def test_shape_class_buckets_rows_and_keeps_hidden_exact():
    assert cuda_call(rows=3000).shape_class() == cuda_call(rows=4096).shape_class()
    assert cuda_call(rows=3000).shape_class() != cuda_call(rows=5000).shape_class()
    assert cuda_call(hidden=4096).shape_class() != cuda_call(hidden=7168).shape_class()
    assert "x=bfloat16[4096x4096]" in cuda_call().shape_class()
    dyn = OpCall.make("rms_norm", {"x": TensorInfo((-1, 64), torch.float32, "cpu"), "weight": None}, eps=1e-6)
    assert "x=float32[dynx64]" in dyn.shape_class()


# ---------------------------------------------------------------- priority lists
def test_priority_picks_the_first_applicable(extra_impls):
    call = cuda_call()
    assert choose(call, ("vendor", "aten")).name == "vendor"
    cpu = OpCall.make("rms_norm", {"x": torch.empty(4, 64), "weight": None}, eps=1e-6)
    choice = choose(cpu, ("vendor", "aten"))
    assert choice.name == "aten"
    assert choice.reason == "vendor: needs CUDA; priority vendor,aten"
    assert choice.detail() == "rms_norm -> aten (vendor: needs CUDA; priority vendor,aten)"


def test_report_details_can_be_parsed_back(extra_impls):
    detail = "_C::rms_norm.default in auto_functionalized_v2: " + choose(cuda_call(), ("vendor",)).detail()
    assert registry.parse_detail(detail) == {
        "source": "_C::rms_norm.default in auto_functionalized_v2", "op": "rms_norm", "variant": "",
        "impl": "vendor", "reason": "priority vendor"}
    quant = registry.Choice(OpCall.make("rms_norm_quant", {"x": None}, variant="fp8_per_token"), None, "x: y (z)")
    assert registry.parse_detail(quant.detail()) == {"source": "", "op": "rms_norm_quant", "variant": "fp8_per_token",
                                                     "impl": "none", "reason": "x: y (z)"}
    assert registry.parse_detail("aten:strided") is None and registry.parse_detail("triton:launches") is None


def test_priority_with_nothing_applicable_says_why():
    call = cuda_call()
    choice = choose(call, ("vendor",))
    assert choice.impl is None and choice.name == "none"
    assert choice.reason == "vendor: not registered for rms_norm"
    cpu = OpCall.make("rms_norm", {"x": TensorInfo((4, 64), torch.bfloat16, "cpu", (64, 1)), "weight": None},
                      eps=1e-6)
    choice = choose(cpu, ("triton",))
    assert choice.impl is None and choice.reason.startswith("triton: the Triton kernel runs on CUDA")


@pytest.mark.parametrize("first", ["rms_norm_aten", "rms_norm_ops", "rope_lowering", "norm_quant_ops"])
def test_builtin_order_and_uuid_do_not_depend_on_which_module_is_imported_first(first):
    import subprocess
    import sys

    code = (f"import fusewright.lowering.{first}\n"
            "from fusewright.lowering import registry\n"
            "print({op: registry.implementation_names(op) for op in registry.SEMANTIC_OPS}, registry.uuid())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {op: registry.implementation_names(op) for op in registry.SEMANTIC_OPS}
    assert out.stdout.strip() == f"{names} {registry.uuid()}"


def test_builtin_implementations_are_registered_for_every_op():
    names = {op: registry.implementation_names(op) for op in registry.SEMANTIC_OPS}
    assert names["rms_norm"] == ("aten", "triton") and names["fused_add_rms_norm"] == ("aten", "triton")
    assert set(names["rms_norm_quant"]) == {"aten", "triton"}
    assert set(names["rope"]) == {"none", "aten", "triton"}
    # the fused rms_norm is chosen on CUDA when configured, and its uuid covers the kernel file
    assert choose(cuda_call(), ("triton", "aten")).name == "triton"
    triton_impl = registry.implementations("rms_norm")["triton"]
    assert any(str(p).endswith("rms_norm_triton.py") for p in triton_impl.source)


def test_broken_supports_is_a_reason_not_a_crash():
    registry.register("rms_norm", "broken", _scale, supports=lambda c: 1 / 0)
    try:
        choice = choose(cuda_call(), ("broken", "aten"))
        assert choice.name == "aten" and "supports() raised ZeroDivisionError" in choice.reason
    finally:
        registry.unregister("rms_norm", "broken")


# ---------------------------------------------------------------- auto
def test_auto_picks_the_measured_fastest_and_caches_it(extra_impls, tmp_path):
    timer = FakeTimer({"aten": 10e-6, "triton": 8e-6, "vendor": 5e-6})
    tuner = auto.Tuner(measure=timer, directory=tmp_path)
    choice = choose(cuda_call(), ("auto",), tuner=tuner)
    assert choice.name == "vendor" and timer.calls == 1
    assert "vendor 5.0us, triton 8.0us, aten 10.0us" in choice.reason
    # Another tuner (another process) reads the file instead of measuring.
    never = FakeTimer({})
    again = choose(cuda_call(rows=3000), ("auto",), tuner=auto.Tuner(measure=never, directory=tmp_path))
    assert again.name == "vendor" and never.calls == 0
    files = list(tmp_path.iterdir())
    entry = json.loads(next(p for p in files if p.suffix == ".json").read_text())
    assert entry["seconds"] == {"aten": 10e-6, "triton": 8e-6, "vendor": 5e-6}
    assert entry["key"]["shape_class"] == cuda_call().shape_class()
    assert set(entry["key"]) >= {"device", "torch", "triton", "cuda", "fusewright", "impls"}
    # Another shape class is measured on its own.
    choose(cuda_call(rows=100_000), ("auto",), tuner=tuner)
    assert timer.calls == 2


def test_auto_prefers_the_rule_order_only_within_3_percent(extra_impls, tmp_path):
    # rms_norm's rule prefers aten (decomposable) over triton
    near = FakeTimer({"aten": 1.02e-5, "triton": 1.00e-5, "vendor": 2e-5})
    assert choose(cuda_call(), ("auto",), tuner=auto.Tuner(measure=near, directory=tmp_path / "a")).name == "aten"
    far = FakeTimer({"aten": 1.04e-5, "triton": 1.00e-5, "vendor": 2e-5})
    assert choose(cuda_call(), ("auto",), tuner=auto.Tuner(measure=far, directory=tmp_path / "b")).name == "triton"


def test_auto_re_measures_when_an_implementation_changes(extra_impls, tmp_path):
    timer = FakeTimer({"aten": 1e-5, "triton": 2e-5, "vendor": 3e-5})
    tuner = auto.Tuner(measure=timer, directory=tmp_path)
    choose(cuda_call(), ("auto",), tuner=tuner)
    registry.register("rms_norm", "vendor", _scale, version="2", replace=True)
    choose(cuda_call(), ("auto",), tuner=tuner)
    assert timer.calls == 2


def test_auto_never_picks_an_implementation_that_failed_to_run(extra_impls, tmp_path):
    timer = FakeTimer({"aten": 9e-6, "triton": "RuntimeError: no kernel image", "vendor": 1e-5})
    choice = choose(cuda_call(), ("auto",), tuner=auto.Tuner(measure=timer, directory=tmp_path))
    assert choice.name == "aten" and "not measurable: triton" in choice.reason


def test_auto_falls_back_to_the_rule_when_measuring_fails_or_is_off(extra_impls, tmp_path, monkeypatch):
    def explodes(call, impls):
        raise RuntimeError("no GPU")

    choice = choose(cuda_call(), ("auto",), tuner=auto.Tuner(measure=explodes, directory=tmp_path))
    assert choice.name == "aten" and "rule for cuda: aten,triton,vendor" in choice.reason
    assert "RuntimeError: no GPU" in choice.reason
    # CPU: measuring is off by default, and the rule picks aten
    timer = FakeTimer({"aten": 1.0, "triton": 0.1})
    cpu = OpCall.make("rms_norm", {"x": torch.empty(4, 64), "weight": None}, eps=1e-6)
    choice = choose(cpu, ("auto",), tuner=auto.Tuner(measure=timer, directory=tmp_path))
    assert choice.name == "aten" and "measuring is off for this device" in choice.reason and timer.calls == 0
    # ... unless the environment turns it on
    monkeypatch.setenv(auto.ENV_MEASURE, "1")
    assert choose(cpu, ("auto",), tuner=auto.Tuner(measure=timer, directory=tmp_path)).name == "triton"
    monkeypatch.setenv(auto.ENV_MEASURE, "0")
    assert not auto.Tuner(measure=timer, directory=tmp_path).measuring("cuda")


def test_unusable_cache_directory_falls_back_to_the_rule(extra_impls, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    timer = FakeTimer({"aten": 1.0, "triton": 0.1, "vendor": 0.1})
    choice = choose(cuda_call(), ("auto",), tuner=auto.Tuner(measure=timer, directory=blocker / "sub"))
    assert choice.name == "aten" and "cache unusable" in choice.reason and timer.calls == 0


def test_shipped_measurements_answer_before_measuring(extra_impls, tmp_path):
    seen = []

    def hook(call, device):
        seen.append(device)
        return {4096: ("triton", "row T=4096"), 8192: ("nonexistent", "?")}.get(call.tensor("x").rows)

    timer = FakeTimer({"aten": 1e-6, "triton": 2e-6, "vendor": 3e-6})
    previous = auto.register_shipped("rms_norm", hook)
    try:
        tuner = auto.Tuner(measure=timer, directory=tmp_path)
        choice = choose(cuda_call(rows=4096), ("auto",), tuner=tuner)
        assert choice.name == "triton" and choice.reason == "auto: shipped measurement: row T=4096"
        assert timer.calls == 0 and seen == [auto.plain_device_name("cuda")]
        # a row naming an implementation that is not a candidate, or no row: measure as usual
        assert choose(cuda_call(rows=8192), ("auto",), tuner=tuner).name == "aten" and timer.calls == 1
        assert choose(cuda_call(rows=100), ("auto",), tuner=tuner).name == "aten" and timer.calls == 2
        off = auto.Tuner(measure=timer, directory=tmp_path / "off", shipped=False)
        assert choose(cuda_call(rows=4096), ("auto",), tuner=off).name == "aten"
    finally:
        auto.register_shipped("rms_norm", previous)


def test_rule_for_ops_that_prefer_a_fused_kernel_on_cuda():
    from fusewright.lowering.registry import semantic_op

    assert semantic_op("rms_norm_quant").rule_for("cuda") == ("triton", "aten")
    assert semantic_op("rms_norm_quant").rule_for("cpu") == ("aten",)
    assert semantic_op("rms_norm").rule_for("cuda") == ("aten", "triton")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["aten", "triton", "vendor", "other"]),
                       st.floats(1e-7, 1e-2, allow_nan=False), min_size=1),
       st.permutations(["aten", "triton", "vendor", "other"]))
def test_auto_never_picks_more_than_3_percent_slower(times, order):
    winner = auto.pick_measured(times, order)
    assert all(times[winner] <= t * (1 + auto.TOLERANCE) for t in times.values())
    # and within the band the rule order decides
    band = [n for n in order if n in times and times[n] <= min(times.values()) * (1 + auto.TOLERANCE)]
    assert winner == band[0]


def test_default_tuner_can_be_replaced(extra_impls, tmp_path):
    timer = FakeTimer({"aten": 3e-6, "triton": 1e-6, "vendor": 2e-6})
    previous = auto.set_default_tuner(auto.Tuner(measure=timer, directory=tmp_path))
    try:
        assert choose(cuda_call(), ("auto",)).name == "triton"
    finally:
        auto.set_default_tuner(previous)


# ---------------------------------------------------------------- several processes
_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from fusewright.lowering import auto, registry
    directory, log, go = sys.argv[1:4]
    registry.register("rms_norm", "mp_fast", lambda emit, t, p: t["x"])

    def measure(call, impls):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # long enough for every other process to arrive while this one measures
        return {"aten": 2e-6, "mp_fast": 1e-6}

    x = registry.TensorInfo((8192, 4096), torch.bfloat16, "cuda", (4096, 1))
    call = registry.OpCall.make("rms_norm", {"x": x, "weight": None}, eps=1e-6)
    tuner = auto.Tuner(measure=measure, directory=directory)
    open(go + f".{os.getpid()}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    print(json.dumps({"name": registry.choose(call, ("auto",), tuner=tuner).name}))
""")


def test_several_processes_measure_once_and_agree(tmp_path):
    cache, log, go = tmp_path / "cache", tmp_path / "measured.log", tmp_path / "go"
    env = dict(os.environ, FUSEWRIGHT_AUTO_MEASURE="")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), str(log), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()  # all are ready: they start choosing at the same moment
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert [json.loads(out)["name"] for out, _ in outs] == ["mp_fast"] * 3
    assert len(log.read_text().split()) == 1  # measured by one process only
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".json")]) == 1 and not [f for f in files if f.endswith(".tmp")]


# ---------------------------------------------------------------- the real measurer
def test_real_measurement_in_a_subprocess_on_cpu(tmp_path):
    """The default measurer compiles and times each implementation in a child process."""
    cpu = OpCall.make("rms_norm", {"x": TensorInfo((64, 128), torch.float32, "cpu", (128, 1)),
                                   "weight": TensorInfo((128,), torch.float32, "cpu", (1,))},
                      eps=1e-6, dtype="float32")
    impls = list(registry.implementations("rms_norm").values())
    seconds = auto.Tuner(directory=tmp_path, enabled=True).lookup(cpu, impls)["seconds"]
    assert isinstance(seconds["aten"], float) and 0 < seconds["aten"] < 1

"""The pass manager: cache key, chaining, undo on failure, strict mode, verify, reports."""

import logging
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

import fusewright
from fusewright import FusewrightPassManager, FusewrightWarning, PassConfig
from fusewright.passes.base import GraphPass
from fusewright.passes.graph_utils import insert_call
from fusewright.testing import compile_and_capture

pytestmark = pytest.mark.usefixtures("no_env_config")
aten = torch.ops.aten


def model(x):
    y = x * 2.0  # the line a failing pass should be traced back to
    return torch.relu(y) + 1


_captured = {}


def graph_of(fn, *inputs):
    """A fresh copy of `fn`'s post-grad graph (with stack traces), captured from one real compile."""
    from fusewright.passes.graph_utils import snapshot

    if fn not in _captured:
        _captured[fn] = compile_and_capture(fn, inputs, enable=False).graphs_before[0]
    return snapshot(_captured[fn])


class MulToAdd(GraphPass):
    """Test pass: turns `x * c` into `x + c` (changes results; verify must catch it)."""

    name = "mul_to_add"

    def run(self, graph, ctx):
        for node in list(graph.nodes):
            if node.target == aten.mul.Tensor:
                ctx.matched()
                with ctx.at(node), graph.inserting_before(node):
                    new = insert_call(graph, aten.add.Tensor, node.args, like=node)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                ctx.rewritten()


class Explodes(GraphPass):
    """Test pass: half-rewrites the graph, then raises."""

    name = "explodes"

    def run(self, graph, ctx):
        for node in list(graph.nodes):
            if node.target == aten.mul.Tensor:
                ctx.matched()
                with ctx.at(node):
                    node.target = aten.sub.Tensor  # damage first...
                    raise RuntimeError("boom")  # ...then fail


class BreaksLint(GraphPass):
    """Test pass: leaves a node that uses a value defined after it."""

    name = "breaks_lint"

    def run(self, graph, ctx):
        placeholder = next(iter(graph.nodes))
        last = list(graph.nodes)[-2]
        with graph.inserting_after(placeholder):
            graph.call_function(aten.neg.default, (last,))


class SkipsOne(GraphPass):
    name = "skips_one"

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.target == aten.relu.default)
        ctx.matched()
        ctx.skipped("test reason", node)


# ---------------------------------------------------------------- uuid
def test_uuid_changes_with_config():
    a = FusewrightPassManager(PassConfig(), passes=[MulToAdd()]).uuid()
    b = FusewrightPassManager(PassConfig(numerics="fast"), passes=[MulToAdd()]).uuid()
    assert a and b and a != b
    assert a == FusewrightPassManager(PassConfig(), passes=[MulToAdd()]).uuid()


def test_uuid_changes_with_pass_source(tmp_path, monkeypatch):
    src = tmp_path / "my_pass.py"
    src.write_text("# version 1\n")

    class FilePass(MulToAdd):
        name = "file_pass"

        def source_files(self):
            return [str(src)]

    before = FusewrightPassManager(PassConfig(), passes=[FilePass()]).uuid()
    src.write_text("# version 2\n")
    after = FusewrightPassManager(PassConfig(), passes=[FilePass()]).uuid()
    assert before != after


def test_uuid_covers_only_enabled_builtin_flags():
    on = FusewrightPassManager(PassConfig()).uuid()
    off = FusewrightPassManager(PassConfig(fuse_norm_quant=False, rewrite_rope=False)).uuid()
    assert on != off  # the config differs, so the key does


def test_uuid_equal_across_processes():
    code = "from fusewright import FusewrightPassManager as M, PassConfig as C; print(M(C()).uuid())"
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
           for _ in range(2)]
    # (Not compared with this process: tests here may register extra lowering
    # implementations, which rightly change the key.)
    assert out[0] == out[1] and len(out[0]) == 64


# ---------------------------------------------------------------- chaining
class UserPass(CustomGraphPass):
    def __init__(self, tag="v1"):
        self.tag, self.calls = tag, 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return f"user-pass-{self.tag}"


def test_inductor_options_chain_a_pass_the_user_installed():
    from torch._inductor import config as inductor_config

    user = UserPass()
    with inductor_config.patch(post_grad_custom_post_pass=user):
        options = fusewright.inductor_options()
        manager = options["post_grad_custom_post_pass"]
        assert manager.chained is user
        with inductor_config.patch(post_grad_custom_post_pass=UserPass("v2")):
            other = fusewright.inductor_options()["post_grad_custom_post_pass"]
        assert manager.uuid() != other.uuid()  # the user's uuid is part of ours
        # Installing fusewright again does not chain fusewright onto itself.
        with inductor_config.patch(options):
            again = fusewright.inductor_options()["post_grad_custom_post_pass"]
        assert again.chained is user
    graph = graph_of(model, torch.randn(4))
    manager(graph)
    assert user.calls == 1


def test_plain_callable_disables_the_cache_key():
    manager = FusewrightPassManager(PassConfig(), chained=lambda graph: None)
    assert manager.uuid() is None  # Inductor then bypasses its FX graph cache


def test_chained_user_pass_runs_in_a_real_compile():
    from torch._inductor import config as inductor_config

    user = UserPass()
    with inductor_config.patch(post_grad_custom_post_pass=user):
        options = fusewright.inductor_options()
    torch._dynamo.reset()
    torch.compile(model, options=options)(torch.randn(8))
    assert user.calls == 1
    assert fusewright.last_report().graphs == 1


# ---------------------------------------------------------------- safety
def test_failing_pass_leaves_graph_unchanged_and_warns():
    graph = graph_of(model, torch.randn(4))
    before = str(graph)
    manager = FusewrightPassManager(PassConfig(), passes=[Explodes()])
    with pytest.warns(FusewrightWarning) as record:
        manager(graph)
    assert str(graph) == before
    graph.lint()
    assert len(record) == 1
    message = str(record[0].message)
    assert "'explodes' failed" in message and "RuntimeError: boom" in message
    assert "test_manager.py" in message and "y = x * 2.0" in message  # the model source line
    stats = fusewright.last_report()["explodes"]
    assert stats.errors and stats.matched == 0  # counts of an undone pass are dropped


def test_a_failing_pass_keeps_the_rewrites_of_the_passes_before_it():
    graph = graph_of(model, torch.randn(4))
    expected = graph_of(model, torch.randn(4))
    FusewrightPassManager(PassConfig(), passes=[MulToAdd()])(expected)

    class ExplodesOnAdd(Explodes):
        name = "explodes_on_add"
        order = 60

        def run(self, graph, ctx):
            for node in list(graph.nodes):
                if node.target == aten.add.Tensor:
                    with ctx.at(node):
                        node.target = aten.sub.Tensor  # damage first...
                        raise RuntimeError("boom")  # ...then fail

    fusewright.reset_report()
    with pytest.warns(FusewrightWarning, match="explodes_on_add"):
        FusewrightPassManager(PassConfig(), passes=[MulToAdd(), ExplodesOnAdd()])(graph)
    assert str(graph) == str(expected)  # MulToAdd's rewrite stands, the damage is gone
    report = fusewright.last_report()
    assert report["mul_to_add"].rewritten == 1 and report["explodes_on_add"].errors


def test_strict_mode_reraises():
    graph = graph_of(model, torch.randn(4))
    before = str(graph)
    manager = FusewrightPassManager(PassConfig(strict=True), passes=[Explodes()])
    with pytest.raises(RuntimeError, match="boom"):
        manager(graph)
    assert str(graph) == before


def test_graph_that_does_not_lint_is_undone():
    graph = graph_of(model, torch.randn(4))
    before = str(graph)
    with pytest.warns(FusewrightWarning, match="breaks_lint"):
        FusewrightPassManager(PassConfig(), passes=[BreaksLint()])(graph)
    assert str(graph) == before


def test_failing_pass_in_a_real_compile_keeps_the_compile_working():
    manager = FusewrightPassManager(PassConfig(), passes=[Explodes()])
    torch._dynamo.reset()
    x = torch.randn(8)
    with pytest.warns(FusewrightWarning):
        out = torch.compile(model, options={"post_grad_custom_post_pass": manager})(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_verify_undoes_a_wrong_rewrite():
    graph = graph_of(model, torch.randn(4))
    before = str(graph)
    with pytest.warns(FusewrightWarning, match="verify: output 0 differs"):
        FusewrightPassManager(PassConfig(verify=True), passes=[MulToAdd()])(graph)
    assert str(graph) == before
    # Without verify the (wrong) rewrite stands: verify is what caught it.
    FusewrightPassManager(PassConfig(), passes=[MulToAdd()])(graph)
    assert "aten.mul" not in str(graph)


def test_verify_accepts_a_correct_rewrite():
    class Noop(GraphPass):
        name = "noop"

        def run(self, graph, ctx):
            ctx.rewritten()

    graph = graph_of(model, torch.randn(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusewrightPassManager(PassConfig(verify=True), passes=[Noop()])(graph)


# ---------------------------------------------------------------- reports
def test_report_counts_and_logging(caplog):
    fusewright.reset_report()
    graph = graph_of(model, torch.randn(4))
    with caplog.at_level(logging.INFO, logger="fusewright"):
        FusewrightPassManager(PassConfig(), passes=[MulToAdd(), SkipsOne()])(graph)
    report = fusewright.last_report()
    assert report.graphs == 1
    assert report["mul_to_add"].matched == 1 and report["mul_to_add"].rewritten == 1
    assert report["skips_one"].skipped[0].reason == "test reason"
    assert report.rewrites() == {"mul_to_add": 1, "skips_one": 0}
    assert "mul_to_add: matched 1, rewritten 1" in caplog.text
    assert "skips_one skipped: test reason" in caplog.text
    assert report.to_dict()["passes"]["skips_one"]["skipped"][0]["reason"] == "test reason"


def test_report_accumulates_over_graph_breaks():
    def broken(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x * 3

    manager = FusewrightPassManager(PassConfig(), passes=[MulToAdd()])
    fusewright.reset_report()
    torch._dynamo.reset()
    torch.compile(broken, options={"post_grad_custom_post_pass": manager})(torch.randn(8))
    report = fusewright.last_report()
    assert report.graphs == 2 and report["mul_to_add"].rewritten == 2


def test_dump_dir(tmp_path):
    graph = graph_of(model, torch.randn(4))
    FusewrightPassManager(PassConfig(dump_dir=str(tmp_path)), passes=[MulToAdd()])(graph)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000-mul_to_add-after.txt", "000-mul_to_add-before.txt"]
    assert "aten.mul" in (tmp_path / "000-mul_to_add-before.txt").read_text()
    assert "aten.mul" not in (tmp_path / "000-mul_to_add-after.txt").read_text()


# ---------------------------------------------------------------- FX graph cache
def test_fx_graph_cache_hit_with_same_config_and_miss_with_another(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import fresh_cache

    def compile_once(config):
        torch._dynamo.reset()
        fn = torch.compile(model, options=fusewright.inductor_options(config))
        fn(torch.randn(16))

    with fresh_cache(), inductor_config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        counters.clear()
        compile_once({})
        assert counters["inductor"]["fxgraph_cache_miss"] == 1
        compile_once({})
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        compile_once({"numerics": "fast"})
        assert counters["inductor"]["fxgraph_cache_miss"] == 2
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0

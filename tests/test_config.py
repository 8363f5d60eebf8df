"""PassConfig: every input form, every error message, the stable hash."""

import json
import subprocess
import sys

import pytest

from fusewright import ConfigError, PassConfig
from fusewright.passes.config import ENV_VAR, split_cli_config

pytestmark = pytest.mark.usefixtures("no_env_config")


def test_defaults():
    config = PassConfig()
    assert config.fuse_norm_quant and config.eliminate_noop_casts and config.rewrite_rope
    assert config.lowering.default == "auto" and config.numerics == "exact"
    assert not config.verify and not config.strict and config.dump_dir is None


def test_from_dict_and_nested_lowering():
    config = PassConfig.from_dict(
        {"fuse_norm_quant": False, "numerics": "FAST", "lowering": {"default": "aten", "rope": "triton,aten"}}
    )
    assert config.fuse_norm_quant is False
    assert config.numerics == "fast"
    assert config.lowering.default == "aten"
    assert config.lowering.priority("rope") == ("triton", "aten")
    assert config.lowering.priority("rms_norm_quant") == ("aten",)


def test_lowering_shorthand_string():
    assert PassConfig.from_dict({"lowering": "triton"}).lowering.default == "triton"


def test_from_json():
    config = PassConfig.from_json('{"verify": true, "dump_dir": "/tmp/x"}')
    assert config.verify is True and config.dump_dir == "/tmp/x"


def test_from_dotted_flags_with_nested_keys():
    config = PassConfig.from_dotted(["rewrite_rope=off", "lowering.rms_norm_quant=aten", "strict=1"])
    assert config.rewrite_rope is False
    assert config.strict is True
    assert config.lowering.priority("rms_norm_quant") == ("aten",)


@pytest.mark.parametrize(
    "argv",
    [
        ["--compilation-config", '{"fuse_norm_quant": false}'],
        ['--compilation-config={"fuse_norm_quant": false}'],
        ["-cc", '{"fuse_norm_quant": false}'],
        ["-cc.fuse_norm_quant=false"],
    ],
)
def test_cli_forms(argv):
    config, rest = split_cli_config(argv + ["graph-diff", "--device", "cpu"])
    assert config.fuse_norm_quant is False
    assert rest == ["graph-diff", "--device", "cpu"]


def test_cli_later_arguments_win():
    config = PassConfig.from_cli(["-cc", '{"numerics": "fast", "verify": true}', "-cc.numerics=exact"])
    assert config.numerics == "exact" and config.verify is True


def test_env_json_and_items(monkeypatch):
    monkeypatch.setenv(ENV_VAR, '{"numerics": "fast"}')
    assert PassConfig.from_env().numerics == "fast"
    monkeypatch.setenv(ENV_VAR, "numerics=fast, lowering.rope=aten")
    config = PassConfig.from_env()
    assert config.numerics == "fast" and config.lowering.priority("rope") == ("aten",)


def test_explicit_arguments_win_over_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, '{"numerics": "fast", "strict": true}')
    config = PassConfig.resolve({"numerics": "exact"})
    assert config.numerics == "exact"  # explicit
    assert config.strict is True  # from the environment, not overridden
    config = PassConfig.resolve('{"strict": false}')
    assert config.strict is False and config.numerics == "fast"
    cli, _ = split_cli_config(["-cc.numerics=exact"])
    assert cli.numerics == "exact" and cli.strict is True


def test_instance_is_used_as_is(monkeypatch):
    monkeypatch.setenv(ENV_VAR, '{"strict": true}')
    assert PassConfig.resolve(PassConfig()).strict is False


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: PassConfig.from_dict({"fuse_norm_qaunt": True}),
         ["unknown config key 'fuse_norm_qaunt'", "value True", "accepted keys:", "did you mean 'fuse_norm_quant'?"]),
        (lambda: PassConfig.from_dict({"strict": "maybe"}),
         ["config key 'strict'", "'maybe'", "accepted: true or false"]),
        (lambda: PassConfig.from_dict({"numerics": "exakt"}),
         ["config key 'numerics'", "'exakt'", "accepted: exact, fast", "did you mean 'exact'?"]),
        (lambda: PassConfig.from_dict({"lowering": "cuda"}),
         ["config key 'lowering'", "'cuda'", "accepted: auto, triton, aten"]),
        (lambda: PassConfig.from_dict({"lowering": {"rms_nrom": "aten"}}),
         ["unknown config key 'lowering.rms_nrom'", "'aten'", "did you mean 'rms_norm'?"]),
        (lambda: PassConfig.from_dict({"lowering": {"rope": "triton,cuda"}}),
         ["config key 'lowering.rope'", "'cuda'", "accepted: auto, triton, aten"]),
        (lambda: PassConfig.from_dict({"lowering": 3}),
         ["config key 'lowering'", "3", "a mapping with keys"]),
        (lambda: PassConfig.from_dict({"dump_dir": 5}),
         ["config key 'dump_dir'", "5", "a directory path or null"]),
        (lambda: PassConfig.from_dict(["fuse_norm_quant"]),
         ["must be a mapping", "list"]),
        (lambda: PassConfig.from_json("{fuse_norm_quant: true}"),
         ["not valid JSON", "accepted: a JSON object"]),
        (lambda: PassConfig.from_json("[1, 2]"),
         ["must be a mapping", "list"]),
        (lambda: PassConfig.from_dotted(["fuse_norm_quant"]),
         ["has no '='", "-cc.KEY=VALUE"]),
        (lambda: PassConfig.from_dotted(["numerics.x=1"]),
         ["config key 'numerics'", "accepted: exact, fast"]),
        (lambda: PassConfig.from_cli(["-cc"]),
         ["-cc needs a JSON object"]),
        (lambda: PassConfig.from_cli(["--compilation-config", "nope"]),
         ["not valid JSON"]),
    ],
)
def test_error_messages(build, expected):
    with pytest.raises(ConfigError) as info:
        build()
    for fragment in expected:
        assert fragment in str(info.value)


def test_environment_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, '{"verfiy": true}')
    with pytest.raises(ConfigError, match=rf"in environment variable {ENV_VAR}: unknown config key 'verfiy'.*did you mean 'verify'"):
        PassConfig.resolve(None)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- hash
def test_hash_is_stable_and_distinguishes_configs():
    assert PassConfig().hash() == PassConfig.from_dict({}).hash()
    assert PassConfig().hash() != PassConfig(numerics="fast").hash()
    assert PassConfig().hash() != PassConfig().replace(lowering={"rope": "aten"}).hash()
    # Order of per-op entries does not matter.
    a = PassConfig.from_dict({"lowering": {"rope": "aten", "rms_norm": "triton"}})
    b = PassConfig.from_dict({"lowering": {"rms_norm": "triton", "rope": "aten"}})
    assert a.hash() == b.hash()


def test_hash_equal_across_processes():
    code = "from fusewright import PassConfig; print(PassConfig.from_dict({'numerics': 'fast'}).hash())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == PassConfig.from_dict({"numerics": "fast"}).hash()


def test_round_trip_through_json():
    config = PassConfig.from_dict({"numerics": "fast", "lowering": {"default": "aten", "rope": "triton,aten"}})
    assert PassConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["lowering"] == {"default": "aten", "rope": "triton,aten"}

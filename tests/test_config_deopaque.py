"""The `deopaque` config key (op name -> semantic op) and user implementation names in priorities."""

import json

import pytest
import torch

from fusewright import ConfigError, PassConfig
from fusewright.lowering import registry
from fusewright.passes.config import ENV_VAR, split_cli_config

pytestmark = pytest.mark.usefixtures("no_env_config")


def test_default_is_empty_and_disables_the_pass():
    config = PassConfig()
    assert config.deopaque == ()
    assert not config.pass_enabled("deopaque")
    assert PassConfig.from_dict({"deopaque": {"_C::rms_norm": "rms_norm"}}).pass_enabled("deopaque")


def test_every_input_form():
    expected = (("_C::fused_add_rms_norm", "fused_add_rms_norm"), ("_C::rms_norm", "rms_norm"))
    from_dict = PassConfig.from_dict({"deopaque": {"_C::rms_norm": "rms_norm",
                                                   "_C::fused_add_rms_norm": "FUSED_ADD_RMS_NORM"}})
    from_json = PassConfig.from_json('{"deopaque": {"_C::rms_norm": "rms_norm", '
                                     '"_C::fused_add_rms_norm": "fused_add_rms_norm"}}')
    from_cli, rest = split_cli_config(["-cc.deopaque._C::rms_norm=rms_norm",
                                       "-cc.deopaque._C::fused_add_rms_norm=fused_add_rms_norm", "bench"])
    assert from_dict.deopaque == from_json.deopaque == from_cli.deopaque == expected
    assert rest == ["bench"]


def test_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "deopaque.mylib::rms_norm=rms_norm")
    assert PassConfig.from_env().deopaque == (("mylib::rms_norm", "rms_norm"),)


def test_overload_name_with_dots_survives_the_dotted_form():
    config = PassConfig.from_cli(["-cc.deopaque.mylib::rms_norm.default=rms_norm"])
    assert config.deopaque == (("mylib::rms_norm.default", "rms_norm"),)


def test_later_entries_update_and_null_removes():
    config = PassConfig.from_cli(["-cc.deopaque.a::n=rms_norm", "-cc.deopaque.b::n=rms_norm"])
    assert dict(config.deopaque) == {"a::n": "rms_norm", "b::n": "rms_norm"}
    config = config.replace(deopaque={"a::n": None, "b::n": "fused_add_rms_norm"})
    assert config.deopaque == (("b::n", "fused_add_rms_norm"),)
    assert PassConfig.from_cli(["-cc.deopaque.b::n=none"], config).deopaque == ()


def test_hash_and_json_round_trip():
    a = PassConfig.from_dict({"deopaque": {"a::n": "rms_norm", "b::n": "rms_norm"}})
    b = PassConfig.from_dict({"deopaque": {"b::n": "rms_norm", "a::n": "rms_norm"}})
    assert a.hash() == b.hash() != PassConfig().hash()
    assert json.loads(a.to_json())["deopaque"] == {"a::n": "rms_norm", "b::n": "rms_norm"}
    assert PassConfig.from_json(a.to_json()) == a


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: PassConfig.from_dict({"deopaque": "mylib::rms_norm"}),
         ["config key 'deopaque'", "'mylib::rms_norm'", "a mapping of custom op names to semantic ops",
          "-cc.deopaque.mylib::rms_norm=rms_norm"]),
        (lambda: PassConfig.from_dict({"deopaque": {"rms_norm": "rms_norm"}}),
         ["config key 'deopaque.rms_norm'", "is not a custom op name", "'namespace::op'"]),
        (lambda: PassConfig.from_dict({"deopaque": {"mylib::rms_norm": "rmsnorm"}}),
         ["config key 'deopaque.mylib::rms_norm'", "'rmsnorm'", "accepted: rms_norm, fused_add_rms_norm",
          "did you mean 'rms_norm'?"]),
        (lambda: PassConfig.from_cli(["-cc.deopaque.mylib::norm=layer_norm"]),
         ["config key 'deopaque.mylib::norm'", "'layer_norm'", "accepted: rms_norm, fused_add_rms_norm"]),
        (lambda: PassConfig.from_dict({"deopaqe": {}}),
         ["unknown config key 'deopaqe'", "did you mean 'deopaque'?"]),
        (lambda: PassConfig.from_dict({"lowering": {"rms_norm": "vendor,aten"}}),
         ["config key 'lowering.rms_norm'", "'vendor'", "accepted: auto, triton, aten"]),
    ],
)
def test_error_messages(build, expected):
    with pytest.raises(ConfigError) as info:
        build()
    for fragment in expected:
        assert fragment in str(info.value)


def test_user_registered_implementation_is_a_valid_priority_entry():
    registry.register("rms_norm", "vendor_test", lambda emit, t, p: emit(torch.ops.aten.clone.default, t["x"]))
    try:
        config = PassConfig.from_cli(["-cc.lowering.rms_norm=vendor_test,aten"])
        assert config.lowering.priority("rms_norm") == ("vendor_test", "aten")
        # ... for the op it was registered for only
        with pytest.raises(ConfigError, match="accepted: auto, triton, aten"):
            PassConfig.from_cli(["-cc.lowering.rope=vendor_test"])
    finally:
        registry.unregister("rms_norm", "vendor_test")

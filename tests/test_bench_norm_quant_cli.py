"""CPU checks of `fusewright bench norm-quant`'s arguments (the timings need a GPU)."""

import argparse

import pytest

from fusewright.tools import bench_norm_quant as bnq


def _args(*argv):
    p = argparse.ArgumentParser()
    bnq.add_arguments(p)
    return p.parse_args(list(argv))


def test_sweep_rejects_unknown_family_and_size_before_touching_a_device(capsys):
    assert bnq.main(_args("--sweep", "--families", "token,tokn")) == 2
    err = capsys.readouterr().err
    assert "tokn" in err and "local+col" in err
    assert bnq.main(_args("--sweep", "--sweep-sizes", "mid,huge")) == 2
    assert "huge" in capsys.readouterr().err


def test_flush_modes_and_defaults():
    assert _args().flush == "read"
    assert _args("--flush", "write").flush == "write"
    with pytest.raises(SystemExit):
        _args("--flush", "none")
    assert set(bnq.SWEEP_AT) == set(bnq.SWEEP_SIZES) == set(_args().sweep_sizes.split(","))


def test_every_sweep_family_names_a_variant_of_that_family():
    from fusewright.lowering.norm_quant_plan import tuning_key

    vs = bnq.variants()
    for fam, name in bnq.SWEEP_FAMILIES.items():
        assert tuning_key(vs[name], 4096, 4096).split("/")[0] == fam

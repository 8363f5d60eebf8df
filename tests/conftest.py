import os
import sys

import pytest
import torch

# helper modules of tests/ (norm_quant_kernel_helpers) import by name: the tests run with
# --import-mode=importlib, which puts no test directory on sys.path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Every test really compiles: Dynamo reset, and no FX graph cache hits from earlier runs
    (a hit skips the custom passes). Tests of the cache turn it on inside `fresh_cache()`."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False):
        yield
    torch._dynamo.reset()


@pytest.fixture
def no_env_config(monkeypatch):
    monkeypatch.delenv("FUSEWRIGHT_CONFIG", raising=False)

"""tools/ptxas.py: the benchmarks assemble their kernels with torch's ptxas when torch has one."""

from __future__ import annotations

import os

import torch

from fusewright.tools import ptxas


def _fake_torch(tmp_path, monkeypatch, executable: bool) -> str:
    (tmp_path / "torch" / "bin").mkdir(parents=True)
    tool = tmp_path / "torch" / "bin" / "ptxas"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755 if executable else 0o644)
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "torch" / "__init__.py"))
    return str(tool)


def test_points_triton_at_torchs_ptxas(tmp_path, monkeypatch):
    monkeypatch.delenv(ptxas.ENV, raising=False)
    tool = _fake_torch(tmp_path, monkeypatch, executable=True)
    assert ptxas.use_torch_ptxas() == tool
    assert os.environ[ptxas.ENV] == tool


def test_a_users_choice_stands(tmp_path, monkeypatch):
    _fake_torch(tmp_path, monkeypatch, executable=True)
    monkeypatch.setenv(ptxas.ENV, "/opt/cuda/bin/ptxas")
    assert ptxas.use_torch_ptxas() == "/opt/cuda/bin/ptxas"
    assert os.environ[ptxas.ENV] == "/opt/cuda/bin/ptxas"


def test_without_an_executable_one_triton_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv(ptxas.ENV, raising=False)
    _fake_torch(tmp_path, monkeypatch, executable=False)
    assert ptxas.use_torch_ptxas() == "triton's own"
    assert ptxas.ENV not in os.environ
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "elsewhere" / "__init__.py"))
    assert ptxas.use_torch_ptxas() == "triton's own"

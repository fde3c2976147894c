"""Shared fixtures: every test runs with its own empty user cache and no $FIRE_DATA, from a scratch directory."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Keep tests away from the developer's cache, $FIRE_DATA and ./data, and make them deterministic."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FIRE_DATA", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.manual_seed(0)

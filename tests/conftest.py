"""Shared fixtures: every test runs with its own empty user cache and no $FIRE_DATA, from a scratch directory;
the tiny backdoored model, and one thread for modules of small models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from helpers import TinyBackdoor, tiny_backdoored_model


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Keep tests away from the developer's cache, $FIRE_DATA and ./data, and make them deterministic."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FIRE_DATA", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny() -> TinyBackdoor:
    """The tiny patch-backdoored model and its data (helpers.tiny_backdoored_model), once per module."""
    return tiny_backdoored_model()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small models run no slower on one thread, and far faster while other work shares the CPU
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

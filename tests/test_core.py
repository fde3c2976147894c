"""The core's small shared pieces (registry, device selection) and the package boundaries."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
import torch

from fire_defense import FireDefenseError, Registry, UnknownNameError, drop_none, resolve_device


def test_registry_stores_lists_and_refuses_duplicates():
    fruits: Registry[int] = Registry("fruit")

    @fruits.register()
    def apple():
        return 1

    fruits.add("pear", 2)
    assert fruits.get("apple") is apple and fruits.get("pear") == 2
    assert fruits.names() == ["apple", "pear"] and fruits.names("p*") == ["pear"]
    assert "apple" in fruits and len(fruits) == 2 and list(fruits) == ["apple", "pear"]
    with pytest.raises(ValueError, match="fruit 'pear' is already registered"):
        fruits.add("pear", 3)


def test_unknown_name_suggests_and_lists():
    fruits: Registry[int] = Registry("fruit")
    fruits.add("banana", 1)
    fruits.add("cherry", 2)
    with pytest.raises(
        UnknownNameError, match=r"unknown fruit 'banan'\. Did you mean 'banana'\? Known: banana, cherry\."
    ):
        fruits.get("banan")


def test_drop_none_keeps_set_values():
    assert drop_none({"a": None, "b": 0, "c": False}) == {"b": 0, "c": False}


def test_device_selection():
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FireDefenseError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(FireDefenseError, match="CUDA is not available"):
            resolve_device("cuda")


def test_installed_import_names_do_not_shadow_other_packages():
    """`adapters/` ships as `fire_adapters` (a top-level `adapters` would hide the PyPI package of that name),
    `benchmarks/` as `fire_bench`."""
    top_level = set(metadata.distribution("fire-defense").read_text("top_level.txt").split())
    assert top_level == {"fire_adapters", "fire_bench", "fire_defense"}
    names = ("adapters", "benchmarks", "fire_adapters", "fire_bench")
    code = f"import importlib.util as u; print([u.find_spec(n) is not None for n in {names}])"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[False, False, True, True]"  # from outside the checkout (conftest's working directory)


def test_core_does_not_import_the_adapters():
    code = "import sys, fire_defense; print(sorted(m for m in sys.modules if m.startswith('fire_adapters')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

"""The core's small shared pieces (registry, device selection) and the package boundaries."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fire_defense import FireDefenseError, Registry, UnknownNameError, drop_none, resolve_device
from fire_defense.registry import keyword_parameters


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


def test_keyword_parameters_read_every_constructor_subclass_first():
    class Base:
        def __init__(self, *, seed: int = 0, batch_size: int = 1) -> None: ...

    class Child(Base):
        def __init__(self, dataset: str, *, strength: float = 1.0, seed: int = 0, **common: int) -> None: ...

    assert keyword_parameters(Child) == ["strength", "seed", "batch_size"]


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


# Dependencies point inward (docs/architecture.md): each package and the packages it may never import.
OUTER_LAYERS = {"fire_defense": ("fire_adapters", "fire_bench"), "fire_adapters": ("fire_bench",)}


def imported_names(path: Path) -> set[str]:
    """The top-level packages a module imports anywhere in it (at import time, in a function, by import_module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            names |= {arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant)}
    return {name.split(".")[0] for name in names if isinstance(name, str)}


@pytest.mark.parametrize(("package", "outer"), sorted(OUTER_LAYERS.items()))
def test_no_module_imports_an_outer_layer(package, outer):
    root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 3  # the walk found the package's files
    offenders = {str(path.relative_to(root)): sorted(imported_names(path) & set(outer)) for path in modules}
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize(("package", "outer"), sorted(OUTER_LAYERS.items()))
def test_importing_every_module_loads_no_outer_layer(package, outer):
    code = (
        f"import importlib, pkgutil, sys, {package} as p\n"
        "names = [m.name for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
        "for name in names: importlib.import_module(name)\n"
        f"print(len(names), sorted(m for m in sys.modules if m.split('.')[0] in {outer!r}))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, found = loaded.strip().split(" ", 1)
    assert int(count) > 3 and found == "[]"

"""Untrusted files are loaded without running any code in them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from fire_adapters import UnsafeFileError, safe_torch_load
from fire_defense import FireDefenseError


class _RunsShell:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _malicious_record(path, sentinel):
    torch.save({"model_name": "preactresnet18", "model": {}, "payload": _RunsShell(f"touch {sentinel}")}, path)


def test_the_crafted_file_really_runs_code_when_loaded_unsafely(tmp_path):
    """Guards the test below: an unsafe load of this file does create the sentinel."""
    path, sentinel = tmp_path / "attack_result.pt", tmp_path / "pwned"
    _malicious_record(path, sentinel)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert sentinel.exists()


def test_malicious_record_is_refused_and_nothing_runs(tmp_path):
    path, sentinel = tmp_path / "attack_result.pt", tmp_path / "pwned"
    _malicious_record(path, sentinel)
    with pytest.raises(UnsafeFileError, match=r"refers to '(posix|os|nt)\.system'.*not loaded") as error:
        safe_torch_load(path)
    assert "\n" not in str(error.value)
    assert not sentinel.exists()


def test_numpy_values_a_record_holds_are_allowed(tmp_path):
    content = {
        np.int64(7): {"path": "./record/x/bd_test_dataset/1/7.png", "other_info": [0, 1]},
        "poison_indicator": np.array([0.0, 1.0]),
        "original_index_array": np.arange(3),
        "scalar": np.float64(0.5),
        "tensor": torch.ones(2),
    }
    torch.save(content, tmp_path / "r.pt")
    loaded = safe_torch_load(tmp_path / "r.pt")
    assert loaded[np.int64(7)]["other_info"] == [0, 1]
    np.testing.assert_array_equal(loaded["original_index_array"], np.arange(3))
    assert loaded["scalar"] == 0.5 and torch.equal(loaded["tensor"], torch.ones(2))


def _rename_numpy_module(path, old: bytes, new: bytes) -> None:
    """Rewrite the pickle inside a torch zip file, e.g. to the numpy 1.x module names."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            target.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)
    path.write_bytes(buffer.getvalue())


def test_records_written_under_numpy_1_load_too(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"a": np.arange(4), "k": np.int64(3)}, path)
    _rename_numpy_module(path, b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in zipfile.ZipFile(path).read("old/data.pkl")
    loaded = safe_torch_load(path)
    np.testing.assert_array_equal(loaded["a"], np.arange(4))
    assert loaded["k"] == 3


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"a": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FireDefenseError, match="corrupt"):
        safe_torch_load(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_torch_load(tmp_path / "nothing.pt")

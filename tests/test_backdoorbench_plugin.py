"""FIRE as a BackdoorBench defense: the installer, the entry script end to end, the class without BackdoorBench.

BackdoorBench is not installed here: a fake checkout holds what the plugin touches (``defense/base.py``
with a stand-in base class, a record written by ``save_record``, its data under ``data/``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fire_adapters import load_record
from fire_bench.__main__ import main as bench_main
from fire_bench.backdoorbench import FireDefense, install, main, uninstall
from fire_bench.backdoorbench.install import CONFIG_NAMES, packaged_config
from fire_bench.cells import Cell, run_cell
from fire_bench.evaluation import METRICS
from fire_bench.fire_report import fire_report
from fire_bench.grid import GRIDS_DIR, DefenseSpec, Protocol, load_grid
from fire_bench.protocol import describe, split_record
from fire_defense import FIRE, FireDefenseError

from helpers import write_backdoored_record, write_fake_record

NAME = "badnet_demo"
DEFAULTS = packaged_config()  # a key repeated after them wins
QUICK = ["--clean_size", "40", "--k", "5", "--layers", "1.layer3", "--device", "cpu"]  # seconds on a CPU


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The parts of a BackdoorBench checkout the plugin touches."""
    root = tmp_path / "BackdoorBench"
    (root / "defense").mkdir(parents=True)
    (root / "defense" / "base.py").write_text('class defense:\n    """A stand-in for BackdoorBench\'s base class."""\n')
    write_fake_record(root, name=NAME)
    return root


def benchmark_metrics(record_dir: Path, cache: Path, clean_size: int) -> dict[str, float]:
    """What a grid cell computes for QUICK's settings: the same protocol and seed, the whole evaluation part."""
    protocol = Protocol(clean_size, k=5, defender_share=0.1, eval_clean=None, eval_poisoned=None)
    fire = DefenseSpec("fire", {"mode": "gate", "layers": ["1.layer3"]})
    row = run_cell(Cell(str(record_dir), fire, protocol, seed=0, device="cpu"), cache)
    return {m: row[m] for m in METRICS}


class InProcess:
    """An executor that runs every item here, one after the other."""

    def map(self, fn, items):
        for item in items:
            yield item, fn(item)


def summary_metrics(path: Path) -> dict[str, float]:
    """The ``last`` row of a BackdoorBench summary CSV."""
    with open(path) as handle:
        rows = {row[""]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["last", "valid_max", "exist_nan_value"] and list(rows["last"]) == ["", *METRICS]
    return {m: float(rows["last"][m]) for m in METRICS}


def test_a_grid_cell_fire_report_and_the_plugin_agree(tmp_path):
    """One backdoored record under the shipped settings (fire.yaml's protocol, the plugin's config.yaml): the
    leaderboard's cell, fire-report's row and the plugin's summary are the same numbers, each computed on its
    own (three caches). (The record's images are noise, so FIRE has no clean structure to restore: FIRE's effect
    is tested on a model of real structure in test_fire.py and test_defenses.py; this test is about the paths.)"""
    root = tmp_path / "BackdoorBench"
    record_dir = write_backdoored_record(root)
    shipped = yaml.safe_load((GRIDS_DIR / "fire.yaml").read_text())
    grid = tmp_path / "fire.yaml"  # the shipped grid; its k-curve and latency scaled to the small record
    latency = {"batch_sizes": [1], "rounds": 1, "min_seconds": 0.001}
    grid.write_text(yaml.safe_dump({**shipped, "k_curve": {"ks": [1, 10]}, "latency": latency}))
    loaded = load_grid(grid)
    (fire,) = [d for d in loaded.defenses if d.label == "fire"]
    cell = run_cell(Cell(str(record_dir), fire, loaded.protocol, seed=0), tmp_path / "cell")

    report = fire_report(root / "record", tmp_path / "report", grid=grid, executor=InProcess())
    with open(tmp_path / "report" / "mitigation.csv") as handle:
        reported = {row["defense_name"]: row for row in csv.DictReader(handle)}

    assert main(["--result_file", record_dir.name, "--device", "cpu"], root=root) == 0  # config.yaml's settings
    plugin = summary_metrics(record_dir / "defense" / "fire" / "fire_df_summary.csv")

    expected = {m: cell[m] for m in METRICS}
    assert {m: float(reported["fire"][m]) for m in METRICS} == expected and plugin == expected
    whole = describe(split_record(load_record(record_dir), seed=0, clean_size=500, defender_share=0.1))
    assert cell["split"] == whole and reported["fire"]["setting"] == cell["setting"]  # all the evaluation part
    assert float(reported["none"]["test_asr"]) > 0.9  # a backdoored model, so the ASR tells subsets apart
    assert [r["k"] for r in report.rows if r["table"] == "k_curve"] == [1, 10]


def test_the_entry_script_runs_fire_in_a_backdoorbench_checkout(checkout):
    install(checkout)
    command = [sys.executable, "./defense/fire.py", "--result_file", NAME, "--dataset", "fashionmnist"]
    command += ["--yaml_path", "./config/defense/fire/config.yaml", *QUICK]
    run = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    out = checkout / "record" / NAME / "defense" / "fire"
    assert summary_metrics(out / "fire_df_summary.csv") == benchmark_metrics(out.parents[1], checkout / "cache", 40)
    assert "FireDefense derives from defense.base.defense" in run.stderr
    (log,) = (out / "log").glob("*.log")
    assert "DER" in log.read_text() and "derives from defense.base.defense" in log.read_text()
    # BackdoorBench's defense_result.pt holds the record's model unchanged; FIRE's directions load back.
    result = torch.load(out / "defense_result.pt", weights_only=True)
    record = load_record(out.parents[1])
    assert (result["model_name"], result["num_classes"]) == ("preactresnet18_w8", 10)
    for key, value in record.model.state_dict().items():
        assert torch.equal(result["model"][key], value), key
    assert FIRE(record.classifier()).load(out / "fire_state.pt").layers_ == ["1.layer3"]


def test_the_class_works_without_backdoorbench(checkout, tmp_path):
    assert importlib.util.find_spec("defense") is None and FireDefense.__bases__ == (object,)
    parser = argparse.ArgumentParser()
    FireDefense.add_arguments(parser)
    # No --yaml_path and no config under the root: our packaged defaults; --ratio wins over their clean_size.
    defense = FireDefense(parser.parse_args([*QUICK, "--ratio", "0.25"]), root=checkout)
    result = defense.defense(NAME)
    assert result["metrics"] == benchmark_metrics(checkout / "record" / NAME, tmp_path / "cache", 50)  # 0.25 x 200
    assert result["model"](torch.rand(2, 1, 28, 28)).shape == (2, 10)
    index = tmp_path / "index.txt"  # BackdoorBench's --index: a text file of clean training indices
    np.savetxt(index, [3, 1, 4, 15, 9, 26, 5, 35], fmt="%d")
    FireDefense(parser.parse_args([*QUICK, "--index", str(index)]), root=checkout).defense(NAME)
    logs = (checkout / "record" / NAME / "defense" / "fire" / "log").glob("*.log")
    assert any("defender: 8 clean training samples" in log.read_text() for log in logs)


@pytest.mark.parametrize(
    ("arguments", "config", "message"),
    [
        (["--result_file", "nope"], None, "no record .*record/nope"),
        (["--result_file", NAME, "--dataset", "cifar10"], None, "made on fashionmnist; pass --dataset fashionmnist"),
        (["--result_file", NAME, "--dataset", "imagenet"], None, "unknown dataset 'imagenet'"),
        (["--result_file", NAME, "--mode", "clip"], None, "unknown mode 'clip'"),
        (["--result_file", NAME], DEFAULTS + "k: [10,\n", "is not valid YAML"),
        (["--result_file", NAME], DEFAULTS + "epochs: 3\n", "unknown options epochs"),
        (["--result_file", NAME], DEFAULTS + "k: ten\n", "option k must be an integer, got 'ten'"),
        (["--result_file", NAME], "- 1\n", "must be a mapping of option: value, not a list"),
        (["--result_file", NAME, "--yaml_path", "missing.yaml"], None, "cannot read the YAML config missing.yaml"),
    ],
)
def test_bad_input_is_one_line_and_status_2(checkout, capsys, arguments, config, message):
    if config is not None:
        (checkout / "bad.yaml").write_text(config)
        arguments = [*arguments, "--yaml_path", str(checkout / "bad.yaml")]
    assert main([*arguments, "--device", "cpu"], root=checkout) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("defense/fire.py: error: ") and "\n" not in error
    assert re.search(message, error), error


def test_install_never_overwrites_or_removes_what_it_did_not_write(checkout, capsys):
    folder = checkout / "config" / "defense" / "fire"
    folder.mkdir(parents=True)
    (folder / "cifar10.yaml").write_text("dataset: cifar10\n")
    with pytest.raises(FireDefenseError, match=r"overwrite config/defense/fire/cifar10.yaml \(not written by"):
        install(checkout)
    assert sorted(p.name for p in folder.iterdir()) == ["cifar10.yaml"]  # nothing was written
    (folder / "cifar10.yaml").unlink()
    written = install(checkout)
    assert len(written) == 6 and install(checkout) == written  # its own unchanged files are replaced
    edited = folder / "gtsrb.yaml"
    edited.write_text(edited.read_text().replace("k: 10", "k: 20"))
    with pytest.raises(FireDefenseError, match=r"gtsrb.yaml \(changed since fire-defense wrote it\)"):
        install(checkout)
    (folder / "notes.txt").write_text("the user's own file\n")
    removed, left = uninstall(checkout)
    assert len(removed) == 5 and left == [edited] and not (checkout / "defense" / "fire.py").exists()
    assert (folder / "notes.txt").exists() and (checkout / "defense" / "base.py").exists()
    # The same through fire-bench's command line; a folder that is no checkout is refused in one line.
    edited.unlink()
    (folder / "notes.txt").unlink()
    assert bench_main(["backdoorbench", "install", "--root", str(checkout)]) == 0
    assert bench_main(["backdoorbench", "uninstall", "--root", str(checkout)]) == 0
    assert not folder.exists() and "removed" in capsys.readouterr().out
    assert bench_main(["backdoorbench", "install", "--root", str(checkout / "record")]) == 2
    assert "is not a BackdoorBench checkout" in capsys.readouterr().err


def test_packaged_configs_are_the_benchmark_defaults_per_dataset():
    configs = {name: yaml.safe_load(packaged_config(name)) for name in CONFIG_NAMES}
    assert configs["config"]["dataset"] is None
    for name, values in configs.items():
        assert values == {**configs["config"], "dataset": None if name == "config" else name}
    defaults = {"clean_size": 500, "k": 10, "random_seed": 0, "defender_share": 0.1, "mode": "match", "layers": "auto"}
    assert defaults.items() <= configs["config"].items()  # fire-bench fire-report's settings


def test_the_protocol_takes_backdoorbench_ratio_and_index(checkout):
    record = load_record(checkout / "record" / NAME)
    by_ratio = split_record(record, clean_ratio=0.1)
    assert len(by_ratio.clean_reference) == 20 and not set(by_ratio.clean_reference.indices) & set(
        record.train_poison_indices
    )
    by_index = split_record(record, clean_indices=[7, 3, 11])
    assert by_index.clean_reference.indices.tolist() == [3, 7, 11]
    np.testing.assert_array_equal(by_index.clean_reference.images, record.load_clean_train().images[[3, 7, 11]])
    with pytest.raises(FireDefenseError, match="not both"):
        split_record(record, clean_ratio=0.1, clean_indices=[1])
    with pytest.raises(FireDefenseError, match="distinct positions in the 200-sample training split"):
        split_record(record, clean_indices=[1, 1000])

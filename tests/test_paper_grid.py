"""The paper grid (``grids/paper.yaml``) on BackdoorBench's own layout: small synthetic CIFAR-10 and GTSRB records
of its ``preactresnet18`` (width 64), run on the CPU through the runner ``make bench`` uses, the protocol shrunk."""

from __future__ import annotations

import csv
import dataclasses
import math
import shlex

import pytest
import torch
import yaml

from fire_adapters import get_dataset_spec, load_record
from fire_bench.defenses import create_defense
from fire_bench.evaluation import evaluate, protocol_split
from fire_bench.grid import GRIDS_DIR, load_grid
from fire_bench.runner import run_grid
from fire_defense import FireDefenseError

from helpers import Recording, write_backdoorbench_record, write_cifar_dataset, write_sized_gtsrb_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH_KEYS = ("batch_size", "pass_batch")
RECORDS = {"cifar10": "cifar10_preactresnet18_badnet_0_1", "gtsrb": "gtsrb_preactresnet18_badnet_0_1"}
# A few images: the defender's 16 clean samples and 2 poisoned inputs, the rest of the test split evaluated whole.
SHRUNK = {"clean_size": 16, "k": 2, "defender_share": 0.25}
RUN = ("none", "fire", "bitdepth")  # FIRE and a one-pass baseline: the whole list takes minutes on a CPU


@pytest.fixture(scope="module")
def backdoorbench_root(tmp_path_factory):
    """A BackdoorBench root: ``data/cifar10`` (torchvision's pickles), ``data/gtsrb`` (its download script's
    layout) and a record of each, as its attack scripts write them."""
    root = tmp_path_factory.mktemp("BackdoorBench")
    write_cifar_dataset(root / "data" / "cifar10", per_batch=16)  # 80 training, 16 test images
    write_sized_gtsrb_dataset(root / "data" / "gtsrb", n_train=60, n_test=16)
    for dataset, name in RECORDS.items():
        write_backdoorbench_record(root, dataset, name)
    return root


def shrunk(grid):
    """The paper grid on a CPU budget: its protocol's sizes shrunk, a subset of its defenses, one k-curve point,
    no latency phase (which times the same cells)."""
    return dataclasses.replace(
        grid,
        protocol=dataclasses.replace(grid.protocol, **SHRUNK),
        seeds=grid.seeds[:1],
        defenses=tuple(d for d in grid.defenses if d.label in RUN),
        latency=None,
        k_curve=dataclasses.replace(grid.k_curve, ks=(SHRUNK["k"],)),
    )


def test_the_paper_grid_is_the_defaults_defenses_at_backdoorbench_scale():
    paper, default = load_grid("paper"), load_grid("default")
    assert paper.make is None and paper.records == "record"  # BackdoorBench's record/, relative to its root
    cifar10 = get_dataset_spec("cifar10")
    assert paper.protocol.clean_size == 0.05 * cifar10.train_size  # BackdoorBench's defenses' `ratio: 0.05`
    assert paper.protocol.eval_clean is None and paper.protocol.eval_poisoned is None  # the whole evaluation part
    assert (paper.protocol.k, paper.protocol.defender_share) == (default.protocol.k, default.protocol.defender_share)
    assert len(paper.seeds) == 3 and paper.k_curve == default.k_curve

    def without_batches(spec):
        return spec.label, spec.name, {k: v for k, v in spec.params.items() if k not in BATCH_KEYS}

    # every defense of the default with its settings, but `correction` (it needs a trigger BackdoorBench's
    # records do not carry: below), each with GPU batch sizes above the CPU defaults
    expected = [without_batches(d) for d in default.defenses if d.name != "correction"]
    assert [without_batches(d) for d in paper.defenses] == expected
    cpu = create_defense("none")  # the defaults, sized for a CPU
    assert all(d.params.get(key, 0) > getattr(cpu, key) for d in paper.defenses for key in BATCH_KEYS)
    assert max(paper.latency.batch_sizes) > max(default.latency.batch_sizes)


def test_the_paper_grid_runs_on_backdoorbench_records(backdoorbench_root, tmp_path, monkeypatch):
    monkeypatch.chdir(backdoorbench_root)  # as documented: from BackdoorBench's root, `records: record`
    grid = shrunk(load_grid("paper"))
    out = tmp_path / "results"
    rows = run_grid(grid, out, executor=Recording(), device="cpu").rows
    assert sorted((r["dataset"], r["defense_name"], r["table"]) for r in rows) == sorted(
        [(dataset, label, "leaderboard") for dataset in RECORDS for label in RUN]
        + [(dataset, "fire-stream", "k_curve") for dataset in RECORDS]
    )
    with open(out / "leaderboard.csv", newline="") as handle:
        board = list(csv.DictReader(handle))
    assert sorted((r["dataset"], r["attack_name"], r["defense_name"]) for r in board) == sorted(
        (dataset, name, label) for dataset, name in RECORDS.items() for label in RUN
    )  # a BackdoorBench record names no attack: the row carries its folder's name
    for row in board:
        assert row["backbone"] == "preactresnet18"
        for metric in ("test_acc", "test_asr", "test_ra", "der"):
            value = float(row[metric])
            assert math.isfinite(value) and 0 <= value <= 1, (row["dataset"], row["defense_name"], metric, value)
            assert 0 <= float(row[f"{metric}_ci_low"]) <= value <= float(row[f"{metric}_ci_high"]) <= 1
    for dataset, name in RECORDS.items():
        record = load_record(backdoorbench_root / "record" / name)
        assert record.num_classes == get_dataset_spec(dataset).num_classes and record.metadata == {}
        assert record.model.conv1.out_channels == 64  # BackdoorBench's width
        evaluated = len(record.clean_test) - round(SHRUNK["defender_share"] * len(record.clean_test))
        split = next(r["split"] for r in rows if r["dataset"] == dataset)
        assert f"{SHRUNK['clean_size']} clean training samples" in split and f"{evaluated} clean" in split
    assert "cifar10" in (out / "leaderboard.md").read_text() and (out / "leaderboard.html").is_file()


def test_correction_is_left_out_because_backdoorbench_records_carry_no_trigger(backdoorbench_root):
    record = load_record(backdoorbench_root / "record" / RECORDS["gtsrb"])
    grid = load_grid("default")
    correction = next(d for d in grid.defenses if d.name == "correction")
    protocol = dataclasses.replace(grid.protocol, **SHRUNK)
    with pytest.raises(FireDefenseError, match="holds no attack parameters"):
        evaluate(record, protocol_split(record, protocol, 0), correction, protocol, "cpu")


def documented_command() -> list[str]:
    """The command ``paper.yaml``'s header documents, as ``fire-bench`` arguments."""
    line = next(line for line in (GRIDS_DIR / "paper.yaml").read_text().splitlines() if "fire-bench run" in line)
    return shlex.split(line.split("fire-bench", 1)[1])


def test_the_documented_command_without_cuda_is_one_line(backdoorbench_root, tmp_path, monkeypatch, capsys):
    from fire_bench.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine has no CUDA, whatever it has
    monkeypatch.setattr("fire_bench.executors.create_executor", lambda name, **options: Recording())  # in-process
    monkeypatch.chdir(backdoorbench_root)
    grid = yaml.safe_load((GRIDS_DIR / "paper.yaml").read_text())
    grid["protocol"].update(SHRUNK)
    grid["defenses"] = [d for d in grid["defenses"] if d["name"] == "none"]
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({**grid, "latency": None, "k_curve": None}))
    command = documented_command()
    assert command[:3] == ["run", "--grid", "paper"] and "--device" in command
    assert command[command.index("--device") + 1] == "cuda"
    out = tmp_path / "results"
    command[2], command[command.index("--out") + 1] = str(tmp_path / "paper.yaml"), str(out)  # the shrunk grid
    assert main(command) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fire-bench: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "'cuda' was asked for but CUDA is not available here; use 'cpu' or 'auto'." in errors[0]
    assert not list((out / "cache").glob("*.json")) and not (out / "leaderboard.md").exists()

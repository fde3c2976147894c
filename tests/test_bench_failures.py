"""The benchmark runner fails loudly, early and in one line: stale caches, outputs it cannot write, Ctrl-C, bad grids.

Issue 18 ("Nothing wrong in silence"): each class of defect it found has a test here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fire_bench.grid import load_grid
from fire_bench.runner import run_grid
from fire_defense import FireDefenseError

from helpers import Recording, child_processes, write_idx

PROTOCOL = {"clean_size": 60, "k": 3, "defender_share": 0.2, "eval_clean": 30, "eval_poisoned": 30}


class Refusing:
    """An executor that must not be reached: the run should have stopped before any work."""

    def map(self, fn, items):
        if items:
            raise AssertionError(f"work started on {len(items)} items")
        return iter(())


def write_grid(path: Path, records_dir: Path | None, **overrides) -> Path:
    grid = {
        "protocol": PROTOCOL,
        "seeds": [0],
        "defenses": [{"name": "none"}, {"name": "bitdepth"}],
        "latency": None,
        "k_curve": None,
        **({"records": str(records_dir)} if records_dir is not None else {}),
        **overrides,
    }
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.fixture
def bb_root(tmp_path):
    """A BackdoorBench-layout root of its own (tests change its files): ``data/fashionmnist`` whose images encode
    their label in their brightness, and ``record/<name>``: a model trained on them for seconds, so that what it
    predicts depends on what it is shown."""
    from fire_adapters.factory import RecordRecipe, make_record
    from fire_adapters.training import TrainConfig

    root, rng = tmp_path / "bb", np.random.default_rng(0)
    folder = root / "data" / "fashionmnist"
    folder.mkdir(parents=True)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.clip(25 * labels[:, None, None].astype(int) + rng.integers(0, 20, (n, 28, 28)), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8), compress=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress=True)
    recipe = RecordRecipe("fashionmnist", "badnet", train=TrainConfig(epochs=4, batch_size=32))
    made = make_record(recipe, root / "record", data_root=root / "data", progress=False)
    made.path.rename(root / "record" / "badnet_a")
    return root


# --- 1. the cache covers everything a cell reads ------------------------------------------------------------------


def _zero_idx_images(path: Path) -> None:
    """Overwrite an IDX image file (gzipped, as the fake record's) with black images of the same count and size."""
    import gzip

    with gzip.open(path, "rb") as handle:
        header = handle.read(16)
    count, height, width = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
    write_idx(path.with_suffix(""), np.zeros((count, height, width), np.uint8), compress=True)


def _blacken_pngs(root: Path) -> None:
    for png in (root / "record" / "badnet_a").rglob("*.png"):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)


def _as_a_new_process() -> None:
    """Forget what this process memoised of records (a rerun is a new process)."""
    from fire_bench import cells

    for memo in (cells.record_fingerprint, cells._load, cells._split):
        memo.cache_clear()


CHANGES = {
    "clean test images": lambda root: _zero_idx_images(root / "data" / "fashionmnist" / "t10k-images-idx3-ubyte.gz"),
    "clean train images (the defender's reference)": lambda root: _zero_idx_images(
        root / "data" / "fashionmnist" / "train-images-idx3-ubyte.gz"
    ),
    "poisoned PNGs": _blacken_pngs,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rerun_after_a_cells_inputs_changed_equals_a_fresh_run(bb_root, tmp_path, change):
    """The stale-cache case: change what a cell reads, rerun into the same cache; it must match a fresh run."""
    defenses = [{"name": "none"}, {"name": "clipping"}]  # clipping is calibrated on the clean reference
    grid = load_grid(write_grid(tmp_path / "g.yaml", bb_root / "record", defenses=defenses))
    before = run_grid(grid, tmp_path / "out", executor=Recording()).rows
    CHANGES[change](bb_root)
    _as_a_new_process()
    rerun = Recording()
    again = run_grid(grid, tmp_path / "out", executor=rerun).rows
    fresh = run_grid(grid, tmp_path / "fresh", executor=Recording()).rows
    metrics = ("test_acc", "test_asr", "test_ra")
    assert [[r[m] for m in metrics] for r in fresh] != [[r[m] for m in metrics] for r in before], "no-op change"
    assert len(rerun.given) == len(grid.defenses), f"a change to the {change} served cached cells"
    assert [[r[m] for m in metrics] for r in again] == [[r[m] for m in metrics] for r in fresh]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A small record of the usual kind (an untrained model), shared by the tests that do not change it."""
    from helpers import write_fake_record

    root = tmp_path_factory.mktemp("bb")
    write_fake_record(root, name="badnet_a", n_train=300, n_test=150, seed=0)
    return root / "record"


BAD_CACHE_FILES = {
    "empty": b"",
    "truncated": b'{"key": "x", "test_acc": 0.',
    "not UTF-8": b"\xff\xfe\x00garbage",
    "not a mapping": b"[1, 2]",
    "another cell's result": b'{"key": "someone-else", "test_acc": 1.0}',
}


@pytest.mark.parametrize("content", list(BAD_CACHE_FILES))
def test_a_bad_cache_file_is_named_set_aside_and_computed_again(records, tmp_path, capsys, content):
    grid = load_grid(write_grid(tmp_path / "g.yaml", records, defenses=[{"name": "none"}]))
    first = run_grid(grid, tmp_path / "out", executor=Recording()).rows
    (cached,) = (tmp_path / "out" / "cache").glob("*.json")
    cached.write_bytes(BAD_CACHE_FILES[content])
    capsys.readouterr()
    rerun = Recording()
    again = run_grid(grid, tmp_path / "out", executor=rerun).rows
    said = [line for line in capsys.readouterr().out.splitlines() if str(cached) in line]
    assert len(said) == 1 and f"moved it to {cached.name}.corrupt" in said[0]
    assert len(rerun.given) == 1 and again == first  # computed again, the same
    assert cached.with_name(cached.name + ".corrupt").read_bytes() == BAD_CACHE_FILES[content]
    assert run_grid(grid, tmp_path / "out", executor=Refusing()).rows == first  # whole again: served


# --- 2. every output location is checked before any work -----------------------------------------------------------


def _a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    return path


OUTPUTS = {  # how to break it -> (run_grid's keyword arguments, what the one line says)
    "--out is a file": (lambda tmp: {"out": _a_file(tmp / "out")}, "is not a folder"),
    "--out below a file": (lambda tmp: {"out": _a_file(tmp / "file") / "out"}, "is not a folder"),
    "the cache folder is a file": (lambda tmp: {"out": _a_file(tmp / "out" / "cache").parent}, "cache folder"),
    "--records-root is a file": (lambda tmp: {"records_root": _a_file(tmp / "records")}, "records folder"),
}


@pytest.mark.parametrize("case", list(OUTPUTS))
def test_an_output_location_that_cannot_be_written_stops_the_run_before_any_work(records, tmp_path, case):
    arguments, said = OUTPUTS[case]
    made = case.startswith("--records-root")  # a grid that makes its records: nothing may be trained
    grid_file = write_grid(
        tmp_path / "g.yaml", None if made else records, make={"attacks": ["badnet"]} if made else None
    )
    kwargs = {"out": tmp_path / "results", **arguments(tmp_path)}
    with pytest.raises(FireDefenseError, match=said) as error:
        run_grid(load_grid(grid_file), executor=Refusing(), **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("data", ["missing", "a file"])
def test_a_data_folder_that_is_not_one_stops_the_run_before_any_work(records, tmp_path, data):
    root = tmp_path / "missing" if data == "missing" else _a_file(tmp_path / "data")
    with pytest.raises(FireDefenseError, match="does not exist or is not a folder; fix --data"):
        run_grid(
            load_grid(write_grid(tmp_path / "g.yaml", records)),
            tmp_path / "out",
            data_root=str(root),
            executor=Refusing(),
        )
    assert not (tmp_path / "out").exists()


def test_an_output_folder_without_write_permission_stops_the_run_before_any_work(records, tmp_path, monkeypatch):
    """Read-only ``--out`` (simulated: the tests may run as root, whom permissions do not stop)."""
    out = tmp_path / "results"
    write_bytes = Path.write_bytes

    def read_only(self, data):
        if self.parent == out:
            raise PermissionError(13, "Permission denied", str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    grid = load_grid(write_grid(tmp_path / "g.yaml", records))
    with pytest.raises(FireDefenseError, match=r"cannot write to the output folder \(--out\) .*Permission denied"):
        run_grid(grid, out, executor=Refusing())


def test_fire_report_to_a_file_fails_in_one_line_before_any_work(records, tmp_path, capsys):
    from fire_bench.__main__ import main

    target, grid = _a_file(tmp_path / "report"), write_grid(tmp_path / "g.yaml", records)
    started = time.monotonic()
    command = ["fire-report", "--records", str(records), "--grid", str(grid), "--out", str(target), "--workers", "1"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fire-bench: error:") and "is not a folder" in err and "\n" not in err
    assert time.monotonic() - started < 10 and target.read_text() == "not a folder"


# --- the BackdoorBench installer: all or nothing, and inside the checkout ------------------------------------------


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "BackdoorBench"
    (root / "defense").mkdir(parents=True)
    (root / "defense" / "base.py").write_text("")
    return root


def _all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def test_the_installer_writes_nothing_when_one_target_cannot_be_written(checkout, monkeypatch):
    from fire_bench.backdoorbench.install import install

    before = _all_files(checkout)
    write_text = Path.write_text

    def read_only_config(self, *args, **kwargs):
        if "config" in self.relative_to(checkout).parts:
            raise PermissionError(13, "Permission denied", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only_config)
    with pytest.raises(FireDefenseError, match="nothing was installed"):
        install(checkout)
    assert _all_files(checkout) == before and not (checkout / "config").exists()  # no defense/fire.py either
    monkeypatch.undo()
    assert len(install(checkout)) == 6 and (checkout / "defense" / "fire.py").is_file()


@pytest.mark.parametrize("link", ["config", "config/defense", "config/defense/fire", "defense/fire.py"])
def test_the_installer_refuses_a_symlink_out_of_the_checkout(checkout, tmp_path, link):
    from fire_bench.backdoorbench.install import install, uninstall

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (checkout / link).parent.mkdir(parents=True, exist_ok=True)
    (checkout / link).symlink_to(outside / "fire.py" if link.endswith(".py") else outside)
    before = _all_files(checkout)
    with pytest.raises(FireDefenseError, match=r"leads out of the checkout|not written by fire-defense"):
        install(checkout)
    assert _all_files(outside) == set() and _all_files(checkout) == before
    removed, _ = uninstall(checkout)
    assert removed == [] and _all_files(outside) == set()


# --- 3. Ctrl-C ---------------------------------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie, exited but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ctrl_c_stops_a_run_within_seconds_keeps_its_cells_and_says_so_in_one_line(records, tmp_path):
    defenses = [{"name": "none"}, {"name": "jpeg"}, {"name": "bitdepth"}, {"name": "strip", "params": {"n_copies": 10}}]
    grid_file = write_grid(tmp_path / "g.yaml", records, defenses=defenses, seeds=[0, 1, 2, 3])  # 16 cells, strip first
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fire_bench", "run", "--grid", str(grid_file), "--out", str(out)]
    run = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "cache").glob("*.json")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before it could be interrupted"
        workers = child_processes(run.pid)
        interrupted = time.monotonic()
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=30)
        stopped = time.monotonic() - interrupted
    finally:
        if run.poll() is None:
            run.kill()
    cached = sorted((out / "cache").glob("*.json"))
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("cells")]
    assert run.returncode == 130 and stopped < 15, (run.returncode, stopped, stderr[-2000:])
    assert lines == [f"fire-bench: interrupted: {len(cached)} of 16 cells cached; run again to resume"]  # alone
    assert "Traceback" not in stderr + stdout and 1 <= len(cached) < 16
    deadline = time.monotonic() + 10
    while (alive := {pid for pid in workers if _running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, "workers outlived the interrupted run"
    for path in cached:
        assert json.loads(path.read_text())["key"] == path.stem  # whole

    rerun = Recording()  # the rerun resumes: only what was not cached runs
    assert len(run_grid(load_grid(grid_file), out, executor=rerun).rows) == 16 and len(rerun.given) == 16 - len(cached)


# --- 4. a grid is checked whole when it is loaded ------------------------------------------------------------------

BAD_GRIDS = {  # the tries and their kin -> (the grid's overrides, what the one line must name)
    "k: ten": ({"protocol": {**PROTOCOL, "k": "ten"}}, "protocol: k must be an integer >= 1"),
    "k: -5": ({"protocol": {**PROTOCOL, "k": -5}}, "protocol: k must be an integer >= 1"),
    "clean_size: -10": ({"protocol": {**PROTOCOL, "clean_size": -10}}, "protocol: clean_size must be"),
    "eval_clean: -1": ({"protocol": {**PROTOCOL, "eval_clean": -1}}, "protocol: eval_clean must be"),
    "defender_share: 1.5": ({"protocol": {**PROTOCOL, "defender_share": 1.5}}, "protocol: defender_share must be"),
    "defender_share: nan": ({"protocol": {**PROTOCOL, "defender_share": float("nan")}}, "defender_share must be"),
    "seeds: 0": ({"seeds": 0}, "seeds must be a non-empty list"),
    "seeds: [-1]": ({"seeds": [-1]}, "seeds must be a non-empty list"),
    "seeds: [0, 0]": ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct"),
    "latency.batch_sizes: [0]": ({"latency": {"batch_sizes": [0]}}, "latency: batch_sizes must be"),
    "latency.rounds: 0": ({"latency": {"rounds": 0}}, "latency: rounds must be an integer >= 1"),
    "latency.max_seconds: 0": ({"latency": {"max_seconds": 0}}, "latency: max_seconds must be"),
    "latency.threads: 1.5": ({"latency": {"threads": 1.5}}, "latency: threads must be"),
    "k_curve.ks: [0, 5]": ({"k_curve": {"ks": [0, 5]}}, "k_curve: ks must be"),
    "k_curve.reservoir: 0": ({"k_curve": {"reservoir": 0}}, "k_curve: reservoir must be"),
    "k_curve.mode: 3": ({"k_curve": {"mode": 3}}, "k_curve: params.mode of fire-stream must be one of"),
    "make.epochs: 1.5": ({"make": {"epochs": 1.5}}, "make: epochs must be an integer >= 1"),
    "make.attacks: [badnt]": ({"make": {"attacks": ["badnt"]}}, "make: attacks: unknown attack 'badnt'"),
    "make.datasets: cifar11": ({"make": {"datasets": ["cifar11"]}}, "make: datasets: unknown dataset 'cifar11'"),
    "make.model: resnet99": ({"make": {"model": "resnet99"}}, "make: model: unknown model 'resnet99'"),
    "make.seeds: [a]": ({"make": {"seeds": ["a"]}}, "make: seeds must be"),
    "a misspelt parameter": (
        {"defenses": [{"name": "none"}, {"name": "jpeg", "params": {"qualty": 50}}]},
        "defenses[1]: jpeg has no parameter qualty; its parameters: quality",
    ),
    "a parameter of the wrong type": (
        {"defenses": [{"name": "none"}, {"name": "jpeg", "params": {"quality": "high"}}]},
        "defenses[1]: params.quality of jpeg must be int, got 'high'",
    ),
    "a NaN parameter": (
        {"defenses": [{"name": "none"}, {"name": "fire", "params": {"alpha": float("nan")}}]},
        "defenses[1]: params.alpha of fire must be a finite number",
    ),
    "mode: gaet": (
        {"defenses": [{"name": "none"}, {"name": "fire", "params": {"mode": "gaet"}}]},
        "defenses[1]: params.mode of fire must be one of",
    ),
    "k_curve.mode: gaet": ({"k_curve": {"mode": "gaet"}}, "k_curve: params.mode of fire-stream must be one of"),
    "a seed parameter": (
        {"defenses": [{"name": "none"}, {"name": "jpeg", "params": {"seed": 3}}]},
        "defenses[1]: params.seed: the grid's seeds seed jpeg",
    ),
    "batch_size: 0": (
        {"defenses": [{"name": "none"}, {"name": "jpeg", "params": {"batch_size": 0}}]},
        "defenses[1]: params.batch_size must be an integer >= 1",
    ),
    "params not a mapping": ({"defenses": [{"name": "none"}, {"name": "jpeg", "params": [1]}]}, "params must be"),
    "a defense name that is not a string": ({"defenses": [{"name": "none"}, {"name": 5}]}, "name must be"),
    "name: ../escape": ({"name": "../escape"}, "name must be a plain name"),
    "records: 5": ({"records": 5}, "records must be a folder path"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_a_bad_grid_is_refused_when_loaded_in_one_line_naming_the_key(records, tmp_path, case):
    overrides, said = BAD_GRIDS[case]
    path = write_grid(tmp_path / "g.yaml", None if "records" in overrides else records, **overrides)
    with pytest.raises(FireDefenseError) as error:
        load_grid(path)
    message = str(error.value)
    assert said in message and message.startswith(str(path)) and "\n" not in message


def test_a_bad_grid_stops_the_command_before_any_record_is_trained(tmp_path, capsys):
    from fire_bench.__main__ import main

    path = write_grid(tmp_path / "g.yaml", None, make={"attacks": ["badnet"]}, protocol={**PROTOCOL, "k": "ten"})
    code = main(["run", "--grid", str(path), "--out", str(tmp_path / "out"), "--records-root", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"fire-bench: error: {path}: protocol: k must be an integer >= 1, got 'ten'."
    assert not (tmp_path / "r").exists() and not (tmp_path / "out").exists()


def test_fire_report_checks_its_k_before_any_work(records, tmp_path, capsys):
    from fire_bench.__main__ import main

    grid = write_grid(tmp_path / "g.yaml", records)
    command = ["fire-report", "--records", str(records), "--grid", str(grid), "--out", str(tmp_path / "o")]
    assert main([*command, "--k", "-5"]) == 2
    assert "k must be an integer >= 1, got -5" in capsys.readouterr().err and not (tmp_path / "o").exists()


# --- run_cli: nothing a user can cause ends in a traceback -------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "status", "said"),
    [
        (FireDefenseError("bad input; fix it."), 2, "tool: error: bad input; fix it."),
        (PermissionError(13, "Permission denied", "/some/file"), 1, "tool: error: Permission denied: /some/file;"),
        (OSError(28, "No space left on device"), 1, "tool: error: No space left on device;"),
        (KeyboardInterrupt(), 130, "tool: interrupted"),
    ],
)
def test_run_cli_turns_what_a_user_can_cause_into_one_line(capsys, raised, status, said):
    from fire_defense.errors import run_cli

    def command():
        raise raised

    assert run_cli("tool", command) == status
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1

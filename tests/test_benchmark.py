"""The benchmark runner: grids as data, cells that never leak, cache and resume, metrics, outputs, executors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fire_adapters import load_record, safe_torch_load, to_tensor
from fire_bench.atomic import write_atomically
from fire_bench.cells import Cell, record_fingerprint, run_cell
from fire_bench.executors import LocalExecutor, create_executor
from fire_bench.grid import DefenseSpec, Protocol, load_grid
from fire_bench.report import latency_check, leaderboard, pivot_markdown
from fire_bench.runner import grid_cells, run_grid
from fire_defense import FireDefenseError, UnknownNameError
from fire_defense.metrics import REJECTED, auroc, backdoor_metrics, defense_effectiveness_rating

from helpers import Recording, child_processes, write_fake_record

PROTOCOL = {"clean_size": 120, "k": 5, "defender_share": 0.2, "eval_clean": 40, "eval_poisoned": 40}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    write_fake_record(root, name="badnet_a", n_train=300, n_test=150, seed=0)
    return root / "record"


@pytest.fixture(scope="module")
def other_record(tmp_path_factory):
    return write_fake_record(tmp_path_factory.mktemp("bb2"), name="badnet_a", n_train=300, n_test=150, seed=1)


def write_grid(path: Path, records: Path, defenses: list[dict], **overrides) -> Path:
    grid = {
        "records": str(records),
        "protocol": PROTOCOL,
        "seeds": [0, 1],
        "defenses": defenses,
        "latency": {"batch_sizes": [1, 8], "rounds": 1, "min_seconds": 0.001},
        "k_curve": {"ks": [1, 3], "mode": "gate"},
        **overrides,
    }
    path.write_text(yaml.safe_dump(grid))
    return path


# --- grids ----------------------------------------------------------------------------------------------------


def test_shipped_grids_load_and_name_real_defenses():
    default, quick, fire = load_grid("default"), load_grid("quick"), load_grid("fire")
    check = load_grid("fire-check")  # FIRE v2's check: existing records, the default's protocol, no k-curve
    assert check.make is None and check.k_curve is None and check.protocol == default.protocol
    assert fire.protocol.eval_clean is None and {d.label for d in fire.defenses} > {"none", "fire", "fire-v1-gate"}
    assert default.make.attacks == ("badnet", "blended", "sig", "wanet") and default.make.datasets == ("fashionmnist",)
    assert {d.name for d in default.defenses} >= {"none", "fire", "shrinkpad", "jpeg", "clipping", "strip"}
    assert len(quick.defenses) < len(default.defenses) and quick.protocol.eval_clean < default.protocol.eval_clean


def test_a_grid_makes_records_in_blocks(tmp_path):
    thorough, vit = load_grid("thorough"), load_grid("thorough-vit")  # blocks: all attacks on one model, few on others
    names = [recipe.name for recipe in thorough.recipes()]
    assert len(names) == len(set(names)) and isinstance(thorough.make, tuple) and len(thorough.make) == 3
    assert {r.model for r in thorough.recipes()} == {"preactresnet18_w8", "vgg19_bn_w8"}
    assert {r.seed for r in thorough.recipes()} == {0, 1, 2} and {d.name for d in thorough.defenses} >= {"bdmae"}
    # the ViT's grid scores as the thorough grid does, with every defense but the one that needs BatchNorm
    assert {r.model for r in vit.recipes()} == {"vit_p4_d6"} and {r.seed for r in vit.recipes()} == {0, 1, 2}
    assert (vit.protocol, vit.seeds, vit.k_curve, vit.latency) == (
        thorough.protocol,
        thorough.seeds,
        thorough.k_curve,
        thorough.latency,
    )
    assert vit.defenses == tuple(d for d in thorough.defenses if d.name != "ibd-psc")
    assert load_grid("default").recipes() == load_grid("default").make.recipes()  # one block: the same records
    block = {"datasets": ["fashionmnist"], "attacks": ["badnet"], "seeds": [0]}
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump({"make": [block, {**block, "seeds": [0, 1]}], "defenses": [{"name": "none"}]}))
    with pytest.raises(
        FireDefenseError, match="two blocks make the record fashionmnist_preactresnet18_w8_badnet_seed0"
    ):
        load_grid(path)
    path.write_text(yaml.safe_dump({"make": [block, {**block, "sedes": [1]}], "defenses": [{"name": "none"}]}))
    with pytest.raises(FireDefenseError, match=r"make\[1\]: unknown key\(s\) sedes"):
        load_grid(path)


def test_grid_errors_name_the_problem(tmp_path, records):
    shipped = (
        "adaptive, all-to-all, architectures, bdmae, default, fire, fire-aware, fire-check, frequency, paper, quick, "
        "thorough, thorough-vit"
    )
    with pytest.raises(FireDefenseError, match=f"shipped grids: {shipped}"):
        load_grid("nonexistent")
    bad = write_grid(tmp_path / "a.yaml", records, [{"name": "none"}], protocl={"k": 1})
    with pytest.raises(FireDefenseError, match=r"unknown key.*protocl"):
        load_grid(bad)
    with pytest.raises(FireDefenseError, match="unknown defense 'strp'"):
        load_grid(write_grid(tmp_path / "b.yaml", records, [{"name": "none"}, {"name": "strp"}]))
    with pytest.raises(FireDefenseError, match="labels must be unique"):
        load_grid(write_grid(tmp_path / "c.yaml", records, [{"name": "none"}, {"name": "fire"}, {"name": "fire"}]))
    with pytest.raises(FireDefenseError, match="include the 'none' defense"):
        load_grid(write_grid(tmp_path / "d.yaml", records, [{"name": "jpeg"}]))
    (tmp_path / "e.yaml").write_text("defenses: [")
    with pytest.raises(FireDefenseError, match="not valid YAML"):
        load_grid(tmp_path / "e.yaml")
    with pytest.raises(UnknownNameError):
        create_executor("slurm")
    with pytest.raises(FireDefenseError, match="workers must be >= 1"):
        LocalExecutor(workers=0)


# --- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    assert auroc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert auroc([0.5, 0.5], [0.5, 1.0]) == pytest.approx(0.75)  # a tie counts one half
    assert auroc([0.0], [1.0]) == 1.0 and auroc([1.0], [0.0]) == 0.0
    m = backdoor_metrics(
        np.array([1, 2, REJECTED, 3]), np.array([1, 2, 2, 0]), np.array([0, REJECTED, 5]), np.array([4, 4, 5]),
        np.array([0, 0, 0]),
    )  # fmt: skip
    assert m == {"test_acc": 0.5, "test_asr": pytest.approx(1 / 3), "test_ra": pytest.approx(1 / 3)}
    assert defense_effectiveness_rating(0.9, 0.1, 0.9, 0.85) == pytest.approx((0.8 - 0.05 + 1) / 2)
    cells = [
        {"record": "r", "seed": s, "dataset": "d", "backbone": "b", "attack_name": "a", "ratio": 0.1, "split": f"x{s}",
         "defense_name": name, "defense": name, "test_acc": acc, "test_asr": asr, "test_ra": 1 - asr, "table": table}
        for s, name, acc, asr, table in [(0, "none", .9, 1., "leaderboard"), (1, "none", .8, 1., "leaderboard"),
                                         (0, "d1", .9, .2, "leaderboard"), (1, "d1", .7, .4, "leaderboard"),
                                         (0, "d1", .0, .0, "k_curve")]
    ]  # fmt: skip
    timings = [{"dataset": "d", "backbone": "b", "defense_name": "d1", "latency_b1_ratio": 3.0, "fit_s": 2.0}]
    board = {row["defense_name"]: row for row in leaderboard(cells, timings)}
    assert board["d1"]["test_acc"] == pytest.approx(0.8) and board["d1"]["test_acc_std"] == pytest.approx(0.1)
    assert board["d1"]["der"] == pytest.approx(((0.8 + 1) / 2 + (0.6 - 0.1 + 1) / 2) / 2)  # per seed, then mean
    assert board["none"]["der"] == pytest.approx(0.5) and board["d1"]["seeds"] == 2  # the k-curve row is not in it
    assert board["d1"]["latency_b1_ratio"] == 3.0 and "latency_b1_ratio" not in board["none"]
    # record seeds pool as protocol seeds do: a second record of the same attack joins its row, another attack not
    again = [{**c, "record": "r-seed1", "test_acc": c["test_acc"] - 0.1} for c in cells if c["seed"] == 0]
    other = [{**c, "record": "q", "attack_name": "a-all2all"} for c in cells]
    rows = {(r["attack_name"], r["defense_name"]): r for r in leaderboard(cells + again + other, timings)}
    assert len(rows) == 4 and (rows["a", "d1"]["seeds"], rows["a", "d1"]["records"]) == (3, 2)
    assert (
        rows["a", "d1"]["test_acc"] == pytest.approx((0.9 + 0.7 + 0.8) / 3) and rows["a-all2all", "d1"]["records"] == 1
    )
    assert rows["a", "d1"]["test_acc_std"] == pytest.approx(np.std([0.9, 0.7, 0.8]))
    pivot = pivot_markdown(leaderboard(cells + again + other, timings)).splitlines()
    assert pivot[:4] == ["## d, b", "", "| defense | a | a-all2all | mean |", "|---|---|---|---|"]
    assert pivot[5] == "| d1 | 80.0 / 26.7 / 73.3 | 80.0 / 30.0 / 70.0 | 80.0 / 28.3 / 71.7 |"


def test_the_latency_check_says_when_the_undefended_ratio_is_off():
    def none(b1: float, b128: float) -> dict:
        return {
            "dataset": "d",
            "backbone": "b",
            "defense_name": "none",
            "latency_b1_ratio": b1,
            "latency_b128_ratio": b128,
        }

    assert latency_check([none(1.01, 0.97)]).startswith("latency check: ok")
    for off in (none(1.06, 1.0), none(1.0, 0.94)):
        assert "FAILED" in latency_check([off]) and "1.00 +- 0.05" in latency_check([off])
    assert "not measured" in latency_check([])


# --- cells ------------------------------------------------------------------------------------------------------


def test_a_cell_never_shows_the_defense_its_evaluation_samples(records, tmp_path, monkeypatch):
    """Spy on what fit receives: none of it may be an image the cell is scored on."""
    from fire_bench import cells as cells_module
    from fire_bench.defenses.base import RuntimeDefense

    seen_at_fit, scored = [], []
    fit, decide = RuntimeDefense.fit, RuntimeDefense.decide

    def spy_fit(self, model, clean, poisoned=None, trigger=None, clean_labels=None):
        seen_at_fit.extend(x for x in (clean, poisoned) if x is not None)
        return fit(self, model, clean, poisoned, trigger, clean_labels)

    def spy_decide(self, x):
        scored.append(x)
        return decide(self, x)

    monkeypatch.setattr(RuntimeDefense, "fit", spy_fit)
    monkeypatch.setattr(RuntimeDefense, "decide", spy_decide)
    cell = Cell(str(records / "badnet_a"), DefenseSpec("fire"), Protocol(**PROTOCOL), 0)
    result = run_cell(cell, tmp_path)
    fitted = np.concatenate([x.flatten(1).numpy() for x in seen_at_fit])
    evaluated = np.concatenate([x.flatten(1).numpy() for x in scored])  # the clean and the poisoned evaluation
    assert len(scored) == 2 and len(evaluated) == 80 and len(fitted) == 120 + 5  # reference, k poisoned
    distances = np.abs(fitted[:, None, :] - evaluated[None, :, :]).sum(-1)
    assert distances.min() > 0, "a defense saw an image it is scored on"
    assert "disjoint indices (seed 0)" in result["split"] and "40 clean and 40 poisoned" in result["split"]
    assert cells_module.cached_result(cell, tmp_path) == result


def test_a_cell_is_keyed_by_its_inputs(records, other_record):
    base = Cell(str(records / "badnet_a"), DefenseSpec("jpeg"), Protocol(**PROTOCOL), 0)
    variants = [
        Cell(str(other_record), DefenseSpec("jpeg"), Protocol(**PROTOCOL), 0),
        Cell(str(records / "badnet_a"), DefenseSpec("jpeg", {"quality": 50}), Protocol(**PROTOCOL), 0),
        Cell(str(records / "badnet_a"), DefenseSpec("jpeg"), Protocol(**{**PROTOCOL, "k": 6}), 0),
        Cell(str(records / "badnet_a"), DefenseSpec("jpeg"), Protocol(**PROTOCOL), 1),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 5
    moved = Cell(str(records / "badnet_a"), DefenseSpec("jpeg"), Protocol(**PROTOCOL), 0, device="cuda")
    assert moved.key == base.key  # where it runs does not change what it computes


def test_the_record_fingerprint_covers_its_images_and_weights_but_not_its_timing(tmp_path, monkeypatch):
    record = write_fake_record(tmp_path, n_train=300, n_test=150)
    path = record / "attack_result.pt"

    def fingerprint() -> str:
        record_fingerprint.cache_clear()
        return record_fingerprint(str(record))

    def rewrite(**changes) -> None:
        content = safe_torch_load(path)
        content.update(changes)
        torch.save(content, path)

    rewrite(train_seconds=10.0)
    first = fingerprint()
    rewrite(train_seconds=99.0)  # the same record, rebuilt: only its timing differs
    assert fingerprint() == first
    png = next(iter(sorted((record / "bd_test_dataset").rglob("*.png"))))
    original = png.read_bytes()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)  # a blackened poisoned image
    assert fingerprint() != first
    png.write_bytes(original)
    assert fingerprint() == first
    state = safe_torch_load(path)["model"]
    rewrite(model={k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    assert fingerprint() != first


def test_a_cells_cost_builds_its_defense_once(records, monkeypatch):
    from fire_bench import cells as cells_module

    built = []
    create = cells_module.create_defense
    monkeypatch.setattr(cells_module, "create_defense", lambda *a, **k: built.append(a) or create(*a, **k))
    cell = Cell(str(records / "badnet_a"), DefenseSpec("strip"), Protocol(**PROTOCOL), 0)
    assert cell.cost == cell.cost == cell.cost == 103 and len(built) == 1


def test_interleaved_timing_stops_once_its_median_is_precise():
    from fire_bench.timing import interleaved_ratio

    def run(**stop) -> int:
        timings: dict[str, list[float]] = {}
        interleaved_ratio(lambda: None, lambda: None, rounds=9, repeat=1, timings=timings, **stop)
        return len(timings["variant"])

    assert run() == 9 and run(min_rounds=3, precision=0.0) == 9  # no rule, or one no median can meet
    assert run(min_rounds=3, precision=1e9) == 3  # any spread meets this one: it stops at min_rounds


def test_a_timed_call_on_a_gpu_waits_for_the_device(monkeypatch):
    from fire_bench.timing import synchronized

    def call() -> str:
        return "done"

    assert synchronized(call, torch.device("cpu")) is call  # the CPU runs synchronously: nothing to wait for
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append(f"sync {device}"))
    waited = synchronized(lambda: events.append("call") or "done", torch.device("cuda:0"))
    assert waited() == "done" and events == ["call", "sync cuda:0"]


def test_an_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "out" / "result.json"
    write_atomically(target, lambda path: path.write_text("old"))

    def fail(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["result.json"]


# --- the runner end to end -----------------------------------------------------------------------------------


def test_a_grid_end_to_end_and_a_rerun_recomputes_nothing(records, tmp_path):
    from fire_bench.defenses import list_defenses

    grid = load_grid(write_grid(tmp_path / "grid.yaml", records, [{"name": n} for n in list_defenses()]))
    out = tmp_path / "results"
    results = run_grid(grid, out, executor=Recording())
    cells = results.rows
    assert len(cells) == 2 * len(grid.defenses) + 2 * 2  # one record x two seeds, and two points of each k-curve
    curve = [c for c in cells if c["table"] == "k_curve"]
    assert [(c["seed"], c["k"], c["defense"]) for c in curve] == [(s, k, "fire-stream") for s in (0, 1) for k in (1, 3)]
    assert [row.split(",")[3] for row in (out / "k_curve.csv").read_text().splitlines()[1:]] == ["1", "3", "1", "3"]
    # the latency phase timed each defense once (one record, the first seed), the undefended model against itself too
    assert sorted(t["defense_name"] for t in results.timings) == sorted(d.label for d in grid.defenses)
    assert all(t["latency_b1_rounds"] >= 1 and t["fit_s"] > 0 for t in results.timings)
    header = (out / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == [
        "dataset",
        "backbone",
        "attack_name",
        "defense_name",
        "ratio",
        "test_acc",
        "test_asr",
        "test_ra",
    ]
    assert {"der", "forward_passes", "latency_b1_ratio", "latency_b8_ratio", "peak_mem_mb", "split"} <= set(header)
    bounds = {f"{m}_ci_{s}" for m in ("test_acc", "test_asr", "test_ra", "der", "tpr", "fpr") for s in ("low", "high")}
    assert bounds <= set(header) and "outcomes" not in header  # the intervals' bounds, not the per-sample outcomes
    assert " ± " in (out / "leaderboard.md").read_text() and "_ci_" not in (out / "leaderboard.md").read_text()
    page = (out / "leaderboard.html").read_text()
    assert "<table>" in page and "addEventListener('click'" in page and "strip" in page
    for plot in ("asr_vs_latency.png", "per_attack.png", "k_curve.png"):
        assert (out / plot).stat().st_size > 1000
    board = [r for r in leaderboard(cells) if r["defense_name"] == "strip"]
    assert board[0]["forward_passes"] == 101 and 0 <= board[0]["fpr"] <= 1 and board[0]["seeds"] == 2
    summary = (out / "summary.txt").read_text()
    assert "Mean over attacks" in summary and "latency check: " in summary
    assert "latency check: " in (out / "leaderboard.md").read_text()
    chosen = (out / "choices.md").read_text().splitlines()  # where FIRE acted, per record and seed
    fire_cells = [c for c in cells if c["defense_name"] == "fire" and c["table"] == "leaderboard"]
    fire_lines = [line for line in chosen if "| fire |" in line]
    assert len(fire_lines) == len(fire_cells) == 2
    assert all(f"| {cell['layers']} |" in line for cell, line in zip(fire_cells, fire_lines, strict=True))
    assert not [line for line in chosen if "| none |" in line]
    assert "| fire |" in (out / "pivot.md").read_text()

    again = Recording()  # no cell runs again, and no latency cell is timed again (new timings would differ)
    assert run_grid(grid, out, executor=again) == results and again.given == []


def test_resume_after_a_killed_run_recomputes_nothing_finished(records, tmp_path):
    # three seeds: the costliest cells (strip) run first, two at a time, so the third strip cell is still
    # running when the first result appears, whatever the machine's speed
    defenses = [{"name": "none"}, {"name": "jpeg"}, {"name": "strip"}]
    grid_file = write_grid(tmp_path / "grid.yaml", records, defenses, k_curve=None, seeds=[0, 1, 2])
    out = tmp_path / "results"
    run = subprocess.Popen(
        [sys.executable, "-m", "fire_bench", "run", "--grid", str(grid_file), "--out", str(out)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "cache").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the runner and its worker, mid-cell
        run.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "cache").glob("*.json")}
    grid = load_grid(grid_file)
    assert 1 <= len(finished) < len(grid_cells(grid, sorted(records.iterdir()))) == 9
    for text in (t for _, t in finished.values()):
        json.loads(text)  # every result on disk is whole

    rerun = Recording()
    results = run_grid(grid, out, executor=rerun).rows
    assert not {f"{cell.key}.json" for cell in rerun.given} & set(finished)  # nothing finished is recomputed
    assert len(results) == 9 and len(rerun.given) == 9 - len(finished)
    for name, (mtime, text) in finished.items():
        assert (out / "cache" / name).stat().st_mtime_ns == mtime and (out / "cache" / name).read_text() == text


def test_a_grid_trains_only_its_missing_records_through_the_executor(tmp_path, monkeypatch):
    import fire_adapters.factory as factory

    made: set[str] = set()

    def fake_make_record(recipe, out_dir, data_root=None, device=None, overwrite=False, progress=True):
        made.add(recipe.name)  # a small untrained record stands in for an hour of training
        root = write_fake_record(tmp_path / "bb" / recipe.name, name=recipe.name, n_train=300, n_test=150)
        (Path(out_dir) / recipe.name).parent.mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / recipe.name).symlink_to(root)
        return factory.MadeRecord(Path(out_dir) / recipe.name, recipe, {"test_acc": 0.1}, 1.0, cached=False)

    def fake_find(recipe, out_dir):
        path = Path(out_dir) / recipe.name
        return factory.MadeRecord(path, recipe, {}, 1.0, cached=True) if recipe.name in made else None

    monkeypatch.setattr(factory, "make_record", fake_make_record)
    monkeypatch.setattr(factory, "find_made_record", fake_find)
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "make": {"attacks": ["badnet", "blended"], "epochs": 1},
                "protocol": PROTOCOL,
                "seeds": [0],
                "defenses": [{"name": "none"}],
                "latency": {"batch_sizes": [1], "rounds": 1},
                "k_curve": None,
            }
        )
    )
    grid = load_grid(grid_file)
    first = Recording()
    results = run_grid(grid, tmp_path / "out", records_root=tmp_path / "records", executor=first).rows
    recipes = [item for item in first.given if isinstance(item, factory.RecordRecipe)]
    assert [r.attack for r in recipes] == ["badnet", "blended"] and len(results) == 2
    assert {r["record"] for r in results} == {r.name for r in recipes}
    again = Recording()
    run_grid(grid, tmp_path / "out", records_root=tmp_path / "records", executor=again)
    assert again.given == []  # the records were found, the cells cached


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_exit_when_the_runner_is_killed(records, tmp_path):
    grid_file = write_grid(tmp_path / "grid.yaml", records, [{"name": "none"}, {"name": "strip"}], k_curve=None)
    run = subprocess.Popen(
        [sys.executable, "-m", "fire_bench", "run", "--grid", str(grid_file), "--out", str(tmp_path / "out")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (workers := child_processes(run.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers, "the runner started no worker process"
        run.kill()  # the runner alone, as a scheduler or the OOM killer would: its workers get no signal
        run.wait()
        deadline = time.monotonic() + 15
        while (alive := {pid for pid in workers if Path(f"/proc/{pid}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, "worker processes outlived the runner"
    finally:
        os.killpg(run.pid, signal.SIGKILL) if run.poll() is None else None


def test_local_workers_and_ray_give_the_same_results_from_one_cache(records, tmp_path):
    pytest.importorskip("ray")
    grid = load_grid(
        write_grid(tmp_path / "g.yaml", records, [{"name": "none"}, {"name": "fire"}], seeds=[0], k_curve=None)
    )
    local = run_grid(grid, tmp_path / "local", executor=LocalExecutor(workers=2)).rows
    ray_run = run_grid(grid, tmp_path / "ray", executor=create_executor("ray")).rows  # a local Ray instance, loopback
    keep = ("key", "test_acc", "test_asr", "test_ra", "forward_passes")
    assert [{k: r[k] for k in keep} for r in local] == [{k: r[k] for k in keep} for r in ray_run]
    again = Recording()
    run_grid(grid, tmp_path / "ray", executor=again)
    assert again.given == []


def test_the_cli_runs_a_grid_and_reports_bad_input(records, tmp_path, capsys):
    from fire_bench.__main__ import main

    grid_file = write_grid(tmp_path / "g.yaml", records, [{"name": "none"}, {"name": "bitdepth"}], seeds=[0])
    assert main(["run", "--grid", str(grid_file), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "leaderboard.md" in capsys.readouterr().out
    assert "bitdepth" in (tmp_path / "out" / "leaderboard.md").read_text()
    assert main(["run", "--grid", str(grid_file), "--records", str(tmp_path / "nothing")]) == 2
    assert "no records" in capsys.readouterr().err
    clean = load_record(records / "badnet_a").clean_test
    assert to_tensor(clean.images[:1]).shape == (1, 1, 28, 28)

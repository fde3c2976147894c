"""The results page and its plots: the embedded data, the glossary, the plots' axes and labels, and the page in
a real browser (headless Chromium through Selenium: a filter, a sort, what is shown, a screenshot)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fire_bench.page import glossary, leaderboard_page, page_data
from fire_bench.plots import (
    asr_latency_figure,
    k_curve_figure,
    leaderboard_plots,
    per_attack_figure,
    place_labels,
    plot_k_curve,
)

ATTACKS = ("badnet", "blended", "sig", "wanet")
DEFENSES = ("none", *(f"d{i:02d}" for i in range(1, 15)))  # fifteen, as the default grid
SPLIT = "defender: 50 clean samples; evaluation: 40 clean and 40 poisoned test samples (seed 0)"
CI_METRICS = ("test_acc", "test_asr", "test_ra", "der")


def _board(datasets: tuple[str, ...] = ("fashionmnist",), seed: int = 0) -> list[dict]:
    """Leaderboard rows built by hand: every defense on every attack; even defenses carry 95% intervals
    (asymmetric), odd ones none, and ``d03`` only on its first attack."""
    rng = np.random.default_rng(seed)
    board = []
    for dataset in datasets:
        for attack in ATTACKS:
            for i, defense in enumerate(DEFENSES):
                acc, asr = 0.80 + 0.15 * rng.random(), 0.02 + 0.96 * rng.random()
                row = {
                    "dataset": dataset,
                    "backbone": "preactresnet18_w8",
                    "attack_name": attack,
                    "defense_name": defense,
                    "ratio": 0.1,
                    "test_acc": acc,
                    "test_asr": asr,
                    "test_ra": (1 - asr) * rng.random(),
                    # on blended every defense does worse than none (DER < 50): the best is still a defense
                    "der": 0.5 if defense == "none" else (0.1 if attack == "blended" else 0.3) + 0.35 * rng.random(),
                    "tpr": 0.9 * rng.random() if i in (4, 5) else None,
                    "fpr": 0.1 * rng.random() if i in (4, 5) else None,
                    "auroc": rng.random() if i in (4, 5, 6) else None,
                    "forward_passes": float(1 + 10 * (i % 3)),
                    "latency_b1_ratio": 1.0 + i,
                    "latency_b1_ms": 0.9 * (1 + i),
                    "latency_b1_rounds": 20,
                    "peak_mem_mb": 0.5,
                    "fit_s": 0.01 * i,
                    "seeds": 1,
                    "split": SPLIT,
                }
                if (i % 2 == 0 and defense != "none") or (defense == "d03" and attack == ATTACKS[0]):
                    for metric in CI_METRICS:
                        row[f"{metric}_ci_low"] = max(0.0, row[metric] - 0.01 - 0.02 * rng.random())
                        row[f"{metric}_ci_high"] = min(1.0, row[metric] + 0.01 * rng.random())
                board.append(row)
    return board


def _columns(board: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in board for k in row if k != "split"))


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', page, re.S)
    assert match, "the page embeds its data"
    return json.loads(match.group(1))


def _half_width(row: dict, metric: str) -> float | None:
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    return None if low is None or high is None else max(row[metric] - low, high - row[metric])


def _shown(rows: list[dict], metric: str) -> str:
    """What the ranking should show: the mean in percent, ``± sqrt(sum h^2) / n`` when every row has an interval."""
    mean = sum(r[metric] for r in rows) / len(rows)  # summed in order, as the page's script does
    widths = [_half_width(r, metric) for r in rows]
    if any(w is None for w in widths):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * math.sqrt(sum(w * w for w in widths)) / len(widths):.1f}"  # type: ignore[operator]


def _png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the page's content, without a browser ---------------------------------------------------------------------


def test_the_page_embeds_its_rows_and_works_offline():
    board = _board()
    board[0]["test_ra"] = float("nan")  # JSON has no NaN: it must travel as null
    page = leaderboard_page(board, _columns(board), "t", ["latency check: ok"], {"per_attack.png": _png()})
    data = _embedded(page)
    assert len(data["rows"]) == len(board) and data["rows"][0]["test_ra"] is None
    assert data["rows"][1]["test_acc"] == board[1]["test_acc"] and "split" not in data["rows"][1]
    assert data["rows"][2]["test_acc_ci_low"] == board[2]["test_acc_ci_low"]  # intervals travel with the rows (d02)
    # nothing is fetched: no address anywhere, every image a data URI, every script inline
    assert not re.search(r"https?://|//cdn|<link", page)
    assert re.findall(r'<img[^>]* src="([^"]{0,22})', page) == ["data:image/png;base64,"]
    assert not re.search(r"<script[^>]* src=", page)
    assert "latency check: ok" in page and "d14" in page


def test_plots_are_embedded_near_their_tables():
    images = {"asr_vs_latency.png": _png("red"), "per_attack.png": _png("blue"), "k_curve.png": _png("green")}
    page = leaderboard_page(_board(), _columns(_board()), "t", [], images)
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(f) for f in found] == [
        images[n] for n in ("asr_vs_latency.png", "per_attack.png", "k_curve.png")
    ]
    assert page.index('id="ranking"') < page.index(found[0]) < page.index('id="pivot"') < page.index(found[1])
    assert page.index('id="detectors"') < page.index(found[2]) < page.index("<details>")
    without = leaderboard_page(_board(), _columns(_board()), "t", [])
    assert "data:image" not in without and "FIRE streaming" not in without


def test_the_glossary_names_every_column_the_benchmark_writes():
    columns = [
        "dataset", "backbone", "attack_name", "defense_name", "ratio", "test_acc", "test_asr", "test_ra", "der",
        "tpr", "fpr", "auroc", "forward_passes", "fit_s", "latency_b1_ratio", "latency_b1_ms", "latency_b1_rounds",
        "peak_mem_mb", "latency_b128_ratio", "latency_b128_ms", "latency_b128_rounds", "seeds", "test_acc_std",
        "test_ra_std", "der_ci_low", "der_ci_high",
    ]  # fmt: skip
    meaning = glossary(columns)
    assert [c for c, text in meaning.items() if not text] == []
    assert "batch size 128" in meaning["latency_b128_ratio"] and "undefended" in meaning["latency_b128_ratio"]
    assert "true label" in meaning["test_ra"] and "test_acc" in meaning["test_acc_std"]
    assert glossary(["made_up"]) == {"made_up": None}
    # the page's own glossary lists every column of its full table, interval bounds folded into their metric
    data = page_data(_board(), _columns(_board()))
    assert not [c for c in data["columns"] if "_ci_" in c] and "der" in data["columns"]
    assert set(data["glossary"]) == set(data["columns"])
    page = leaderboard_page(_board(), _columns(_board()), "t", [])
    assert all(f"<code>{c}</code>" in page for c in data["columns"]) and "(not described)" not in page
    assert "mean ± h" in page  # how intervals are shown is stated


def test_the_protocol_is_one_sentence_and_names_are_escaped():
    board = _board()
    board[0]["defense_name"] = "</script><img src=x onerror=alert(1)>"
    page = leaderboard_page(board, _columns(board), "<t>", [])
    assert "</script><img" not in page and "<title>&lt;t&gt;</title>" in page
    assert _embedded(page)["rows"][0]["defense_name"] == board[0]["defense_name"]
    protocol = _embedded(page)["protocol"]
    assert protocol.count(". ") == 0 and protocol.endswith(".") and "40 clean and 40 poisoned" in protocol
    assert "(seed 0)" not in protocol  # one sentence for every seed


# --- the plots -------------------------------------------------------------------------------------------------


def _visible_ticks(axis, which: str) -> list[str]:
    labels = axis.get_xticklabels() if which == "x" else axis.get_yticklabels()
    return [t.get_text() for t in labels if t.get_visible() and t.get_text()]


def _curve() -> list[dict]:
    return [
        {"attack_name": a, "dataset": d, "backbone": "b", "k": k, "seed": s, "test_ra": 0.1 * k / (s + 1),
         "params": {"mode": "match"}}
        for d in ("fashionmnist", "mnist") for a in ("badnet", "sig") for s in (0, 1) for k in (1, 2, 5)
    ]  # fmt: skip


def test_every_plot_axis_has_tick_labels():
    board = _board()
    curve = [r for r in _curve() if r["dataset"] == "fashionmnist"]
    for figure in (asr_latency_figure(board), per_attack_figure(board), k_curve_figure(curve)):
        figure.canvas.draw()
        for axis in figure.axes:
            assert _visible_ticks(axis, "x") and _visible_ticks(axis, "y"), figure.axes.index(axis)
    # the PA panel shares its y axis with the ASR panel and still shows its own labels
    figure = per_attack_figure(board)
    figure.canvas.draw()
    assert _visible_ticks(figure.axes[1], "y") == _visible_ticks(figure.axes[0], "y")


def test_asr_latency_labels_never_overlap_and_every_defense_is_in_the_legend():
    board = [dict(r, latency_b1_ratio=1.0 + 0.02 * (i % 8), test_asr=0.97) for i, r in enumerate(_board())]
    figure = asr_latency_figure(board)  # fifteen defenses in one cluster near (1x, 97%)
    axis = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axis.texts]
    assert 0 < len(boxes) < len(DEFENSES)  # some labels fit, the rest are left to the legend
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    frame = axis.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert [t.get_text() for t in axis.get_legend().get_texts()] == list(DEFENSES)


def test_place_labels_labels_every_point_when_there_is_room():
    from fire_bench.plots import _pyplot

    _, axis = _pyplot().subplots(figsize=(6, 4))
    axis.set(xlim=(0, 10), ylim=(0, 10))
    points = [(1, 1, "a"), (5, 5, "b"), (8, 2, "c")]
    assert [t.get_text() for t in place_labels(axis, points)] == ["a", "b", "c"]


def test_per_attack_bars_leave_a_gap_where_a_defense_has_no_row():
    board = [r for r in _board() if not (r["defense_name"] == "d01" and r["attack_name"] == "sig")]
    figure = per_attack_figure(board)
    bars = figure.axes[0].containers[DEFENSES.index("d01")]
    heights = [b.get_height() for b in bars]
    assert math.isnan(heights[ATTACKS.index("sig")]) and not any(math.isnan(h) for h in heights[:2])


def test_k_curve_has_one_line_per_attack():
    one = k_curve_figure([r for r in _curve() if r["dataset"] == "fashionmnist"]).axes[0]
    assert [t.get_text() for t in one.get_legend().get_texts()] == ["badnet", "sig"]
    assert len(one.containers) == 2  # the two seeds of each attack are one line (their mean, their spread)
    line = one.containers[0].lines[0]
    assert list(line.get_xdata()) == [1, 2, 5] and np.allclose(
        line.get_ydata(), [100 * 0.1 * k * 0.75 for k in (1, 2, 5)]
    )
    two = k_curve_figure(_curve()).axes[0]  # two datasets: one line per attack and dataset, named so
    assert [t.get_text() for t in two.get_legend().get_texts()] == [
        "badnet (fashionmnist)", "sig (fashionmnist)", "badnet (mnist)", "sig (mnist)",
    ]  # fmt: skip


def test_leaderboard_plots_writes_the_pngs_it_returns(tmp_path):
    paths = leaderboard_plots(_board(), tmp_path)
    assert [p.name for p in paths] == ["asr_vs_latency.png", "per_attack.png"]
    assert all(Image.open(p).format == "PNG" for p in paths)


# --- the page in a real browser ----------------------------------------------------------------------------------


def _missing(what: str, fix: str) -> None:
    """Skip without a browser, except in CI, where its absence is a failure (.ci/run installs it)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed in CI; .ci/run should have installed it")
    pytest.skip(f"{what} is not installed ({fix})")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium", "pip install -e '.[dev]'")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _missing("chromium" if binary is None else "chromedriver", "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def _open(driver, page: str, path: Path) -> None:
    path.write_text(page)
    driver.get(path.as_uri())


def _texts(driver, table: str) -> list[list[str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))",
        f"#{table}",
    )


def _headers(driver, table: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' thead th')].map(c => c.textContent)", f"#{table}"
    )


def _click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


@pytest.mark.browser
def test_the_page_in_chromium_ranks_filters_sorts_and_keeps_the_first_screen(browser, tmp_path):
    started = time.monotonic()
    board = _board()
    plots = [*leaderboard_plots(board, tmp_path), plot_k_curve(_curve(), tmp_path / "k_curve.png")]
    images = {p.name: p.read_bytes() for p in plots}
    page = tmp_path / "leaderboard.html"
    _open(browser, leaderboard_page(board, _columns(board), "fire-defense leaderboard: test", [], images), page)
    by = {d: [r for r in board if r["defense_name"] == d] for d in DEFENSES}

    # the ranking: every defense, by mean DER, intervals where every averaged row has one (d03: only one row)
    ranking = _texts(browser, "ranking")
    order = sorted(DEFENSES, key=lambda d: -np.mean([r["der"] for r in by[d]]))
    assert [r[1] for r in ranking] == order
    shown = {r[1]: r for r in ranking}
    for defense in ("d02", "d03", "d05"):
        assert shown[defense][2:6] == [_shown(by[defense], m) for m in CI_METRICS], defense
    assert "±" in shown["d02"][2] and "±" not in shown["d03"][2] + shown["d05"][2]
    assert shown["d04"][6:9] == [
        "11",
        "5.00\N{MULTIPLICATION SIGN}",
        "4",
    ]  # forward passes, latency ratio at batch 1, rows averaged
    # the first screen (1400 x 1000 window) holds the ranking and the best defense per attack
    height = browser.execute_script("return innerHeight")
    for table in ("ranking", "best"):
        assert (
            browser.execute_script(f"return document.getElementById('{table}').getBoundingClientRect().bottom")
            <= height
        )
    best = {r[0]: r[1] for r in _texts(browser, "best")}
    for attack in ATTACKS:
        rows = [r for r in board if r["attack_name"] == attack and r["defense_name"] != "none"]
        assert best[attack] == max(rows, key=lambda r: r["der"])["defense_name"]
    assert [r[0] for r in _texts(browser, "detectors")] == ["d04", "d05", "d06"]

    # a filter: without sig, every table has three attacks
    _click(browser, "input[data-filter=attack_name][value=sig]")
    kept = {d: [r for r in rows if r["attack_name"] != "sig"] for d, rows in by.items()}
    shown = {r[1]: r for r in _texts(browser, "ranking")}
    assert {r[8] for r in shown.values()} == {"3"}
    assert shown["d05"][2] == _shown(kept["d05"], "test_acc") and shown["d02"][5] == _shown(kept["d02"], "der")
    assert _headers(browser, "pivot") == ["defense", "badnet", "blended", "wanet"]
    assert [r[0] for r in _texts(browser, "best")] == ["badnet", "blended", "wanet"]
    assert len(_texts(browser, "full")) == 45 and browser.find_element("id", "full-count").text == "45 of 60 rows"
    assert "sig" not in {r[2] for r in _texts(browser, "full")}

    # sorting: ASR, highest first, then lowest first; a text column alphabetically
    _click(browser, "#ranking th[data-key=asr]")
    asr = [float(r[3].split(" ")[0]) for r in _texts(browser, "ranking")]
    assert asr == sorted(asr, reverse=True)
    _click(browser, "#ranking th[data-key=asr]")
    assert [float(r[3].split(" ")[0]) for r in _texts(browser, "ranking")] == sorted(asr)
    _click(browser, "#ranking th[data-key=defense]")
    assert [r[1] for r in _texts(browser, "ranking")] == sorted(DEFENSES)
    _click(browser, "#pivot th[data-key='g:fashionmnist / preactresnet18_w8 / wanet']")
    wanet = {r["defense_name"]: r["test_asr"] for r in board if r["attack_name"] == "wanet"}
    assert [r[0] for r in _texts(browser, "pivot")] == sorted(wanet, key=lambda d: -wanet[d])

    # the pivot switches to DER: each cell is that row's DER, with its interval where it has one
    _click(browser, "input[name=pivot-mode][value=der]")
    cells = {r[0]: r[1] for r in _texts(browser, "pivot")}
    for defense in ("d01", "d02"):
        row = next(r for r in board if r["defense_name"] == defense and r["attack_name"] == "badnet")
        h = _half_width(row, "der")
        assert cells[defense] == f"{100 * row['der']:.1f}" + ("" if h is None else f" ± {100 * h:.1f}")

    # the full table, opened, sorts too
    _click(browser, "details > summary")
    _click(browser, "#full th[data-key=latency_b1_ms]")
    assert [r[3] for r in _texts(browser, "full")][:3] == ["d14"] * 3
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    screenshot = page.with_suffix(".png")
    browser.find_element("tag name", "body")  # the page is there to be shot
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(screenshot)) and Image.open(screenshot).size[0] == 1400
    assert time.monotonic() - started < 30


@pytest.mark.browser
def test_the_dataset_filter_in_chromium(browser, tmp_path):
    board = _board(datasets=("fashionmnist", "mnist"))
    _open(browser, leaderboard_page(board, _columns(board), "t", []), tmp_path / "leaderboard.html")
    headers = _headers(browser, "pivot")
    assert len(headers) == 9 and "badnet (mnist, preactresnet18_w8)" in headers
    assert {r[8] for r in _texts(browser, "ranking")} == {"8"}
    _click(browser, "input[data-filter=dataset][value=mnist]")
    assert _headers(browser, "pivot") == ["defense", *ATTACKS]  # one dataset left: plain attack names
    assert {r[8] for r in _texts(browser, "ranking")} == {"4"}
    assert browser.find_element("id", "shown").text == "60 of 120 rows shown"
    _click(browser, "input[data-filter=dataset][value=fashionmnist]")
    assert _texts(browser, "ranking") == [] and "No defense" in browser.find_element("id", "headline").text

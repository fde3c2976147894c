"""FIRE's core figures on a folder of records: mitigation from k poisoned inputs, the streaming k-curve,
and the cost of estimation, each computed under the protocol of :mod:`fire_bench.protocol`.

``python -m fire_bench fire-report --records records/`` regenerates every figure (tables as
Markdown and CSV, the k-curve as a plot) into ``results/fire/``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fire_adapters import Record, load_record, to_tensor
from fire_adapters.training import evaluate
from fire_bench.protocol import Split, describe, split_record
from fire_defense import FIRE, resolve_device
from fire_defense.metrics import defense_effectiveness_rating
from fire_defense.progress import progress_bar

__all__ = ["estimation_cost", "k_curve", "mitigation_table", "streaming_curve", "write_report"]

KS = (1, 2, 5, 10, 20, 50, 100)


def _prepare(record: Record, seed: int, device: torch.device) -> tuple[Split, nn.Module]:
    """The protocol's split of ``record`` and its classifier on ``device`` (moving ``record.model`` there)."""
    return split_record(record, seed=seed), record.classifier().to(device)


def _score(classifier: nn.Module, split: Split, device: torch.device) -> dict[str, float]:
    return evaluate(classifier, split.clean_eval, split.poisoned_eval, device)


def _attack(record: Record) -> str:
    return str(record.metadata.get("attack", record.path.name))


def mitigation_table(
    records: Sequence[Record], modes: Sequence[str], k: int, seed: int = 0, device: str | None = None
) -> list[dict[str, Any]]:
    """One row per record and mode: the undefended model, then FIRE from ``k`` unpaired poisoned inputs.

    All scored on the evaluation part of the protocol's split.
    """
    device = resolve_device(device)
    rows = []
    for record in progress_bar(records, desc="mitigation", unit="record"):
        split, classifier = _prepare(record, seed, device)
        before = _score(classifier, split, device)
        rows.append({"attack": _attack(record), "defense": "none", "k": 0, "layer": "", **before, "der": ""})
        clean, seen = (
            to_tensor(split.clean_reference.images, device),
            to_tensor(split.poisoned_inputs(k).images, device),
        )
        for mode in modes:
            fire = FIRE(classifier, layers="auto", mode=mode).fit(clean, poisoned=seen)
            after = _score(fire.module(), split, device)
            der = defense_effectiveness_rating(
                before["test_asr"], after["test_asr"], before["test_acc"], after["test_acc"]
            )
            rows.append(
                {
                    "attack": _attack(record),
                    "defense": f"fire-{mode}",
                    "k": k,
                    "layer": fire.layers_[0],
                    **after,
                    "der": der,
                }
            )
    return rows


def streaming_curve(
    classifier: nn.Module, split: Split, ks: Sequence[int] = KS, mode: str = "gate", warmup: int = 5, device=None
) -> list[dict[str, Any]]:
    """Streaming FIRE on one split: poisoned inputs arrive one at a time; metrics after ``k`` of them, for each ``k``.

    The layer is chosen (``layers='auto'``) from the first ``min(k, warmup)`` inputs, the only ones
    kept; from then on the running estimates are updated input by input. (The clean reference's
    activations are kept too, to calibrate the gate.)
    """
    device = resolve_device(device)
    stream = to_tensor(split.poisoned_inputs(max(ks)).images, device)
    clean = to_tensor(split.clean_reference.images, device)
    layer, fire, seen, chosen_from, rows = None, None, 0, {}, []
    for k in sorted(ks):
        first = min(k, warmup)
        if first not in chosen_from:
            chosen_from[first] = (
                FIRE(classifier, layers="auto", mode=mode).fit(clean, poisoned=stream[:first]).layers_[0]
            )
        if chosen_from[first] != layer:  # (re)start the running estimates at the chosen layer
            layer, seen = chosen_from[first], 0
            fire = FIRE(classifier, layers=layer, mode=mode).partial_fit(clean=clean)
        fire.partial_fit(poisoned=[sample[None] for sample in stream[seen:k]])
        seen = k
        rows.append({"mode": mode, "k": k, "layer": layer, **_score(fire.module(), split, device)})
    return rows


def k_curve(
    records: Sequence[Record],
    ks: Sequence[int] = KS,
    mode: str = "gate",
    warmup: int = 5,
    seed: int = 0,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`streaming_curve` on each record's protocol split, one row per record and ``k``."""
    device = resolve_device(device)
    rows = []
    for record in progress_bar(records, desc="k-curve", unit="record"):
        split, classifier = _prepare(record, seed, device)
        rows += [
            {"attack": _attack(record), **row} for row in streaming_curve(classifier, split, ks, mode, warmup, device)
        ]
    return rows


def estimation_cost(
    record: Record, k: int = 10, repeats: int = 5, seed: int = 0, device: str | None = None
) -> dict[str, float]:
    """Seconds to fit FIRE (500 clean + ``k`` poisoned) against one forward pass of those inputs, median of repeats."""
    device = resolve_device(device)
    split, classifier = _prepare(record, seed, device)
    clean, seen = to_tensor(split.clean_reference.images, device), to_tensor(split.poisoned_inputs(k).images, device)
    both = torch.cat([clean, seen])

    def median_seconds(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    with torch.inference_mode():
        forward = median_seconds(lambda: [classifier(b) for b in both.split(256)])
    layer = FIRE(classifier, layers="auto").fit(clean, poisoned=seen).layers_[0]
    named = median_seconds(lambda: FIRE(classifier, layers=layer).fit(clean, poisoned=seen))
    auto = median_seconds(lambda: FIRE(classifier, layers="auto").fit(clean, poisoned=seen))
    return {
        "forward_s": forward,
        "fit_named_layer_s": named,
        "fit_auto_layer_s": auto,
        "ratio_named": named / forward,
        "ratio_auto": auto / forward,
        "inputs": len(both),
        "layer": layer,
    }


def _write_table(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = list(rows[0])
    with open(path.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any, column: str) -> str:
        if column.startswith("test_") and value != "":
            return f"{100 * value:.2f}"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        "| " + " | ".join(c.replace("test_", "") + (" (%)" if c.startswith("test_") else "") for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(row[c], c) for c in columns) + " |" for row in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _plot_k_curve(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for attack in dict.fromkeys(r["attack"] for r in rows):
        points = [(r["k"], 100 * r["test_ra"]) for r in rows if r["attack"] == attack]
        axis.plot(*zip(*points, strict=True), marker="o", label=attack)
    axis.set(
        xscale="log",
        xlabel="poisoned inputs seen (k)",
        ylabel="poisoned accuracy (%)",
        title=f"FIRE streaming ({rows[0]['mode']}): accuracy on poisoned inputs vs k",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    record_dirs: Sequence[Path],
    out: Path,
    k: int = 10,
    ks: Sequence[int] = KS,
    seed: int = 0,
    device: str | None = None,
    repeats: int = 5,
) -> Path:
    """Compute every figure; write ``mitigation.{md,csv}``, ``k_curve.{md,csv,png}``, ``estimation.md`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    records = [load_record(path) for path in record_dirs]
    mitigation = mitigation_table(records, ("shift", "project", "gate"), k, seed, device)
    _write_table(mitigation, out / "mitigation")
    curve = k_curve(records, ks, seed=seed, device=device)
    _write_table(curve, out / "k_curve")
    _plot_k_curve(curve, out / "k_curve.png")
    cost = estimation_cost(records[0], k, repeats=repeats, seed=seed, device=device)
    (out / "estimation.md").write_text(
        f"FIRE estimation on {records[0].path.name}: {cost['inputs']} inputs (500 clean + {k} poisoned).\n\n"
        f"- one forward pass of them: {cost['forward_s']:.3f} s\n"
        f"- fit at a named layer ({cost['layer']}): {cost['fit_named_layer_s']:.3f} s = {cost['ratio_named']:.2f}x\n"
        f"- fit with automatic layer choice: {cost['fit_auto_layer_s']:.3f} s = {cost['ratio_auto']:.2f}x\n"
    )
    (out / "protocol.md").write_text(describe(split_record(records[0], seed=seed)) + "\n")
    return out

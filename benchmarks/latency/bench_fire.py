"""Per-sample latency of FIRE's repaired forward pass and of its estimation, against the undefended model.

Run with ``pytest benchmarks/latency`` (``make bench`` does). The model is the embedded default's
architecture (PreAct-ResNet-18, width 8, behind Fashion-MNIST's normalisation). A forward pass does
not depend on the weights, but FIRE's default does: its second pass runs only for the inputs the
model sends to the inferred target, and a random-weight model sends it most inputs. So where
``$FIRE_RECORD`` names a trained record (``make bench`` sets it to the default's BadNets record)
the model, the clean inputs and the poisoned ones come from it (test images: latency is not a
result about the defender's data); otherwise random weights and images stand in. Ratios are
printed at the end (see conftest.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import pytest
import torch

from fire_adapters import create_model, load_record, to_tensor, with_normalization
from fire_bench.timing import interleaved_ratio
from fire_defense import FIRE
from fire_defense.fire import RepairedModel

LAYER, LAST = "1.layer3", "1.layer4"


def timed_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classifier, 500 clean and 10 poisoned inputs to fit on, and 128 clean inputs to time (module docstring)."""
    torch.manual_seed(0)
    record_dir = os.environ.get("FIRE_RECORD")
    if record_dir and Path(record_dir, "attack_result.pt").is_file():
        record = load_record(record_dir)
        clean, poisoned = to_tensor(record.clean_test.images[:628]), to_tensor(record.poisoned_test.images[:10])
        return record.classifier().eval(), clean[:500], poisoned, clean[500:]
    classifier = with_normalization(create_model("preactresnet18_w8", 10), "fashionmnist").eval()
    clean = torch.rand(500, 1, 28, 28)
    poisoned = clean[:10].clone()
    poisoned[..., -3:, -3:] = 1.0  # a BadNets-like patch, so the direction is a real one
    return classifier, clean, poisoned, torch.rand(128, 1, 28, 28)


CLASSIFIER, CLEAN, POISONED, TIMED = timed_data()
INPUTS = {1: TIMED[:16], 128: TIMED}  # at batch 1, 16 different inputs one at a time (FIRE's cost depends on them)
MODES = ("shift", "project", "gate")
PRECISION = {"min_rounds": 5, "precision": 0.01}  # a ratio's rounds stop once its median is known to 1%
# Each repaired variant runs on its own copy of the classifier, so the undefended baseline stays hook-free.
# The hook variants repair every input (condition=None: hooks and folding cannot select inputs); the
# defaults (match repair of the inputs sent to the inferred target) run as fire(x), a second pass for those.
FITTED = {
    mode: FIRE(copy.deepcopy(CLASSIFIER), layers=LAYER, mode=mode, condition=None).fit(CLEAN, poisoned=POISONED)
    for mode in MODES
}
DEFAULTS = FIRE(copy.deepcopy(CLASSIFIER)).fit(CLEAN, poisoned=POISONED)
WHOLE_SECOND_PASS = RepairedModel(DEFAULTS.model, DEFAULTS.repairs_, DEFAULTS.condition_)  # no resume
SHIFT_LAST = FIRE(copy.deepcopy(CLASSIFIER), layers=LAST, mode="shift", condition=None)
FOLDED = SHIFT_LAST.fit(CLEAN, poisoned=POISONED).fold(CLEAN[:16])
VARIANTS = {
    "undefended": (CLASSIFIER, None),
    **{f"fire-{mode}": (FITTED[mode].model, FITTED[mode]) for mode in MODES},  # hooks attached for the test
    "fire-gate-per-call": (FITTED["gate"], None),  # fire(x): hooks attached and removed on every call
    "fire-shift-folded": (FOLDED, None),
    "fire-defaults": (DEFAULTS, None),  # fire(x) with FIRE's default settings (its input checks included)
    "fire-defaults-module": (DEFAULTS.module(), None),  # fire.module(): the second pass resumes after the layer
    "fire-defaults-whole-second-pass": (WHOLE_SECOND_PASS, None),  # the same module, its second pass from the input
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 128])
def test_forward_latency(benchmark, record_ratio, batch, name):
    model, fire = VARIANTS[name]
    x = INPUTS[batch]

    def run(net: torch.nn.Module) -> object:
        return [net(row[None]) for row in x] if batch == 1 else net(x)

    rounds, repeat = (40, 2) if batch == 1 else (20, 2)
    with torch.inference_mode(), fire.attach() if fire is not None else contextlib.nullcontext():
        benchmark.pedantic(run, args=(model,), rounds=rounds, iterations=repeat, warmup_rounds=2)
        ratio = interleaved_ratio(lambda: run(model), lambda: run(CLASSIFIER), rounds, repeat, **PRECISION)
    record_ratio(f"forward, batch {batch}", name, ratio)


ESTIMATION = {
    "undefended": lambda: [CLASSIFIER(b) for b in torch.cat([CLEAN, POISONED]).split(256)],
    "fire-fit-named-layer": lambda: FIRE(CLASSIFIER, layers=LAYER).fit(CLEAN, poisoned=POISONED),
    "fire-fit-auto-layer": lambda: FIRE(CLASSIFIER, layers="auto").fit(CLEAN, poisoned=POISONED),
}


@pytest.mark.parametrize("name", list(ESTIMATION))
def test_estimation_cost(benchmark, record_ratio, name):
    with torch.inference_mode():
        benchmark.pedantic(ESTIMATION[name], rounds=5, iterations=1, warmup_rounds=1)
        ratio = interleaved_ratio(ESTIMATION[name], ESTIMATION["undefended"], rounds=7, repeat=1, **PRECISION)
    record_ratio("estimation from 510 inputs (ratio to their forward pass)", name, ratio)

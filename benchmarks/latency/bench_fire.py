"""Per-sample latency of FIRE's repaired forward pass and of its estimation, against the undefended model.

Run with ``pytest benchmarks/latency`` (``make bench`` does). The model is the embedded default's
architecture (PreAct-ResNet-18, width 8, behind Fashion-MNIST's normalisation); latency does not
depend on its weights, so no record is needed. Ratios are printed at the end (see conftest.py).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from fire_adapters import create_model, with_normalization
from fire_bench.timing import interleaved_ratio
from fire_defense import FIRE

LAYER, LAST = "1.layer3", "1.layer4"
torch.manual_seed(0)
CLASSIFIER = with_normalization(create_model("preactresnet18_w8", 10), "fashionmnist").eval()
CLEAN = torch.rand(500, 1, 28, 28)
POISONED = CLEAN[:10].clone()
POISONED[..., -3:, -3:] = 1.0  # a BadNets-like patch, so the direction is a real one
INPUTS = {1: torch.rand(1, 1, 28, 28), 128: torch.rand(128, 1, 28, 28)}
MODES = ("shift", "project", "gate")
PRECISION = {"min_rounds": 5, "precision": 0.01}  # a ratio's rounds stop once its median is known to 1%
# Each repaired variant runs on its own copy of the classifier, so the undefended baseline stays hook-free.
# The hook variants repair every input (condition=None: hooks and folding cannot select inputs); the
# defaults (match repair of the inputs sent to the inferred target) run as fire(x), a second pass for those.
FITTED = {
    mode: FIRE(copy.deepcopy(CLASSIFIER), layers=LAYER, mode=mode, condition=None).fit(CLEAN, poisoned=POISONED)
    for mode in MODES
}
DEFAULTS = FIRE(copy.deepcopy(CLASSIFIER), layers=LAYER).fit(CLEAN, poisoned=POISONED)
SHIFT_LAST = FIRE(copy.deepcopy(CLASSIFIER), layers=LAST, mode="shift", condition=None)
FOLDED = SHIFT_LAST.fit(CLEAN, poisoned=POISONED).fold(CLEAN[:16])
VARIANTS = {
    "undefended": (CLASSIFIER, None),
    **{f"fire-{mode}": (FITTED[mode].model, FITTED[mode]) for mode in MODES},  # hooks attached for the test
    "fire-gate-per-call": (FITTED["gate"], None),  # fire(x): hooks attached and removed on every call
    "fire-shift-folded": (FOLDED, None),
    "fire-defaults": (DEFAULTS, None),  # fire(x) with FIRE's default settings
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 128])
def test_forward_latency(benchmark, record_ratio, batch, name):
    forward, fire = VARIANTS[name]
    x = INPUTS[batch]
    rounds, repeat = (40, 20) if batch == 1 else (20, 2)
    with torch.inference_mode(), fire.attach() if fire is not None else contextlib.nullcontext():
        benchmark.pedantic(forward, args=(x,), rounds=rounds, iterations=repeat, warmup_rounds=2)
        ratio = interleaved_ratio(lambda: forward(x), lambda: CLASSIFIER(x), rounds, repeat, **PRECISION)
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

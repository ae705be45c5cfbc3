"""Score drift: the bundle's validation score reference and the PSI against it, on synthetic
score sets whose PSI is known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from spine_node.drift import DriftState, ScoreReference, check_drift, psi, score_reference
from spine_node.models.bundle import load_manifest, manifest_from_json

pytest_plugins = ("tests.fixtures_models",)

HALVES = ScoreReference(bin_edges=(0.0, 0.5, 1.0), counts=(50, 50), source="synthetic")


def test_psi_of_a_known_shift() -> None:
    # expected 0.5 / 0.5, actual 0.25 / 0.75:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5
    window = [0.1] * 25 + [0.9] * 75
    assert psi(HALVES, window) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi(HALVES, [0.2] * 10 + [0.7] * 10) == pytest.approx(0.0)  # same proportions
    # an empty bin counts as epsilon = 1e-4: (1e-4 - 0.5) ln(1e-4 / 0.5) + 0.5 ln 2
    expected = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + (1.0 - 0.5) * math.log(1.0 / 0.5)
    assert psi(HALVES, [0.9] * 40) == pytest.approx(expected)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        psi(HALVES, [1.5])


def test_reference_bins_are_validation_deciles() -> None:
    scores = (np.arange(1000) + 0.5) / 1000  # uniform on [0, 1]
    ref = score_reference(scores, threshold=0.7, source="synthetic")
    assert ref.bin_edges == pytest.approx(np.linspace(0, 1, 11), abs=1e-3)
    assert ref.counts == (100,) * 10 and ref.n == 1000
    assert ref.positive_rate == pytest.approx(0.3)
    assert psi(ref, scores) == pytest.approx(0.0)
    # the window moved to the upper half: 5 bins at 0.2, 5 at 1e-4 against 0.1 each
    upper = scores[scores >= 0.5]
    expected = 5 * (0.2 - 0.1) * math.log(2) + 5 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert psi(ref, upper) == pytest.approx(expected)
    # ties (scores piled at 0 and 1) merge equal edges: two bins, one per pile
    piled = score_reference([0.0] * 60 + [1.0] * 40)
    assert len(piled.bin_edges) == 3 and piled.counts == (60, 40)


def test_drift_check_states() -> None:
    ok = check_drift(HALVES, [0.1, 0.9] * 50, threshold=0.25, min_images=20)
    assert ok.state is DriftState.OK and ok.psi == pytest.approx(0.0) and ok.n_window == 100
    drift = check_drift(HALVES, [0.1] * 10 + [0.9] * 90, threshold=0.25, min_images=20)
    assert drift.state is DriftState.DRIFT and drift.drifted and drift.psi is not None
    assert drift.psi > 0.25 and "above the threshold 0.25" in drift.describe()
    few = check_drift(HALVES, [0.9] * 5, threshold=0.25, min_images=20)
    assert few.state is DriftState.TOO_FEW_IMAGES and few.psi is None
    none = check_drift(None, [0.9] * 50, threshold=0.25, min_images=20)
    assert none.state is DriftState.NO_REFERENCE and "no reference" in none.describe()


def test_reference_json_and_validation() -> None:
    doc = HALVES.to_json()
    assert doc["n"] == 100 and ScoreReference.from_json(json.loads(json.dumps(doc))) == HALVES
    with pytest.raises(ValueError, match="strictly increasing"):
        ScoreReference(bin_edges=(0.0, 0.5, 0.5, 1.0), counts=(1, 1, 1))
    with pytest.raises(ValueError, match="one entry per bin"):
        ScoreReference(bin_edges=(0.0, 1.0), counts=(1, 1))
    with pytest.raises(TypeError, match="ints"):
        ScoreReference(bin_edges=(0.0, 1.0), counts=(1.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differs from its counts"):
        ScoreReference.from_json({**doc, "n": 7})


def test_reference_added_to_a_built_bundle(tiny_bundle_copy: Path) -> None:
    from training.export import add_score_reference

    before = load_manifest(tiny_bundle_copy)
    assert before.score_reference is None  # a bundle without a reference still loads
    rng = np.random.default_rng(0)
    add_score_reference(tiny_bundle_copy, rng.beta(2, 5, size=200), source="fold-0 validation")
    after = load_manifest(tiny_bundle_copy)  # every file's hash still verifies
    ref = after.score_reference
    assert ref is not None and ref.n == 200 and ref.source == "fold-0 validation (200 images)"
    assert ref.positive_rate is not None and len(ref.counts) == 10
    doc = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    assert manifest_from_json(doc) == after and doc["score_reference"]["n"] == 200
    assert after.threshold == before.threshold and after.members == before.members

"""Ensemble weights (0.05 grid, AUROC) and Youden threshold on out-of-fold predictions only."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import cli
from training.ensemble import (
    OofPredictions,
    TestSplitError,
    fit_ensemble,
    grid_search_weights,
    load_oof,
    weight_grid,
    youden_threshold,
)


def _known_best(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three members whose noise cancels only at weights (0.6, 0.4, 0.0)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    e = rng.normal(0, 20, n)
    g = rng.normal(0, 400, n)
    scores = np.stack([y + 2 * e, y - 3 * e, g], axis=1)
    return scores, y


def _write_oof(path: Path, ids: list[str], scores: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "score", "label", "fold"])
        for i, s, lab in zip(ids, scores, labels, strict=True):
            w.writerow([i, f"{s:.6f}", int(lab), 0])


def test_weight_grid_covers_the_simplex_in_005_steps() -> None:
    grid = list(weight_grid(3, 0.05))
    assert len(grid) == 231  # C(22, 2)
    assert all(abs(sum(w) - 1) < 1e-9 for w in grid)
    assert (0.42, 0.32, 0.26) not in grid and (0.4, 0.35, 0.25) in grid
    with pytest.raises(ValueError, match=r"1/step"):
        list(weight_grid(3, 0.07))


def test_grid_search_finds_the_known_best_weights() -> None:
    scores, y = _known_best()
    weights, auc = grid_search_weights(scores, y)
    assert weights == (0.6, 0.4, 0.0)
    assert auc == pytest.approx(1.0)
    # each member alone is far worse
    fit = fit_ensemble(OofPredictions(("a", "b", "c"), tuple(map(str, range(len(y)))), scores, y))
    assert max(fit.member_auroc) < 0.8
    assert fit.weights == (0.6, 0.4, 0.0)


def test_youden_threshold() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.55, 0.5, 0.6, 0.9])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    thr, sens, spec = youden_threshold(scores, labels)
    # J: 0.5 -> 1 - 1/4 = 0.75 (best); 0.6 -> 2/3; 0.55 -> 2/3 - 1/4
    assert thr == pytest.approx(0.5)
    assert sens == pytest.approx(1.0) and spec == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both"):
        youden_threshold(scores, np.zeros(7))


def test_load_oof_aligns_members_and_rejects_test_ids(tmp_path: Path) -> None:
    scores, y = _known_best(40)
    ids = [f"{i:032x}" for i in range(40)]
    for k, name in enumerate("abc"):
        _write_oof(tmp_path / name / "oof_fold0.csv", ids[:20], scores[:20, k], y[:20])
        _write_oof(tmp_path / name / "oof_fold1.csv", ids[20:], scores[20:, k], y[20:])
    oof = load_oof({n: tmp_path / n for n in "abc"})
    assert oof.members == ("a", "b", "c") and len(oof.image_ids) == 40
    order = [ids.index(i) for i in oof.image_ids]
    assert np.allclose(oof.scores, np.round(scores[order], 6))
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "test.csv").write_text(f"image_id,lesion_type\n{ids[3]},No finding\n")
    with pytest.raises(TestSplitError, match=r"test\.csv"):
        load_oof({n: tmp_path / n for n in "abc"}, data_dir=data)


def test_cli_refuses_a_test_split_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores, y = _known_best(40)
    ids = [f"{i:032x}" for i in range(40)]
    named_test = tmp_path / "preds_test.csv"
    _write_oof(named_test, ids, scores[:, 0], y)
    assert cli.main(["ensemble", "--oof", f"a={named_test}"]) == 2
    assert "never on test" in capsys.readouterr().out
    # the real console script exits 2 too: ids listed in annotations/test.csv
    ok = tmp_path / "a"
    _write_oof(ok / "oof_fold0.csv", ids, scores[:, 0], y)
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "test.csv").write_text(f"image_id\n{ids[0]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "ensemble", "--oof", str(ok), "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "refused" in proc.stdout and "test.csv" in proc.stdout
    # without the test ids the same predictions are accepted and the fit is written
    out = tmp_path / "fit.json"
    assert cli.main(["ensemble", "--oof", str(ok), "--out", str(out)]) == 0
    assert '"weights"' in out.read_text()

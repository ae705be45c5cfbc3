"""Meyerding grader: HOG (9 bins, 8x8 cells, 2x2 blocks) + random forest, trained on the phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training import cli
from training.meyerding import (
    GRADES,
    crop_box,
    grade,
    hog_features,
    load_graded_findings,
    load_grader,
    save_grader,
    train_from_phantom,
    train_grader,
)
from training.phantom import write_phantom_dataset


def _slip_image(grade_index: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, ...]]:
    """Two stacked blocks; the upper one shifted right by a grade-dependent fraction."""
    img = rng.normal(0.2, 0.02, (200, 200)).astype(np.float32)
    shift = int(10 + 18 * grade_index + rng.integers(-3, 4))
    img[100:150, 40:120] = 0.8
    img[45:95, 40 + shift : 120 + shift] = 0.8
    return np.clip(img, 0, 1), (30.0, 35.0, 190.0, 160.0)


def test_hog_geometry() -> None:
    crop = crop_box(np.random.default_rng(0).random((300, 200)), (10, 20, 90, 140), 128)
    assert crop.shape == (128, 128) and crop.dtype == np.float32
    # 16x16 cells of 8 px -> 15x15 blocks of 2x2 cells x 9 orientations
    assert hog_features(crop).shape == (15 * 15 * 2 * 2 * 9,)
    with pytest.raises(ValueError, match="xmax > xmin"):
        crop_box(np.zeros((50, 50)), (10, 10, 5, 20))
    with pytest.raises(ValueError, match="outside"):
        crop_box(np.zeros((50, 50)), (60, 60, 90, 90))


def test_grader_learns_grades_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, boxes, grades = [], [], []
    for _ in range(10):
        for g in range(4):
            im, box = _slip_image(g, rng)
            images.append(im)
            boxes.append(box)
            grades.append(GRADES[g])
    grader = train_grader(images, boxes, grades, n_estimators=60, seed=0)
    test = [_slip_image(g, np.random.default_rng(100 + g)) for g in range(4)]
    predicted = [grade(grader, im, box) for im, box in test]
    assert all(p in GRADES for p in predicted)
    assert sum(p == GRADES[g] for g, p in enumerate(predicted)) >= 3
    path = save_grader(grader, tmp_path / "grader.joblib")
    again = load_grader(path)
    assert [again.grade(im, box) for im, box in test] == predicted
    with pytest.raises(ValueError, match="grades must be in"):
        train_grader(images[:2], boxes[:2], ["I", "VI"])


def test_grader_trains_on_the_phantom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "phantom"
    write_phantom_dataset(data, 16, 3, balanced=True, size=(256, 192), test_fraction=0.25)
    findings = load_graded_findings(data)
    assert findings and all(f["grade"] in GRADES for f in findings)
    grader, n = train_from_phantom(data, seed=0)
    assert n >= 2
    out = tmp_path / "g.joblib"
    assert cli.main(["grader", "--data", str(data), "--out", str(out), "--evaluate"]) == 0
    assert out.is_file() and '"n_train"' in capsys.readouterr().out
    # predicts a valid grade for each training slip, and mostly the annotated one
    from spine_node.imaging import prepare, read_dataset

    hits = 0
    train_ids = {p.stem for p in (data / "train_images").glob("*.dicom")}
    train_findings = [f for f in findings if f["image_id"] in train_ids]
    for f in train_findings:
        image = prepare(read_dataset(data / "train_images" / f"{f['image_id']}.dicom")).enhanced
        g = grader.grade(image, f["box"])
        assert g in GRADES
        hits += g == f["grade"]
    assert hits >= 0.8 * len(train_findings)

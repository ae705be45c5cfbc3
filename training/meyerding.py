"""Meyerding grading of spondylolisthesis findings, training half: fit and save the HOG +
random forest grader. Its inference half (``Grader``, ``crop_box``, ``hog_features``,
``load_grader``) lives in :mod:`spine_node.models.grader` (re-exported here), so the serving
node loads the grader file without importing training code.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.ensemble import RandomForestClassifier

from spine_node.labels import MEYERDING_GRADES
from spine_node.models.grader import (
    GRADER_FORMAT,
    Grader,
    crop_box,
    grade,
    hog_features,
    load_grader,
)

#: Meyerding grades the grader can return (V = spondyloptosis).
GRADES: tuple[str, ...] = MEYERDING_GRADES

logger = logging.getLogger(__name__)

__all__ = [
    "GRADES",
    "Grader",
    "add_arguments",
    "crop_box",
    "grade",
    "hog_features",
    "load_grader",
    "run",
    "save_grader",
    "train_grader",
]


def train_grader(
    images: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float]],
    grades: Sequence[str],
    *,
    crop_size: int = 128,
    margin: float = 0.1,
    n_estimators: int = 300,
    seed: int = 0,
) -> Grader:
    """Fit the HOG + random forest grader.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        Prepared full-resolution images (one per finding; may repeat).
    boxes : sequence of box
        Spondylolisthesis boxes, source pixels.
    grades : sequence of str
        Meyerding grades, each in :data:`GRADES`.
    crop_size, margin : int, float
        Crop geometry.
    n_estimators : int
        Trees in the forest.
    seed : int
        Random state.

    Returns
    -------
    Grader
    """
    if not (len(images) == len(boxes) == len(grades)):
        raise ValueError(
            f"images, boxes and grades must have the same length, got {len(images)}, {len(boxes)}, {len(grades)}"
        )
    if len(grades) < 2:
        raise ValueError(f"need at least 2 graded findings, got {len(grades)}")
    bad = sorted({g for g in grades if g not in GRADES})
    if bad:
        raise ValueError(f"grades must be in {GRADES}, got {bad}")
    x = np.stack(
        [
            hog_features(crop_box(im, b, crop_size, margin=margin))
            for im, b in zip(images, boxes, strict=True)
        ]
    )
    model = RandomForestClassifier(
        n_estimators=n_estimators, random_state=seed, n_jobs=1, class_weight="balanced"
    )
    model.fit(x, np.asarray(grades))
    return Grader(model=model, crop_size=crop_size, margin=margin)


def save_grader(grader: Grader, path: Path) -> Path:
    """Write ``grader`` with joblib (a dict of scikit-learn objects and numbers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(
        {
            "format": GRADER_FORMAT,
            "model": grader.model,
            "crop_size": grader.crop_size,
            "margin": grader.margin,
        },
        path,
        compress=3,
    )
    return path


# --------------------------------------------------------------------------- phantom data


def load_graded_findings(
    data_dir: Path, image_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Read ``annotations/phantom_meta.csv``: one row per graded spondylolisthesis finding.

    Returns dicts with ``image_id``, ``box`` (xmin, ymin, xmax, ymax) and ``grade``.
    """
    meta = Path(data_dir) / "annotations" / "phantom_meta.csv"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta}: no phantom grade file (generate with spine-train phantom)"
        )
    wanted = set(image_ids) if image_ids is not None else None
    out: list[dict[str, Any]] = []
    with meta.open(newline="") as fh:
        for row in csv.DictReader(fh):
            g = (row.get("meyerding_grade") or row.get("grade") or "").strip()
            if not g:
                continue
            if wanted is not None and row["image_id"] not in wanted:
                continue
            box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            out.append({"image_id": row["image_id"], "box": box, "grade": g})
    return out


def _prepared_images(data_dir: Path, image_ids: Sequence[str], split: str) -> dict[str, np.ndarray]:
    from spine_node.imaging import prepare, read_dataset

    images: dict[str, np.ndarray] = {}
    for iid in sorted(set(image_ids)):
        ds = read_dataset(Path(data_dir) / f"{split}_images" / f"{iid}.dicom")
        images[iid] = prepare(ds).enhanced
    return images


def train_from_phantom(
    data_dir: Path, *, split: str = "train", seed: int = 0
) -> tuple[Grader, int]:
    """Train a grader on a phantom's graded slips of ``split``; returns it and the number of slips."""
    ids = None
    csv_path = Path(data_dir) / "annotations" / f"{split}.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as fh:
            ids = [r["image_id"] for r in csv.DictReader(fh)]
    findings = load_graded_findings(data_dir, ids)
    images = _prepared_images(data_dir, [f["image_id"] for f in findings], split)
    grader = train_grader(
        [images[f["image_id"]] for f in findings],
        [f["box"] for f in findings],
        [f["grade"] for f in findings],
        seed=seed,
    )
    return grader, len(findings)


def evaluate_on_phantom(grader: Grader, data_dir: Path, *, split: str = "test") -> dict[str, float]:
    """Accuracy of ``grader`` on a phantom split's graded slips."""
    csv_path = Path(data_dir) / "annotations" / f"{split}.csv"
    with csv_path.open(newline="") as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh)]
    findings = load_graded_findings(data_dir, ids)
    if not findings:
        return {"n": 0.0, "accuracy": float("nan")}
    images = _prepared_images(data_dir, [f["image_id"] for f in findings], split)
    hits = [grader.grade(images[f["image_id"]], f["box"]) == f["grade"] for f in findings]
    return {"n": float(len(hits)), "accuracy": float(np.mean(hits))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train grader`` arguments."""
    parser.add_argument(
        "--data", type=Path, required=True, help="phantom root (annotations/phantom_meta.csv)"
    )
    parser.add_argument("--out", type=Path, required=True, help="grader file to write (.joblib)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--evaluate", action="store_true", help="also report accuracy on the test split"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train grader``."""
    grader, n = train_from_phantom(args.data, seed=args.seed)
    save_grader(grader, args.out)
    report: dict[str, Any] = {"grader": str(args.out), "n_train": n}
    if args.evaluate:
        report["test"] = evaluate_on_phantom(grader, args.data)
    print(json.dumps(report, indent=2))
    return 0

"""Meyerding grading of spondylolisthesis findings: HOG features + random forest -> grade I-IV.

The finding's box is cropped from the prepared full-resolution image (``PreparedImage.enhanced``,
source pixel coordinates), resized to 128 x 128, described by HOG (9 orientations, 8 x 8 pixels
per cell, 2 x 2 cells per block) and classified by a random forest. The grader file is a joblib
dump of a plain dict holding only scikit-learn objects and numbers, so serving can load it
without importing this package's training code.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from skimage.feature import hog
from skimage.transform import resize
from sklearn.ensemble import RandomForestClassifier

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

#: Meyerding grades the grader can return (V = spondyloptosis).
GRADES: tuple[str, ...] = ("I", "II", "III", "IV", "V")
_FORMAT = "spine-node-meyerding-hog-rf/1"


@dataclass(frozen=True)
class Grader:
    """A fitted grader.

    Attributes
    ----------
    model : sklearn.ensemble.RandomForestClassifier
        Classifier over HOG features; its classes are grade strings.
    crop_size : int
        Side of the square crop (128).
    margin : float
        Fraction of the box size added on each side before cropping.
    """

    model: RandomForestClassifier
    crop_size: int = 128
    margin: float = 0.1

    def grade(self, image: np.ndarray, box: Sequence[float]) -> str:
        """Return the Meyerding grade (``"I"`` .. ``"IV"``) of the finding in ``box``."""
        feats = hog_features(crop_box(image, box, self.crop_size, margin=self.margin))
        return str(self.model.predict(feats[None])[0])


def crop_box(
    image: np.ndarray, box: Sequence[float], size: int = 128, *, margin: float = 0.1
) -> np.ndarray:
    """Crop ``box`` (xmin, ymin, xmax, ymax in pixels) from ``image`` and resize to ``size`` square.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image in [0, 1] (the prepared full-resolution image).
    box : sequence of float
        ``(xmin, ymin, xmax, ymax)``, column/row pixel coordinates.
    size : int
        Output side.
    margin : float
        Fraction of the box width/height added on each side (context around the slip).

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size)``.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if len(box) != 4:
        raise ValueError(f"box must have 4 values, got {box!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must have xmax > xmin and ymax > ymin, got {box!r}")
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    h, w = image.shape
    c0, r0 = max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my)))
    c1, r1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
    if c1 - c0 < 2 or r1 - r0 < 2:
        raise ValueError(f"box {box!r} lies outside the {w}x{h} image")
    crop = image[r0:r1, c0:c1].astype(np.float32)
    return resize(crop, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(
        np.float32
    )


def hog_features(crop: np.ndarray) -> np.ndarray:
    """HOG descriptor of a square crop: 9 orientations, 8x8 pixels per cell, 2x2 cells per block.

    Returns
    -------
    numpy.ndarray
        1-D float32 feature vector (8100 values for a 128 x 128 crop).
    """
    crop = np.asarray(crop, dtype=np.float32)
    if crop.ndim != 2:
        raise ValueError(f"crop must be 2-D, got shape {crop.shape}")
    return hog(
        crop,
        orientations=9,
        pixels_per_cell=(8, 8),
        cells_per_block=(2, 2),
        block_norm="L2-Hys",
        feature_vector=True,
    ).astype(np.float32)


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
            "format": _FORMAT,
            "model": grader.model,
            "crop_size": grader.crop_size,
            "margin": grader.margin,
        },
        path,
        compress=3,
    )
    return path


def load_grader(path: Path) -> Grader:
    """Read a grader written by :func:`save_grader` (only from a trusted, hash-checked bundle)."""
    obj = joblib.load(Path(path))
    if not isinstance(obj, Mapping) or obj.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a Meyerding grader file ({_FORMAT})")
    return Grader(model=obj["model"], crop_size=int(obj["crop_size"]), margin=float(obj["margin"]))


def grade(grader: Grader, image: np.ndarray, box: Sequence[float]) -> str:
    """Return the Meyerding grade (``"I"`` .. ``"IV"``) of one spondylolisthesis finding.

    Parameters
    ----------
    grader : Grader
        From :func:`load_grader`.
    image : numpy.ndarray
        ``PreparedImage.enhanced`` (CLAHE'd full resolution, float [0, 1]).
    box : sequence of float
        The finding's ``(xmin, ymin, xmax, ymax)`` in source pixels.
    """
    return grader.grade(image, box)


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

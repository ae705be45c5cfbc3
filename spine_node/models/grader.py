"""Meyerding grading of spondylolisthesis findings, inference half: HOG features + random
forest -> grade I-V.

The finding's box is cropped from the prepared full-resolution image (``PreparedImage.enhanced``,
source pixel coordinates), resized to 128 x 128, described by HOG (9 orientations, 8 x 8 pixels
per cell, 2 x 2 cells per block) and classified by a random forest. The grader file is a joblib
dump of a plain dict holding only scikit-learn objects and numbers (written by
``training.meyerding.save_grader``; the serving node never imports ``training``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from skimage.feature import hog
from skimage.transform import resize

from spine_node.imaging import unit_float
from spine_node.labels import MEYERDING_GRADES

__all__ = [
    "GRADER_FORMAT",
    "MEYERDING_GRADES",
    "Grader",
    "crop_box",
    "grade",
    "hog_features",
    "load_grader",
]

#: Format tag inside a grader file.
GRADER_FORMAT = "spine-node-meyerding-hog-rf/1"


@dataclass(frozen=True)
class Grader:
    """A fitted grader.

    Attributes
    ----------
    model : sklearn.ensemble.RandomForestClassifier
        Classifier over HOG features; its classes are grade strings (``MEYERDING_GRADES``).
    crop_size : int
        Side of the square crop (128).
    margin : float
        Fraction of the box size added on each side before cropping.
    """

    model: Any
    crop_size: int = 128
    margin: float = 0.1

    def grade(self, image: np.ndarray, box: Sequence[float]) -> str:
        """Return the Meyerding grade (``"I"`` .. ``"V"``) of the finding in ``box``."""
        feats = hog_features(crop_box(image, box, self.crop_size, margin=self.margin))
        return str(self.model.predict(feats[None])[0])


def crop_box(
    image: np.ndarray, box: Sequence[float], size: int = 128, *, margin: float = 0.1
) -> np.ndarray:
    """Crop ``box`` (xmin, ymin, xmax, ymax in pixels) from ``image`` and resize to ``size`` square.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image in [0, 1] or its uint8 form (the prepared full-resolution image,
        ``PreparedImage.enhanced``; see ``imaging.unit_float``).
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

    Raises
    ------
    ValueError
        For an image that is not 2-D, a malformed box, a box outside the image, or
        ``size`` below 16.
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
    crop = unit_float(image[r0:r1, c0:c1])  # an 8-bit enhanced image: the same k / 255
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


def load_grader(path: Path) -> Grader:
    """Read a grader file (only from a trusted, hash-checked bundle: joblib unpickles).

    Raises
    ------
    ValueError
        When the file is not a grader file of :data:`GRADER_FORMAT`, or its classifier can
        output a grade outside :data:`MEYERDING_GRADES` (the grader must not output a grade
        the result objects have no code for).
    """
    obj = joblib.load(Path(path))
    if not isinstance(obj, Mapping) or obj.get("format") != GRADER_FORMAT:
        raise ValueError(f"{path}: not a Meyerding grader file ({GRADER_FORMAT})")
    classes = [str(c) for c in getattr(obj["model"], "classes_", ())]
    unknown = sorted(set(classes) - set(MEYERDING_GRADES))
    if not classes or unknown:
        raise ValueError(
            f"{path}: the grader's classes {classes} are not all Meyerding grades "
            f"{MEYERDING_GRADES} (unknown: {unknown})"
        )
    return Grader(model=obj["model"], crop_size=int(obj["crop_size"]), margin=float(obj["margin"]))


def grade(grader: Grader, image: np.ndarray, box: Sequence[float]) -> str:
    """Return the Meyerding grade (``"I"`` .. ``"V"``) of one spondylolisthesis finding.

    Parameters
    ----------
    grader : Grader
        From :func:`load_grader`.
    image : numpy.ndarray
        ``PreparedImage.enhanced`` (CLAHE'd full resolution, float [0, 1] or uint8).
    box : sequence of float
        The finding's ``(xmin, ymin, xmax, ymax)`` in source pixels.
    """
    return grader.grade(image, box)

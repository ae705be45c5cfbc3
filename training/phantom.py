"""Synthetic spine radiographs in VinDr-SpineXR's exact on-disk layout (the "phantom").

The phantom stands in for VinDr-SpineXR (credentialed access) in tests, demos and the demo
model bundle. It writes::

    OUT/annotations/train.csv        study_id,series_id,image_id,rad_id,lesion_type,xmin,ymin,xmax,ymax
    OUT/annotations/test.csv
    OUT/annotations/phantom_meta.csv image_id,xmin,ymin,xmax,ymax,slip_fraction,grade
    OUT/train_images/<image_id>.dicom
    OUT/test_images/<image_id>.dicom

The DICOM files copy the real files' quirks: JPEG 2000 lossless, 16 bits allocated / 12
stored, MONOCHROME2 (and some MONOCHROME1 with correctly inverted pixel values), window
centre/width, 32-hex "UIDs", no Modality and no SOP Class UID in the data set.

Each image shows a lumbar spine (AP or lateral view): vertebral bodies with a cortical rim and
trabecular texture, disc spaces, pedicles, posterior elements with neural foramina, a soft
tissue envelope, an exposure gradient and quantum noise. The seven VinDr lesion classes are
drawn plainly (a small CNN or YOLO at 320-384 px must be able to learn them) and boxed where a
radiologist would box them. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydicom import config as dicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless

from spine_node.labels import LESION_LABELS, NO_FINDING

logger = logging.getLogger(__name__)

#: The VinDr label of a normal image.

#: Per-image frequency of each lesion class among abnormal VinDr-SpineXR images.
VINDR_CLASS_FREQUENCIES: Mapping[str, float] = {
    "Osteophytes": 0.821,
    "Disc space narrowing": 0.558,
    "Surgical implant": 0.302,
    "Spondylolysthesis": 0.223,
    "Foraminal stenosis": 0.157,
    "Other lesions": 0.031,
    "Vertebral collapse": 0.0175,
}

#: Frequency of every class with ``--balanced`` (the demo bundle's training set).
BALANCED_CLASS_FREQUENCY = 0.5

CSV_COLUMNS: tuple[str, ...] = (
    "study_id",
    "series_id",
    "image_id",
    "rad_id",
    "lesion_type",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
)
META_COLUMNS: tuple[str, ...] = (
    "image_id",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "slip_fraction",
    "grade",
)
VIEWS: tuple[str, ...] = ("ap", "lateral")
MAX_STORED = 4095  # 12 bits stored


def meyerding_grade(slip_fraction: float) -> str:
    """Return the Meyerding grade of a slip.

    Parameters
    ----------
    slip_fraction : float
        Anterior translation of the upper vertebra as a fraction of the lower endplate width.

    Returns
    -------
    str
        ``"I"`` (< 25 %), ``"II"`` (25-50 %), ``"III"`` (50-75 %), ``"IV"`` (75-100 %) or
        ``"V"`` (spondyloptosis, >= 100 %).
    """
    if not math.isfinite(slip_fraction) or slip_fraction < 0:
        raise ValueError(f"slip_fraction must be a finite value >= 0, got {slip_fraction!r}")
    for limit, grade in ((0.25, "I"), (0.5, "II"), (0.75, "III"), (1.0, "IV")):
        if slip_fraction < limit:
            return grade
    return "V"


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw in one phantom image.

    Attributes
    ----------
    rows, columns : int
        Image size in pixels (at least 128 x 96).
    view : str
        ``"ap"`` or ``"lateral"``.
    lesions : tuple of str
        VinDr labels to draw; a label repeated draws several instances (where the anatomy
        has room: at most one spondylolisthesis, one collapse and one implant construct).
    """

    rows: int = 768
    columns: int = 512
    view: str = "lateral"
    lesions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"PhantomSpec {name} must be an int, got {type(value).__name__}")
        if self.rows < 128 or self.columns < 96:
            raise ValueError(
                f"PhantomSpec size must be at least 128 x 96, got {self.rows} x {self.columns}"
            )
        if self.view not in VIEWS:
            raise ValueError(f"PhantomSpec view must be one of {VIEWS}, got {self.view!r}")
        if not isinstance(self.lesions, tuple):
            raise TypeError(
                f"PhantomSpec lesions must be a tuple, got {type(self.lesions).__name__}"
            )
        for label in self.lesions:
            if label not in LESION_LABELS:
                raise ValueError(
                    f"PhantomSpec lesion must be one of {LESION_LABELS}, got {label!r}"
                )


@dataclass(frozen=True)
class PhantomBox:
    """A lesion box in pixel coordinates (column, row) of the rendered image.

    ``slip_fraction`` is set on ``Spondylolysthesis`` boxes only.
    """

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    slip_fraction: float | None = None

    @property
    def grade(self) -> str | None:
        """Meyerding grade of a spondylolisthesis box, else None."""
        return None if self.slip_fraction is None else meyerding_grade(self.slip_fraction)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass
class _Vertebra:
    """Mutable working geometry of one vertebra while an image is laid out (private)."""

    cx: float
    top: float
    height: float
    width: float
    front_factor: float = 1.0  # lateral wedge: anterior height / posterior height
    density: float = 0.0  # extra trabecular density (collapse)


@dataclass
class _Layout:
    vertebrae: list[_Vertebra]
    gaps: list[float]  # disc height below vertebra i (len n-1)
    narrowed: set[int] = field(default_factory=set)  # disc levels with narrowing
    stenotic: dict[int, int] = field(default_factory=dict)  # disc level -> side (+1 / -1)


def _rect_patch(
    shape: tuple[int, int], x0: float, y0: float, x1: float, y1: float, pad: int
) -> tuple[int, int, int, int] | None:
    rows, cols = shape
    r0 = max(math.floor(y0) - pad, 0)
    r1 = min(math.ceil(y1) + pad, rows)
    c0 = max(math.floor(x0) - pad, 0)
    c1 = min(math.ceil(x1) + pad, cols)
    if r1 <= r0 or c1 <= c0:
        return None
    return r0, r1, c0, c1


def _poly_mask(
    shape: tuple[int, int], points: np.ndarray, pad: int = 2
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Rasterise a polygon (x, y points) into a local uint8 mask patch (0/255, anti-aliased)."""
    xs, ys = points[:, 0], points[:, 1]
    box = _rect_patch(shape, xs.min(), ys.min(), xs.max(), ys.max(), pad)
    if box is None:
        return None
    r0, r1, c0, c1 = box
    mask = np.zeros((r1 - r0, c1 - c0), np.uint8)
    shift = 4
    local = np.round((points - np.array([c0, r0])) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [local], 255, lineType=cv2.LINE_AA, shift=shift)
    return mask, box


def _add_solid(
    image: np.ndarray,
    points: np.ndarray,
    value: float,
    *,
    rim: float = 0.0,
    rim_value: float = 0.0,
    round_radius: int = 0,
    texture: np.ndarray | None = None,
    texture_gain: float = 0.0,
) -> None:
    """Add a (rounded) polygon of bone-like density with an optional cortical rim."""
    pad = max(round_radius, int(rim)) + 3
    made = _poly_mask(image.shape, points, pad)  # type: ignore[arg-type]
    if made is None:
        return
    mask, (r0, r1, c0, c1) = made
    if round_radius > 1:
        k = 2 * round_radius + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    inside = mask.astype(np.float32) / 255.0
    contribution = inside * value
    if texture is not None and texture_gain:
        contribution += inside * texture[r0:r1, c0:c1] * texture_gain
    if rim > 0:
        binary = (mask > 127).astype(np.uint8)
        depth = cv2.distanceTransform(binary, cv2.DIST_L2, 3)
        cortex = np.clip(1.0 - depth / rim, 0.0, 1.0) * inside
        contribution += cortex * rim_value
    image[r0:r1, c0:c1] += contribution


def _add_ellipse(
    image: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    value: float,
    *,
    angle: float = 0.0,
    soft: float = 1.0,
) -> None:
    """Add ``value`` inside an ellipse with a soft (anti-aliased) edge of ``soft`` px."""
    reach = max(rx, ry) + 2 * soft + 1
    box = _rect_patch(image.shape, cx - reach, cy - reach, cx + reach, cy + reach, 0)  # type: ignore[arg-type]
    if box is None or rx <= 0 or ry <= 0:
        return
    r0, r1, c0, c1 = box
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    radius = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    edge = (1.0 - radius) * min(rx, ry) / soft
    image[r0:r1, c0:c1] += np.clip(edge + 0.5, 0.0, 1.0) * value


def _body_corners(v: _Vertebra, view: str) -> np.ndarray:
    """Corners (TL, TR, BR, BL) of a vertebral body; lateral wedge lowers the anterior top."""
    left, right = v.cx - v.width / 2, v.cx + v.width / 2
    bottom = v.top + v.height
    front_top = bottom - v.height * v.front_factor
    if view == "lateral":  # anterior is to the left
        return np.array([[left, front_top], [right, v.top], [right, bottom], [left, bottom]])
    tilt = v.height * (1.0 - v.front_factor)  # AP collapse: slight lateral wedge
    return np.array([[left, v.top + tilt], [right, v.top], [right, bottom], [left, bottom]])


def _body_box(v: _Vertebra, view: str) -> tuple[float, float, float, float]:
    c = _body_corners(v, view)
    return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())


def _choose_distinct(rng: np.random.Generator, candidates: Sequence[int], count: int) -> list[int]:
    if count <= 0 or not candidates:
        return []
    count = min(count, len(candidates))
    picked = rng.choice(np.asarray(candidates), size=count, replace=False)
    return sorted(int(x) for x in picked)


def _texture(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Trabecular-looking texture, zero mean, unit-ish amplitude."""
    small = rng.standard_normal((max(rows // 10, 2), max(cols // 10, 2))).astype(np.float32)
    coarse = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_CUBIC)
    white = rng.standard_normal((rows, cols)).astype(np.float32)
    fine = cv2.GaussianBlur(white, (0, 0), 1.3)
    return np.asarray(0.5 * coarse + 1.6 * fine, dtype=np.float32)


def _finish(
    rng: np.random.Generator, attenuation: np.ndarray, *, noise: float = 0.012
) -> np.ndarray:
    """Attenuation map -> 12-bit display-polarity (bone bright) pixels with exposure and noise."""
    rows, cols = attenuation.shape
    # Heel effect / exposure gradient along a random direction.
    theta = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.1, 0.3)
    yy = np.linspace(-0.5, 0.5, rows, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, cols, dtype=np.float32)[None, :]
    gradient = 1.0 + strength * (math.cos(theta) * xx + math.sin(theta) * yy)
    gain = rng.uniform(1.3, 1.8)
    display = 1.0 - np.exp(-gain * attenuation * gradient)
    # Quantum noise: larger where fewer photons reach the detector (bright = attenuated).
    sigma = noise * (0.6 + 0.8 * display)
    display = display + rng.standard_normal((rows, cols), dtype=np.float32) * sigma
    scale = rng.uniform(0.85, 0.97) * MAX_STORED
    offset = rng.uniform(40, 160)
    stored = np.clip(np.rint(display * scale + offset), 0, MAX_STORED)
    return stored.astype(np.uint16)


def _soft_tissue(rng: np.random.Generator, rows: int, cols: int, center: float) -> np.ndarray:
    """Body envelope: a thick rounded slab of soft tissue with air on the sides."""
    half = cols * rng.uniform(0.38, 0.62)
    x = (np.arange(cols, dtype=np.float32) - center) / half
    profile = np.sqrt(np.clip(1.0 - x**2, 0.0, 1.0))
    profile = cv2.GaussianBlur(profile[None, :], (0, 0), 3.0)[0]
    y = np.linspace(0, 1, rows, dtype=np.float32)
    vertical = 1.0 + rng.uniform(-0.15, 0.15) * (y - 0.5)
    base = rng.uniform(0.28, 0.38)
    return (base * vertical[:, None] * profile[None, :]).astype(np.float32)


def _layout(rng: np.random.Generator, spec: PhantomSpec) -> tuple[_Layout, float]:
    rows, cols = spec.rows, spec.columns
    sx = cols / 512.0
    n = int(rng.integers(5, 7))
    gap = rng.uniform(17.0, 22.0) * rows / 768.0
    span = rows * rng.uniform(0.80, 0.9)
    height = (span - (n - 1) * gap) / n
    if spec.view == "ap":
        width = rng.uniform(150.0, 172.0) * sx
        center = cols / 2 + rng.uniform(-18.0, 18.0) * sx
    else:
        width = rng.uniform(122.0, 140.0) * sx
        center = cols * rng.uniform(0.38, 0.45)
    top = (rows - span) / 2 + rng.uniform(-0.03, 0.03) * rows
    curve = rng.uniform(-14.0, 14.0) * sx
    phase = rng.uniform(0, math.pi)
    vertebrae = []
    y = top
    for i in range(n):
        offset = curve * math.sin(phase + math.pi * i / max(n - 1, 1))
        w = width * rng.uniform(0.95, 1.05) * (1.0 + 0.02 * i)
        vertebrae.append(_Vertebra(cx=center + offset, top=y, height=height, width=w))
        y += height + gap
    return _Layout(vertebrae=vertebrae, gaps=[gap] * (n - 1)), center


def _restack(layout: _Layout) -> None:
    """Recompute vertebra tops from heights and gaps, keeping the column's centre of mass."""
    old_mid = (layout.vertebrae[0].top + layout.vertebrae[-1].top + layout.vertebrae[-1].height) / 2
    y = layout.vertebrae[0].top
    for i, v in enumerate(layout.vertebrae):
        v.top = y
        y += v.height + (layout.gaps[i] if i < len(layout.gaps) else 0.0)
    new_mid = (layout.vertebrae[0].top + layout.vertebrae[-1].top + layout.vertebrae[-1].height) / 2
    for v in layout.vertebrae:
        v.top += old_mid - new_mid


def render_phantom_image(
    rng: np.random.Generator, spec: PhantomSpec
) -> tuple[np.ndarray, list[PhantomBox]]:
    """Draw one phantom spine radiograph.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness (same state, same image).
    spec : PhantomSpec
        Size, view and lesions to draw.

    Returns
    -------
    pixels : numpy.ndarray
        uint16 (rows, columns), 12-bit values, display polarity (bone bright, MONOCHROME2).
    boxes : list of PhantomBox
        One box per drawn lesion, in pixel coordinates of ``pixels``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(spec, PhantomSpec):
        raise TypeError(f"spec must be a PhantomSpec, got {type(spec).__name__}")
    rows, cols = spec.rows, spec.columns
    s = min(rows / 768.0, cols / 512.0)
    view = spec.view
    lateral = view == "lateral"
    counts = {label: spec.lesions.count(label) for label in LESION_LABELS}
    layout, center = _layout(rng, spec)
    verts = layout.vertebrae
    n = len(verts)
    levels = list(range(n - 1))
    boxes: list[PhantomBox] = []

    # --- choose where each lesion goes --------------------------------------------------------
    slip_level: int | None = None
    slip_fraction = 0.0
    if counts["Spondylolysthesis"]:
        slip_level = int(rng.choice(levels[len(levels) // 2 :] if len(levels) > 1 else levels))
        slip_fraction = float(rng.uniform(0.12, 0.92))
    collapse: int | None = None
    if counts["Vertebral collapse"]:
        busy = set() if slip_level is None else {slip_level, slip_level + 1}
        free = [i for i in range(n) if i not in busy] or list(range(n))
        collapse = int(rng.choice(free))
    narrowed = _choose_distinct(
        rng, [lv for lv in levels if lv != slip_level], counts["Disc space narrowing"]
    )
    stenotic = _choose_distinct(rng, levels, counts["Foraminal stenosis"])
    implant_span: tuple[int, int] | None = None
    if counts["Surgical implant"]:
        n_levels = int(rng.integers(2, 4))
        first = int(rng.integers(0, max(n - n_levels, 0) + 1))
        implant_span = (first, min(first + n_levels, n) - 1)
    other = _choose_distinct(rng, [i for i in range(n) if i != collapse], counts["Other lesions"])
    corners = [(i, side, end) for i in range(n) for side in (-1, 1) for end in (0, 1)]
    if lateral:
        corners = [c for c in corners if c[1] == -1]  # anterior corners only
    corner_ids = _choose_distinct(rng, list(range(len(corners))), counts["Osteophytes"])
    spurs = [corners[k] for k in corner_ids]

    # --- deform the column ----------------------------------------------------------------------
    if collapse is not None:
        v = verts[collapse]
        v.height *= rng.uniform(0.45, 0.6)
        v.front_factor = rng.uniform(0.5, 0.7) if lateral else rng.uniform(0.8, 0.92)
        v.density = 0.14
    for lv in narrowed:
        layout.gaps[lv] *= rng.uniform(0.18, 0.3)
    layout.narrowed = set(narrowed)
    _restack(layout)
    if slip_level is not None:
        direction = -1.0 if lateral else float(rng.choice([-1.0, 1.0]))
        dx = direction * slip_fraction * verts[slip_level + 1].width
        for i in range(slip_level + 1):
            verts[i].cx += dx
    for lv in stenotic:
        layout.stenotic[lv] = 1 if lateral else int(rng.choice([-1, 1]))

    # --- draw -----------------------------------------------------------------------------------
    attenuation = _soft_tissue(rng, rows, cols, center + (0.12 * cols if lateral else 0.0))
    texture = _texture(rng, rows, cols)
    rim = 5.0 * s
    round_radius = max(round(7 * s), 1)
    bone = rng.uniform(0.42, 0.5)
    cortex = rng.uniform(0.32, 0.4)

    # Discs: slightly denser than soft tissue, between neighbouring bodies.
    for i in range(n - 1):
        up, down = verts[i], verts[i + 1]
        y0, y1 = up.top + up.height - 2, down.top + 2
        x0 = down.cx - down.width / 2 + 4 * s
        x1 = down.cx + down.width / 2 - 4 * s
        if y1 > y0:
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            _add_solid(attenuation, pts, 0.06)

    # Posterior elements and foramina (lateral) / pedicles and transverse processes (AP).
    for v in verts:
        bottom = v.top + v.height
        if lateral:
            back = v.cx + v.width / 2
            ped = np.array(
                [
                    [back - 4 * s, v.top + 0.08 * v.height],
                    [back + 0.42 * v.width, v.top + 0.12 * v.height],
                    [back + 0.42 * v.width, v.top + 0.5 * v.height],
                    [back - 4 * s, v.top + 0.45 * v.height],
                ]
            )
            _add_solid(attenuation, ped, 0.2, rim=3 * s, rim_value=0.12, round_radius=3)
            arch = np.array(
                [
                    [back + 0.34 * v.width, v.top + 0.05 * v.height],
                    [back + 0.6 * v.width, v.top + 0.1 * v.height],
                    [back + 0.62 * v.width, bottom + 0.1 * v.height],
                    [back + 0.36 * v.width, bottom + 0.05 * v.height],
                ]
            )
            _add_solid(attenuation, arch, 0.22, rim=3 * s, rim_value=0.1, round_radius=4)
            spinous = np.array(
                [
                    [back + 0.58 * v.width, v.top + 0.25 * v.height],
                    [back + 0.98 * v.width, v.top + 0.35 * v.height],
                    [back + 0.98 * v.width, v.top + 0.75 * v.height],
                    [back + 0.58 * v.width, v.top + 0.8 * v.height],
                ]
            )
            _add_solid(attenuation, spinous, 0.2, rim=3 * s, rim_value=0.1, round_radius=5)
        else:
            for side in (-1, 1):
                px = v.cx + side * 0.3 * v.width
                py = v.top + 0.3 * v.height
                _add_ellipse(attenuation, px, py, 0.09 * v.width, 0.17 * v.height, 0.16)
                _add_ellipse(attenuation, px, py, 0.055 * v.width, 0.11 * v.height, -0.1)
                tx0 = v.cx + side * 0.45 * v.width
                tx1 = v.cx + side * 0.78 * v.width
                proc = np.array(
                    [
                        [min(tx0, tx1), py - 0.08 * v.height],
                        [max(tx0, tx1), py - 0.05 * v.height],
                        [max(tx0, tx1), py + 0.05 * v.height],
                        [min(tx0, tx1), py + 0.08 * v.height],
                    ]
                )
                _add_solid(attenuation, proc, 0.16, round_radius=3)
            # Spinous process projected on the midline.
            _add_ellipse(
                attenuation, v.cx, v.top + 0.62 * v.height, 0.05 * v.width, 0.16 * v.height, 0.12
            )

    # Vertebral bodies.
    for v in verts:
        _add_solid(
            attenuation,
            _body_corners(v, view),
            bone + v.density,
            rim=rim,
            rim_value=cortex + 0.5 * v.density,
            round_radius=round_radius,
            texture=texture,
            texture_gain=0.07,
        )

    # Endplate sclerosis on narrowed discs (the disc is already thin).
    for lv in narrowed:
        up, down = verts[lv], verts[lv + 1]
        for y, vv in ((up.top + up.height - 3 * s, up), (down.top + 3 * s, down)):
            pts = np.array(
                [
                    [vv.cx - vv.width / 2 + 6 * s, y - 3 * s],
                    [vv.cx + vv.width / 2 - 6 * s, y - 3 * s],
                    [vv.cx + vv.width / 2 - 6 * s, y + 3 * s],
                    [vv.cx - vv.width / 2 + 6 * s, y + 3 * s],
                ]
            )
            _add_solid(attenuation, pts, 0.18)
        x0 = min(up.cx - up.width / 2, down.cx - down.width / 2) - 4 * s
        x1 = max(up.cx + up.width / 2, down.cx + down.width / 2) + 4 * s
        y0 = up.top + up.height - 12 * s
        y1 = down.top + 12 * s
        boxes.append(PhantomBox("Disc space narrowing", x0, y0, x1, y1))

    # Foramina at each disc level: dark teardrops; stenotic ones are slits with bony overgrowth.
    for lv in range(n - 1):
        up, down = verts[lv], verts[lv + 1]
        mid_y = (up.top + up.height + down.top) / 2 - 0.12 * up.height
        sides = [1] if lateral else [-1, 1]
        for side in sides:
            if lateral:
                fx = up.cx + up.width / 2 + 0.2 * up.width
            else:
                fx = up.cx + side * 0.62 * up.width
            stenosis = layout.stenotic.get(lv) == side
            rx, ry = 0.11 * up.width, 0.3 * up.height
            if stenosis:
                _add_ellipse(attenuation, fx, mid_y, rx * 0.35, ry * 0.35, -0.1)
                for dy in (-1, 1):
                    _add_ellipse(attenuation, fx, mid_y + dy * ry * 0.55, rx * 0.9, ry * 0.35, 0.3)
                bx = rx * 1.5
                by = ry * 1.15
                boxes.append(
                    PhantomBox("Foraminal stenosis", fx - bx, mid_y - by, fx + bx, mid_y + by)
                )
            else:
                _add_ellipse(attenuation, fx, mid_y, rx, ry, -0.14, soft=3.0)

    # Osteophytes: bright spurs growing out of body corners towards the disc.
    for i, side, end in spurs:
        v = verts[i]
        corner = _body_corners(v, view)
        # TL, TR, BR, BL
        idx = {(-1, 0): 0, (1, 0): 1, (1, 1): 2, (-1, 1): 3}[(side, end)]
        cx_, cy_ = corner[idx]
        length = rng.uniform(20.0, 30.0) * s
        spur_base = rng.uniform(0.28, 0.4) * v.height
        vertical = -1.0 if end == 0 else 1.0  # towards the neighbouring disc
        tip = (cx_ + side * length, cy_ + vertical * length * 0.55)
        inner = (cx_ - side * 5 * s, cy_ - vertical * spur_base)
        along = (cx_ - side * 0.18 * v.width, cy_ + vertical * 2 * s)
        pts = np.array([inner, tip, along, (cx_ - side * 6 * s, cy_)])
        _add_solid(attenuation, pts, 0.55, round_radius=1)
        xs = [cx_, tip[0]]
        ys = [cy_, tip[1]]
        boxes.append(
            PhantomBox(
                "Osteophytes",
                min(xs) - 8 * s,
                min(ys) - 8 * s,
                max(xs) + 8 * s,
                max(ys) + 8 * s,
            )
        )

    # Other lesions: lytic (dark, sclerotic rim) or sclerotic (dense) blob inside a body.
    for i in other:
        v = verts[i]
        r = rng.uniform(12.0, 18.0) * s
        r = min(r, 0.3 * v.height, 0.3 * v.width)
        ox = v.cx + rng.uniform(-0.2, 0.2) * v.width
        oy = v.top + v.height * rng.uniform(0.4, 0.6)
        if rng.random() < 0.5:
            _add_ellipse(attenuation, ox, oy, r * 1.15, r, 0.22, soft=1.5)
            _add_ellipse(attenuation, ox, oy, r * 0.9, r * 0.78, -0.6, soft=1.5)
        else:
            _add_ellipse(attenuation, ox, oy, r * 1.1, r, 0.5, soft=1.5)
        boxes.append(
            PhantomBox("Other lesions", ox - 1.3 * r, oy - 1.2 * r, ox + 1.3 * r, oy + 1.2 * r)
        )

    if collapse is not None:
        x0, y0, x1, y1 = _body_box(verts[collapse], view)
        boxes.append(
            PhantomBox("Vertebral collapse", x0 - 6 * s, y0 - 6 * s, x1 + 6 * s, y1 + 6 * s)
        )

    if slip_level is not None:
        ua = _body_box(verts[slip_level], view)
        lb = _body_box(verts[slip_level + 1], view)
        boxes.append(
            PhantomBox(
                "Spondylolysthesis",
                min(ua[0], lb[0]) - 6 * s,
                min(ua[1], lb[1]) - 6 * s,
                max(ua[2], lb[2]) + 6 * s,
                max(ua[3], lb[3]) + 6 * s,
                slip_fraction=round(slip_fraction, 4),
            )
        )

    # Surgical implant: pedicle screws and rods (metal saturates).
    if implant_span is not None:
        metal = np.zeros_like(attenuation)
        thick = max(round(7 * s), 2)
        heads: dict[int, list[tuple[float, float]]] = {}
        for i in range(implant_span[0], implant_span[1] + 1):
            v = verts[i]
            py = v.top + 0.35 * v.height
            if lateral:
                back = v.cx + v.width / 2
                head_pt = (back + 0.38 * v.width, py - 0.05 * v.height)
                tip_pt = (v.cx - 0.25 * v.width, py + 0.08 * v.height)
                _draw_line(metal, head_pt, tip_pt, thick)
                heads.setdefault(1, []).append(head_pt)
            else:
                for side in (-1, 1):
                    head_pt = (v.cx + side * 0.42 * v.width, py)
                    tip_pt = (v.cx + side * 0.05 * v.width, py + 0.05 * v.height)
                    _draw_line(metal, head_pt, tip_pt, thick)
                    heads.setdefault(side, []).append(head_pt)
        for chain in heads.values():
            for a, b in itertools.pairwise(chain):
                _draw_line(metal, a, b, thick + 2)
            for a in chain:
                _add_ellipse(metal, a[0], a[1], 6 * s, 6 * s, 1.0)
        metal = np.clip(metal, 0.0, 1.0)
        attenuation += 1.6 * metal
        my, mx = np.nonzero(metal > 0.2)
        if len(mx):
            boxes.append(
                PhantomBox(
                    "Surgical implant",
                    float(mx.min()) - 4 * s,
                    float(my.min()) - 4 * s,
                    float(mx.max()) + 4 * s,
                    float(my.max()) + 4 * s,
                )
            )

    pixels = _finish(rng, attenuation)
    return pixels, [_clip_box(b, rows, cols) for b in boxes]


def _draw_line(
    image: np.ndarray, a: tuple[float, float], b: tuple[float, float], thickness: int
) -> None:
    shift = 4
    pa = (round(a[0] * 16), round(a[1] * 16))
    pb = (round(b[0] * 16), round(b[1] * 16))
    layer = np.zeros(image.shape, np.uint8)
    cv2.line(layer, pa, pb, 255, thickness, lineType=cv2.LINE_AA, shift=shift)
    np.maximum(image, layer.astype(np.float32) / 255.0, out=image)


def _clip_box(box: PhantomBox, rows: int, cols: int) -> PhantomBox:
    xmin = float(np.clip(box.xmin, 0, cols - 1))
    xmax = float(np.clip(box.xmax, 0, cols - 1))
    ymin = float(np.clip(box.ymin, 0, rows - 1))
    ymax = float(np.clip(box.ymax, 0, rows - 1))
    return PhantomBox(
        box.label,
        round(xmin, 2),
        round(ymin, 2),
        round(max(xmax, xmin + 1), 2),
        round(max(ymax, ymin + 1), 2),
        box.slip_fraction,
    )


# --------------------------------------------------------------------------------------------
# Non-spine images (for the gate's tests)
# --------------------------------------------------------------------------------------------

NON_SPINE_KINDS: tuple[str, ...] = ("chest", "hand")


def render_non_spine_image(
    rng: np.random.Generator, kind: str = "chest", rows: int = 512, columns: int = 512
) -> np.ndarray:
    """Draw a radiograph that is not a spine: a PA chest or a hand.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    kind : str
        ``"chest"`` (lung fields, ribs, heart, clavicles) or ``"hand"`` (palm and five rays
        of metacarpals and phalanges).
    rows, columns : int
        Image size (at least 128 x 128).

    Returns
    -------
    numpy.ndarray
        uint16 (rows, columns), 12-bit values, display polarity (bone bright).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if kind not in NON_SPINE_KINDS:
        raise ValueError(f"kind must be one of {NON_SPINE_KINDS}, got {kind!r}")
    if rows < 128 or columns < 128:
        raise ValueError(f"image size must be at least 128 x 128, got {rows} x {columns}")
    image = np.zeros((rows, columns), np.float32)
    texture = _texture(rng, rows, columns)
    if kind == "chest":
        image += _soft_tissue(rng, rows, columns, columns / 2) * 1.2
        for side in (-1, 1):
            cx = columns / 2 + side * columns * 0.2
            _add_ellipse(image, cx, rows * 0.48, columns * 0.16, rows * 0.32, -0.28, soft=6.0)
            for k in range(9):  # ribs: thin arcs across each lung field
                y = rows * (0.2 + 0.07 * k)
                xs = np.linspace(cx - side * columns * 0.02, cx + side * columns * 0.2, 12)
                ys = y + 0.06 * rows * np.sin(np.linspace(0, math.pi, 12)) * -1
                pts = np.stack([xs, ys], 1)
                pts2 = np.concatenate([pts, pts[::-1] + np.array([0.0, 0.018 * rows])])
                _add_solid(image, pts2, 0.18)
            _add_solid(
                image,
                np.array(
                    [
                        [columns / 2, rows * 0.14],
                        [columns / 2 + side * columns * 0.3, rows * 0.1],
                        [columns / 2 + side * columns * 0.3, rows * 0.125],
                        [columns / 2, rows * 0.165],
                    ]
                ),
                0.25,
            )
        _add_ellipse(
            image, columns * 0.53, rows * 0.62, columns * 0.13, rows * 0.14, 0.22, soft=5.0
        )
        image += 0.03 * texture
    else:
        _add_ellipse(image, columns / 2, rows * 0.75, columns * 0.27, rows * 0.2, 0.3, soft=4.0)
        for k in range(5):
            angle = math.radians(-40 + 20 * k)
            base_x = columns / 2 + (k - 2) * columns * 0.1
            base_y = rows * 0.72
            length = rows * (0.13 if k == 0 else 0.17)
            x, y = base_x, base_y
            for _ in range(3 if k else 2):
                nx = x + math.sin(angle) * length
                ny = y - math.cos(angle) * length
                width = columns * 0.022
                nrm = np.array([math.cos(angle), math.sin(angle)]) * width
                p0, p1 = np.array([x, y]), np.array([nx, ny])
                pts = np.array([p0 + nrm, p1 + nrm, p1 - nrm, p0 - nrm])
                _add_solid(
                    image,
                    pts,
                    0.25 + 0.15,
                    rim=3,
                    rim_value=0.25,
                    round_radius=2,
                    texture=texture,
                    texture_gain=0.05,
                )
                flesh = np.array(
                    [
                        p0 + 2.2 * nrm,
                        p1 + 2.2 * nrm,
                        p1 - 2.2 * nrm,
                        p0 - 2.2 * nrm,
                    ]
                )
                _add_solid(image, flesh, 0.12)
                x, y = nx + math.sin(angle) * 4, ny - math.cos(angle) * 4
                length *= 0.7
    return _finish(rng, np.clip(image, 0.0, None))


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------


def random_hex_id(rng: np.random.Generator) -> str:
    """Return a 32-hex identifier like VinDr's de-identified ids (not a valid DICOM UID)."""
    return bytes(rng.integers(0, 256, size=16, dtype=np.uint8)).hex()


def _set(ds: Dataset, tag: int, vr: str, value: object) -> None:
    """Set an element without pydicom's value validation (VinDr's UIDs are not valid UIDs)."""
    ds[tag] = DataElement(tag, vr, value, validation_mode=dicom_config.IGNORE)


def phantom_dataset(
    pixels: np.ndarray,
    *,
    study_id: str,
    series_id: str,
    image_id: str,
    monochrome1: bool = False,
) -> Dataset:
    """Build a VinDr-like JPEG 2000 lossless DICOM data set from display-polarity pixels.

    Parameters
    ----------
    pixels : numpy.ndarray
        uint16 (rows, columns), 12-bit values, bone bright.
    study_id, series_id, image_id : str
        32-hex identifiers, used as Study/Series/SOP Instance UID as VinDr does.
    monochrome1 : bool
        Store as MONOCHROME1: pixel values inverted (``4095 - v``) and the window centre too.

    Returns
    -------
    pydicom.Dataset
        Data set with file meta (JPEG 2000 Lossless transfer syntax), no Modality and no
        SOP Class UID.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise TypeError("pixels must be a 2-D uint16 numpy array")
    if int(pixels.max(initial=0)) > MAX_STORED:
        raise ValueError(f"pixels must fit in 12 bits, got max {int(pixels.max())}")
    for name, value in (("study_id", study_id), ("series_id", series_id), ("image_id", image_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    lo, hi = np.percentile(pixels, [1.0, 99.5])
    center = float((lo + hi) / 2)
    width = float(max(hi - lo, 2.0))
    stored = pixels
    if monochrome1:
        stored = (MAX_STORED - pixels.astype(np.int32)).astype(np.uint16)
        center = MAX_STORED - center
    ds = Dataset()
    _set(ds, 0x00080018, "UI", image_id)  # SOP Instance UID
    _set(ds, 0x0020000D, "UI", study_id)
    _set(ds, 0x0020000E, "UI", series_id)
    ds.PatientID = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = (int(x) for x in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{center:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.compress(JPEG2000Lossless, np.ascontiguousarray(stored), generate_instance_uid=False)
    meta = FileMetaDataset()
    _set(meta, 0x00020003, "UI", image_id)  # Media Storage SOP Instance UID
    meta.TransferSyntaxUID = JPEG2000Lossless
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


_INVALID_UID = "Invalid value for VR UI"


class _DropInvalidUidMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _INVALID_UID not in record.getMessage()


def write_dicom(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a phantom data set as it is (no file-format enforcement), atomically."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    # pydicom re-validates the 32-hex "UIDs" when it copies the file meta and both warns and
    # logs; they are meant to be invalid (as VinDr's are), so silence exactly that message.
    pydicom_logger = logging.getLogger("pydicom")
    quiet = _DropInvalidUidMessages()
    pydicom_logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_INVALID_UID, category=UserWarning)
            ds.save_as(tmp, enforce_file_format=False, overwrite=True)
    finally:
        pydicom_logger.removeFilter(quiet)
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------
# Data set writer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomImageEntry:
    """One written image (for the summary)."""

    image_id: str
    study_id: str
    series_id: str
    split: str
    view: str
    photometric: str
    boxes: tuple[PhantomBox, ...]
    rad_id: str = "rad1"


@dataclass(frozen=True)
class PhantomSummary:
    """What ``write_phantom_dataset`` wrote."""

    root: Path
    images: tuple[PhantomImageEntry, ...]

    @property
    def n_abnormal(self) -> int:
        """Number of images with at least one lesion."""
        return sum(1 for e in self.images if e.boxes)


@dataclass(frozen=True)
class _ImageJob:
    root: Path
    seed: np.random.SeedSequence
    split: str
    study_id: str
    view: str
    abnormal: bool
    rows: int
    columns: int
    frequencies: dict[str, float]
    monochrome1_fraction: float


def _make_image(job: _ImageJob) -> PhantomImageEntry:
    """Render and write one image (runs in a worker process when ``workers > 1``)."""
    rng = np.random.default_rng(job.seed)
    series_id = random_hex_id(rng)
    image_id = random_hex_id(rng)
    rad_id = f"rad{int(rng.integers(1, 4))}"
    monochrome1 = bool(rng.random() < job.monochrome1_fraction)
    lesions = sample_lesions(rng, job.frequencies) if job.abnormal else ()
    spec = PhantomSpec(rows=job.rows, columns=job.columns, view=job.view, lesions=lesions)
    pixels, boxes = render_phantom_image(rng, spec)
    ds = phantom_dataset(
        pixels,
        study_id=job.study_id,
        series_id=series_id,
        image_id=image_id,
        monochrome1=monochrome1,
    )
    write_dicom(ds, job.root / f"{job.split}_images" / f"{image_id}.dicom")
    return PhantomImageEntry(
        image_id=image_id,
        study_id=job.study_id,
        series_id=series_id,
        split=job.split,
        view=job.view,
        photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
        boxes=tuple(boxes),
        rad_id=rad_id,
    )


def sample_lesions(
    rng: np.random.Generator, frequencies: Mapping[str, float] = VINDR_CLASS_FREQUENCIES
) -> tuple[str, ...]:
    """Sample the lesion labels of one abnormal image (at least one; repeats = instances).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    frequencies : Mapping[str, float]
        Per-image probability of each class among abnormal images.

    Returns
    -------
    tuple of str
        Labels in ``LESION_LABELS`` order, repeated for several instances.
    """
    for label, p in frequencies.items():
        if label not in LESION_LABELS:
            raise ValueError(f"frequencies has an unknown label {label!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"frequency of {label!r} must be in [0, 1], got {p!r}")
    if not any(p > 0 for p in frequencies.values()):
        raise ValueError("frequencies must give at least one class a probability > 0")
    instances = {
        "Osteophytes": (1, 4),
        "Disc space narrowing": (1, 3),
        "Foraminal stenosis": (1, 3),
    }
    while True:
        out: list[str] = []
        for label in LESION_LABELS:
            if rng.random() < frequencies.get(label, 0.0):
                lo, hi = instances.get(label, (1, 2))
                out.extend([label] * int(rng.integers(lo, hi)))
        if out:
            return tuple(out)


def write_phantom_dataset(
    out: str | os.PathLike[str],
    n_images: int,
    seed: int,
    *,
    balanced: bool = False,
    size: tuple[int, int] = (768, 512),
    test_fraction: float = 0.2,
    abnormal_fraction: float = 0.5,
    monochrome1_fraction: float = 0.15,
    workers: int | None = None,
) -> PhantomSummary:
    """Write a phantom data set in VinDr-SpineXR's layout.

    Parameters
    ----------
    out : path
        Output directory (created; existing phantom files are overwritten).
    n_images : int
        Total number of images (train + test), at least 2.
    seed : int
        Seed; the same seed writes the same bytes.
    balanced : bool
        Every lesion class common (probability ``BALANCED_CLASS_FREQUENCY``) instead of
        VinDr's imbalance.
    size : (int, int)
        Image rows and columns.
    test_fraction : float
        Fraction of studies in the test split (at least one study each split).
    abnormal_fraction : float
        Fraction of abnormal studies.
    monochrome1_fraction : float
        Fraction of images stored as MONOCHROME1.
    workers : int, optional
        Worker processes (default 1). Every image has its own seed, so the output bytes do
        not depend on the number of workers.

    Returns
    -------
    PhantomSummary
    """
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 2:
        raise ValueError(f"n_images must be an int >= 2, got {n_images!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    for name, frac in (
        ("test_fraction", test_fraction),
        ("abnormal_fraction", abnormal_fraction),
        ("monochrome1_fraction", monochrome1_fraction),
    ):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac!r}")
    rows, cols = size
    PhantomSpec(rows=rows, columns=cols)  # validates the size
    frequencies: Mapping[str, float] = (
        dict.fromkeys(LESION_LABELS, BALANCED_CLASS_FREQUENCY)
        if balanced
        else VINDR_CLASS_FREQUENCIES
    )
    root = Path(out)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (root / f"{split}_images").mkdir(exist_ok=True)

    plan_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    studies: list[int] = []
    remaining = n_images
    while remaining > 0:
        k = 2 if remaining >= 2 and plan_rng.random() < 0.6 else 1
        studies.append(k)
        remaining -= k
    n_test = round(test_fraction * len(studies))
    if len(studies) >= 2:
        n_test = min(max(n_test, 1), len(studies) - 1)
    test_studies = set(plan_rng.permutation(len(studies))[:n_test].tolist())

    image_seeds = np.random.SeedSequence([seed, 1]).spawn(n_images)
    jobs: list[_ImageJob] = []
    for s_index, n_views in enumerate(studies):
        split = "test" if s_index in test_studies else "train"
        study_id = random_hex_id(plan_rng)
        abnormal = bool(plan_rng.random() < abnormal_fraction)
        views = ("ap", "lateral") if n_views == 2 else (str(plan_rng.choice(VIEWS)),)
        for view in views:
            jobs.append(
                _ImageJob(
                    root=root,
                    seed=image_seeds[len(jobs)],
                    split=split,
                    study_id=study_id,
                    view=view,
                    abnormal=abnormal,
                    rows=rows,
                    columns=cols,
                    frequencies=dict(frequencies),
                    monochrome1_fraction=monochrome1_fraction,
                )
            )
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise ValueError(f"workers must be an int or None, got {workers!r}")
    n_workers = min(workers or 1, len(jobs))
    if n_workers > 1:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            entries = list(pool.map(_make_image, jobs, chunksize=4))
    else:
        entries = [_make_image(job) for job in jobs]
    rows_by_split: dict[str, list[list[str]]] = {"train": [], "test": []}
    meta_rows: list[list[str]] = []
    for e in entries:
        ids = [e.study_id, e.series_id, e.image_id, e.rad_id]
        if not e.boxes:
            rows_by_split[e.split].append([*ids, NO_FINDING, "", "", "", ""])
        for b in e.boxes:
            coords = [f"{b.xmin:.2f}", f"{b.ymin:.2f}", f"{b.xmax:.2f}", f"{b.ymax:.2f}"]
            rows_by_split[e.split].append([*ids, b.label, *coords])
            if b.slip_fraction is not None:
                meta_rows.append([e.image_id, *coords, f"{b.slip_fraction:.4f}", str(b.grade)])
    for split, csv_rows in rows_by_split.items():
        _write_csv(root / "annotations" / f"{split}.csv", CSV_COLUMNS, csv_rows)
    _write_csv(root / "annotations" / "phantom_meta.csv", META_COLUMNS, meta_rows)
    summary = PhantomSummary(root=root, images=tuple(entries))
    logger.info(
        "phantom: wrote %d images (%d abnormal) in %d studies to %s",
        len(entries),
        summary.n_abnormal,
        len(studies),
        root,
    )
    return summary


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# CLI pieces (mounted by training/cli.py as ``spine-train phantom``)
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"768x512"`` (rows x columns) into a tuple."""
    try:
        rows_text, cols_text = text.lower().split("x")
        rows, cols = int(rows_text), int(cols_text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 768x512, got {text!r}") from exc
    if rows < 128 or cols < 96:
        raise argparse.ArgumentTypeError(f"size must be at least 128x96, got {text!r}")
    return rows, cols


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``phantom`` subcommand's arguments to ``parser``."""
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--images", type=int, default=400, help="number of images (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--balanced",
        action="store_true",
        help="make every lesion class common (demo bundle) instead of VinDr's imbalance",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=(768, 512),
        help="image size as ROWSxCOLUMNS (default 768x512)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="fraction of studies in test.csv"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (same bytes for any number)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train phantom``; returns the exit status."""
    summary = write_phantom_dataset(
        args.out,
        args.images,
        args.seed,
        balanced=args.balanced,
        size=tuple(args.size),
        test_fraction=args.test_fraction,
        workers=args.workers,
    )
    n_train = sum(1 for e in summary.images if e.split == "train")
    print(
        f"wrote {len(summary.images)} images ({n_train} train, "
        f"{len(summary.images) - n_train} test, {summary.n_abnormal} abnormal) to {summary.root}"
    )
    return 0


__all__ = [
    "BALANCED_CLASS_FREQUENCY",
    "NO_FINDING",
    "VINDR_CLASS_FREQUENCIES",
    "PhantomBox",
    "PhantomSpec",
    "PhantomSummary",
    "add_arguments",
    "meyerding_grade",
    "phantom_dataset",
    "random_hex_id",
    "render_non_spine_image",
    "render_phantom_image",
    "run",
    "sample_lesions",
    "write_dicom",
    "write_phantom_dataset",
]

"""Robustness suite: metric deltas of the cascade under image corruptions.

Corruptions act on the display-ready source image (float ``[0, 1]``, bone bright, as
:func:`spine_node.imaging.decode` returns it), *before* the shared preparation
(:func:`spine_node.imaging.prepare_array`), like a degraded acquisition would. Each has five
severities; every one is deterministic for a seed:

=================  =====================================================================
``gaussian_noise``  additive N(0, sigma), sigma = 0.02, 0.04, 0.06, 0.09, 0.12
``gaussian_blur``   Gaussian blur, sigma = 0.2, 0.4, 0.6, 1.0, 1.5 % of the short side
``contrast``        ``m + c (x - m)`` around the mean m, c = 0.75, 0.6, 0.45, 0.3, 0.2
``exposure``        under-exposure look ``x ** g``, g = 1.3, 1.6, 2.0, 2.5, 3.0
``jpeg``            8-bit JPEG round trip, quality 60, 40, 25, 15, 8
=================  =====================================================================

:func:`run_robustness` predicts on clean and corrupted images and reports each metric's
delta (corrupted minus clean). Images are streamed batch by batch (bounded memory); the
decision threshold is the bundle's (``spine-train robustness --bundle``), never a default.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from spine_node.imaging import PreparedImage, PrepParams, decode, prepare_array, read_dataset
from spine_node.results.types import Finding
from training import evaluate as ev
from training.vindr import ImageRecord, load_records

logger = logging.getLogger(__name__)

T = TypeVar("T")

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
_NOISE_SIGMA = (0.02, 0.04, 0.06, 0.09, 0.12)
_BLUR_FRACTION = (0.002, 0.004, 0.006, 0.010, 0.015)
_CONTRAST = (0.75, 0.6, 0.45, 0.3, 0.2)
_GAMMA = (1.3, 1.6, 2.0, 2.5, 3.0)
_JPEG_QUALITY = (60, 40, 25, 15, 8)


def _check(image: np.ndarray, severity: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        raise TypeError("image must be a 2-D numpy array")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    out = image.astype(np.float32, copy=False)
    if out.size and not (float(out.min()) >= 0.0 and float(out.max()) <= 1.0):
        raise ValueError("image values must lie in [0, 1]")
    return out


def gaussian_noise(image: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Additive white Gaussian noise (seeded), clipped to [0, 1]."""
    x = _check(image, severity)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(x.shape, dtype=np.float32) * _NOISE_SIGMA[severity - 1]
    return np.clip(x + noise, 0.0, 1.0).astype(np.float32)


def gaussian_blur(image: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Gaussian blur with sigma a fraction of the image's short side."""
    x = _check(image, severity)
    sigma = max(_BLUR_FRACTION[severity - 1] * min(x.shape), 0.5)
    out = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def contrast(image: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Contrast reduction around the image mean."""
    x = _check(image, severity)
    mean = float(x.mean()) if x.size else 0.0
    return np.clip(mean + (x - mean) * _CONTRAST[severity - 1], 0.0, 1.0).astype(np.float32)


def exposure(image: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Exposure error: a gamma curve ``x ** g`` (darker mid-tones, crushed soft tissue)."""
    x = _check(image, severity)
    return np.power(x, _GAMMA[severity - 1]).astype(np.float32)


def jpeg(image: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Lossy 8-bit JPEG round trip (what a careless export or a screenshot does)."""
    x = _check(image, severity)
    data = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", data, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY[severity - 1]])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if decoded is None:
        raise RuntimeError("JPEG decoding failed")
    return (decoded.astype(np.float32) / 255.0).astype(np.float32)


CorruptionFn = Callable[[np.ndarray, int, int], np.ndarray]

#: Corruption name -> function(image, severity, seed).
CORRUPTIONS: Mapping[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "exposure": exposure,
    "jpeg": jpeg,
}


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity."""

    name: str
    severity: int

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {tuple(CORRUPTIONS)}, got {self.name!r}")
        if (
            isinstance(self.severity, bool)
            or not isinstance(self.severity, int)
            or self.severity not in SEVERITIES
        ):
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def key(self) -> str:
        """``"name@severity"``."""
        return f"{self.name}@{self.severity}"

    def apply(self, image: np.ndarray, seed: int = 0) -> np.ndarray:
        """Corrupt ``image`` (float [0, 1], 2-D); same seed, same result."""
        return CORRUPTIONS[self.name](image, self.severity, seed)


def corruption_grid(
    names: Sequence[str] | None = None, severities: Sequence[int] = SEVERITIES
) -> list[Corruption]:
    """Every named corruption (default all) at every severity."""
    return [Corruption(n, s) for n in (names or tuple(CORRUPTIONS)) for s in severities]


# --------------------------------------------------------------------------------------------
# Running a predictor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePrediction:
    """What a predictor says about one image.

    ``score`` is the triage probability (None: not processed, counted as a normal call);
    ``findings`` are boxes in source-image pixels.
    """

    score: float | None
    findings: tuple[Finding, ...] = ()


PredictFn = Callable[[Sequence[PreparedImage]], Sequence[ImagePrediction]]


def load_source_pixels(record: ImageRecord, params: PrepParams | None = None) -> np.ndarray:
    """Decode a record's DICOM file to the display-ready [0, 1] source image."""
    max_pixels = (params or PrepParams()).max_pixels
    return decode(read_dataset(record.path, max_pixels=max_pixels), max_pixels=max_pixels).pixels


def _condition_metrics(
    records: Sequence[ImageRecord],
    preds: Sequence[ImagePrediction],
    threshold: float,
) -> dict[str, Any]:
    ids = [r.image_id for r in records]
    labels = {r.image_id: r.label for r in records}
    not_processed = sum(1 for p in preds if p.score is None)
    scores = {
        r.image_id: (0.0 if p.score is None else float(p.score))
        for r, p in zip(records, preds, strict=True)
    }
    dets = [
        ev.Detection(r.image_id, f.label, f.score, *f.box)
        for r, p in zip(records, preds, strict=True)
        for f in p.findings
    ]
    gts = [
        ev.GroundTruthBox(r.image_id, b.label, b.xmin, b.ymin, b.xmax, b.ymax)
        for r in records
        for b in r.boxes
    ]
    both_classes = 0 < sum(labels.values()) < len(ids)
    report = ev.evaluate(
        ids,
        labels=labels,
        scores=scores if both_classes else None,
        ground_truth=gts,
        detections=dets,
        threshold=threshold,
        n_bootstrap=0,
    )
    data = report.to_json()
    keys = ("auroc", "sensitivity", "specificity", "f1", "map50", "map50_95")
    out: dict[str, Any] = {k: data.get(k) for k in keys}
    out["mean_score"] = float(np.mean(list(scores.values()))) if scores else None
    out["not_processed"] = not_processed
    return out


def _deltas(clean: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, base in clean.items():
        value = other.get(key)
        if key == "not_processed":
            continue
        if base is None or value is None:
            out[key] = None
        else:
            out[key] = float(value) - float(base)
    return out


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _predict(
    predict_fn: PredictFn,
    images: Iterable[np.ndarray],
    params: PrepParams,
    batch_size: int,
) -> list[ImagePrediction]:
    """Prepare and predict ``images`` batch by batch (only one batch is held at a time)."""
    out: list[ImagePrediction] = []
    for chunk in _batched(images, batch_size):
        batch = [prepare_array(img, params) for img in chunk]
        del chunk
        preds = list(predict_fn(batch))
        if len(preds) != len(batch):
            raise ValueError(
                f"predict_fn returned {len(preds)} predictions for {len(batch)} images"
            )
        for p in preds:
            if not isinstance(p, ImagePrediction):
                raise TypeError(f"predict_fn must return ImagePrediction, got {type(p).__name__}")
        out.extend(preds)
    return out


def run_robustness(
    predict_fn: PredictFn,
    records: Sequence[ImageRecord],
    corruptions: Sequence[Corruption],
    *,
    threshold: float,
    params: PrepParams | None = None,
    seed: int = 0,
    batch_size: int = 16,
    images: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Predict on clean and corrupted images; report metrics and their deltas.

    Images are streamed: each condition decodes (or looks up), corrupts, prepares and predicts
    ``batch_size`` images at a time, so memory is bounded by the batch, not by the split.

    Parameters
    ----------
    predict_fn : callable
        Maps a list of :class:`~spine_node.imaging.PreparedImage` to one
        :class:`ImagePrediction` each (boxes in source pixels).
    records : sequence of ImageRecord
        Labelled images.
    corruptions : sequence of Corruption
        Conditions to test (see :func:`corruption_grid`).
    threshold : float
        Triage threshold for sensitivity / specificity / F1: the bundle's (no default).
    params : PrepParams, optional
        Preparation parameters.
    seed : int
        Noise seed; image ``i`` uses ``seed + i`` (same seed, same report).
    batch_size : int
        Images per ``predict_fn`` call (and held in memory at once).
    images : Mapping[str, numpy.ndarray], optional
        Source images by image id, looked up lazily (default: decode each record's file).

    Returns
    -------
    dict
        ``{"n_images", "threshold", "seed", "clean": metrics, "corruptions":
        {"name@severity": {"corruption", "severity", "metrics", "delta"}}}`` where metrics
        holds auroc, sensitivity, specificity, f1, map50, map50_95 (None where undefined),
        the mean score and the number of images not processed.
    """
    if not callable(predict_fn):
        raise TypeError(f"predict_fn must be callable, got {type(predict_fn).__name__}")
    if not records:
        raise ValueError("records must not be empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    for c in corruptions:
        if not isinstance(c, Corruption):
            raise TypeError(f"corruptions must hold Corruption, got {type(c).__name__}")
    prep = params or PrepParams()

    def sources() -> Iterator[np.ndarray]:
        for r in records:
            yield images[r.image_id] if images is not None else load_source_pixels(r, prep)

    clean_preds = _predict(predict_fn, sources(), prep, batch_size)
    clean = _condition_metrics(records, clean_preds, threshold)
    results: dict[str, Any] = {}
    for c in corruptions:
        corrupted = (c.apply(img, seed + i) for i, img in enumerate(sources()))
        preds = _predict(predict_fn, corrupted, prep, batch_size)
        metrics = _condition_metrics(records, preds, threshold)
        results[c.key] = {
            "corruption": c.name,
            "severity": c.severity,
            "metrics": metrics,
            "delta": _deltas(clean, metrics),
        }
        logger.info("robustness %s: %s", c.key, results[c.key]["delta"])
    return {
        "n_images": len(records),
        "threshold": threshold,
        "seed": seed,
        "clean": clean,
        "corruptions": results,
    }


# --------------------------------------------------------------------------------------------
# CLI pieces (mounted by training/cli.py as ``spine-train robustness``)
# --------------------------------------------------------------------------------------------


def load_predictor(spec: str, bundle: Path | None) -> PredictFn:
    """Build a predictor from ``"module:factory"``; ``factory(bundle)`` returns predict_fn."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"predictor must look like 'package.module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    predict_fn = factory(bundle)
    if not callable(predict_fn):
        raise TypeError(f"{spec} did not return a callable")
    return predict_fn  # type: ignore[no-any-return]


def cascade_predictor(bundle: Path | None) -> PredictFn:
    """Predictor backed by a model bundle's :class:`spine_node.pipeline.Cascade`.

    Each (corrupted) prepared image's source pixels are stored as a native 16-bit
    MONOCHROME2 data set, which the cascade analyses as it would a received image.
    """
    if bundle is None:
        raise ValueError("the cascade predictor needs --bundle")
    from spine_node.pipeline import Cascade

    cascade = Cascade.load(Path(bundle))

    def predict(batch: Sequence[PreparedImage]) -> list[ImagePrediction]:
        datasets = [
            pixels_to_dataset(p.source.pixels, f"robustness.{i}") for i, p in enumerate(batch)
        ]
        out = []
        for result in cascade.analyze(datasets):
            out.append(ImagePrediction(score=result.score, findings=tuple(result.findings)))
        return out

    return predict


def pixels_to_dataset(pixels: np.ndarray, sop_instance_uid: str) -> Any:
    """Wrap a [0, 1] display image as an uncompressed 16-bit MONOCHROME2 data set."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    stored = np.clip(np.rint(np.asarray(pixels, np.float64) * 65535.0), 0, 65535).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = sop_instance_uid
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = 32767.5
    ds.WindowWidth = 65536
    ds.PixelData = stored.tobytes()
    return ds


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``robustness`` subcommand's arguments to ``parser``."""
    parser.add_argument("--data", required=True, type=Path, help="VinDr-layout data set root")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--bundle", type=Path, help="model bundle directory")
    parser.add_argument(
        "--predictor",
        default="training.robustness:cascade_predictor",
        help="'module:factory' returning predict_fn(prepared images) (default: the bundle's "
        "cascade)",
    )
    parser.add_argument(
        "--corruptions",
        type=_csv_list,
        default=list(CORRUPTIONS),
        help=f"comma-separated, from {', '.join(CORRUPTIONS)} (default all)",
    )
    parser.add_argument(
        "--severities",
        type=lambda t: [int(x) for x in _csv_list(t)],
        default=[1, 3, 5],
        help="comma-separated severities 1-5 (default 1,3,5)",
    )
    parser.add_argument("--limit", type=int, help="use the first N images only")
    parser.add_argument(
        "--threshold",
        type=float,
        help="triage threshold (default: the bundle's; required without --bundle)",
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="images held and predicted at once (default 16)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here (default: stdout)")


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train robustness``; returns the exit status."""
    try:
        grid = corruption_grid(args.corruptions, args.severities)
    except ValueError as exc:
        print(f"robustness: {exc}", file=sys.stderr)
        return 2
    threshold = args.threshold
    params = None
    if args.bundle is not None:
        from spine_node.models.bundle import load_manifest

        manifest = load_manifest(Path(args.bundle))
        params = PrepParams(**dict(manifest.prep))
        if threshold is None:
            threshold = manifest.threshold
    if threshold is None:
        print("robustness: give --bundle (its threshold is used) or --threshold", file=sys.stderr)
        return 2
    records = load_records(args.data, args.split)
    if args.limit is not None:
        records = records[: args.limit]
    predict_fn = load_predictor(args.predictor, args.bundle)
    report = run_robustness(
        predict_fn,
        records,
        grid,
        threshold=float(threshold),
        params=params,
        seed=args.seed,
        batch_size=args.batch,
    )
    text = json.dumps(report, indent=2, default=_json_default)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "Corruption",
    "ImagePrediction",
    "add_arguments",
    "cascade_predictor",
    "contrast",
    "corruption_grid",
    "exposure",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "load_predictor",
    "load_source_pixels",
    "pixels_to_dataset",
    "run",
    "run_robustness",
]

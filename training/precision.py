"""``spine-train check-precision``: agreement of a reduced precision with fp32 on a held-out split.

The node runs a bundle in bf16 (or fp16 on CUDA) only when its manifest records a passing check
(:class:`spine_node.models.bundle.PrecisionCheck`) for that precision, backend and device kind.
This module makes those checks. On every image of the split (the demo build uses its held-out
phantom test split), each backend runs the bundle's triage ensemble (members x TTA views,
weighted vote) and its detector at fp32 and at the reduced precision, with the node's own code
(:func:`spine_node.pipeline.build_backend`); the check passes when:

* every image gets the same triage call (score >= the bundle's threshold) as at fp32;
* every member's TTA-averaged probability is within 0.02 of fp32's;
* the detector's mAP@0.5 (COCO 101-point, boxes mapped back to source pixels, confidence
  0.001 as for evaluation) is within 0.01 of fp32's (a split without ground-truth boxes cannot
  show it: the check fails).

The demo build calls :func:`check_bundle_precision` after the bundle is built; on an existing
bundle::

    spine-train check-precision --bundle spine_node/demo_bundle --data PHANTOM_ROOT

rewrites ``manifest.json`` with the checks (the model files, and so their hashes, are untouched).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from spine_node.imaging import PreparedImage, PrepParams
from spine_node.models.bundle import (
    PRECISION_TOLERANCES,
    Manifest,
    PrecisionCheck,
    load_manifest,
    write_manifest,
)
from spine_node.models.detector import Detector
from spine_node.models.runtime import (
    Backend,
    Precision,
    RuntimeChoice,
    cpu_flags,
    has_native_bf16,
    installed_backends,
)
from spine_node.models.triage import TriageEnsemble
from training.evaluate import Detection, GroundTruthBox, coco_average_precision
from training.vindr import ImageRecord, load_records, prepare_record

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluatedRun",
    "add_arguments",
    "check_bundle_precision",
    "check_precision",
    "default_backends",
    "evaluate_run",
    "run",
]

#: Confidence threshold of the mAP evaluation (as ultralytics val and COCO evaluations use).
EVAL_CONF = 0.001


@dataclass(frozen=True)
class EvaluatedRun:
    """The bundle's outputs on the split at one backend and precision.

    Attributes
    ----------
    calls : numpy.ndarray
        ``(N,)`` bool, score >= threshold.
    scores : numpy.ndarray
        ``(N,)`` ensemble probabilities.
    member_probs : numpy.ndarray
        ``(N, M)`` TTA-averaged member probabilities (manifest order).
    map50 : float or None
        Detector mAP@0.5 (None when the split has no ground-truth box).
    """

    calls: np.ndarray
    scores: np.ndarray
    member_probs: np.ndarray
    map50: float | None


def default_backends(manifest: Manifest, device: str = "cpu") -> tuple[Backend, ...]:
    """The backends a reduced precision is checked on: PyTorch, and OpenVINO on the CPU when
    installed and the bundle has ONNX exports (ONNX Runtime runs fp32 only)."""
    out = [Backend.TORCH]
    has_onnx = all(m.onnx for m in manifest.members) and bool(manifest.detector.onnx)
    if device == "cpu" and has_onnx and Backend.OPENVINO in installed_backends():
        out.append(Backend.OPENVINO)
    return tuple(out)


def _ground_truth(records: Sequence[ImageRecord]) -> list[GroundTruthBox]:
    return [GroundTruthBox(r.image_id, b.label, *b.xyxy) for r in records for b in r.boxes]


def evaluate_run(
    runtime: RuntimeChoice,
    bundle_dir: Path,
    manifest: Manifest,
    records: Sequence[ImageRecord],
    images: Sequence[PreparedImage],
    *,
    batch: int = 8,
) -> EvaluatedRun:
    """Run the bundle's triage and detector on prepared images at one backend and precision.

    Parameters
    ----------
    runtime : RuntimeChoice
        Backend, precision and device (used as given: this is the check, not the node).
    bundle_dir : pathlib.Path
        The bundle.
    manifest : Manifest
        Its manifest.
    records : sequence of training.vindr.ImageRecord
        The images' annotations (image ids and ground-truth boxes), same order as ``images``.
    images : sequence of PreparedImage
        Prepared with the bundle's prep parameters.
    batch : int
        Images per forward pass.

    Returns
    -------
    EvaluatedRun
    """
    from spine_node.pipeline import build_backend

    runner, net = build_backend(runtime, bundle_dir, manifest)
    ensemble = TriageEnsemble(
        runner, manifest.ensemble_weights, manifest.tta_views, max_batch=batch * manifest.tta_views
    )
    triage = ensemble(np.stack([img.triage for img in images]).astype(np.float32))
    detector = Detector(net, replace(manifest.detector, conf=EVAL_CONF), max_batch=batch)
    names = manifest.detector.class_names
    detections: list[Detection] = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        found = detector(np.stack([img.detect for img in chunk]))
        for record, img, det in zip(records[start : start + batch], chunk, found, strict=True):
            boxes = img.letterbox.to_source(det.boxes)
            for box, score, cls in zip(boxes, det.scores, det.classes, strict=True):
                x0, y0, x1, y1 = (float(v) for v in box)
                if x1 > x0 and y1 > y0:
                    detections.append(
                        Detection(record.image_id, names[int(cls)], float(score), x0, y0, x1, y1)
                    )
    gt = _ground_truth(records)
    map50 = None
    if gt:
        metrics = coco_average_precision(
            [r.image_id for r in records],
            gt,
            detections,
            labels=names,
            iou_thresholds=[0.5],
        )
        map50 = metrics.map50
    member_probs = np.stack([triage.member_probs[m.name] for m in manifest.members], axis=1)
    return EvaluatedRun(
        calls=triage.scores >= manifest.threshold,
        scores=triage.scores,
        member_probs=member_probs,
        map50=map50,
    )


def check_precision(
    bundle_dir: Path,
    records: Sequence[ImageRecord],
    *,
    precision: Precision = Precision.BF16,
    backends: Sequence[Backend] | None = None,
    device: str = "cpu",
    data: str = "",
) -> list[PrecisionCheck]:
    """Compare ``precision`` with fp32 on each backend; return one check per backend.

    Parameters
    ----------
    bundle_dir : pathlib.Path
        The bundle.
    records : sequence of training.vindr.ImageRecord
        The held-out images with their annotations.
    precision : Precision
        bf16 (CPU or CUDA) or fp16 (CUDA).
    backends : sequence of Backend, optional
        Default :func:`default_backends`.
    device : str
        ``"cpu"`` or ``"cuda[:N]"``.
    data : str
        A description of the split, recorded with the check.

    Returns
    -------
    list of PrecisionCheck
    """
    precision = Precision(precision)
    if precision is Precision.FP32:
        raise ValueError("precision must be a reduced precision (bf16 or fp16), got 'fp32'")
    if not records:
        raise ValueError("records must not be empty: nothing to compare on")
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    params = PrepParams(**dict(manifest.prep))
    images = [prepare_record(r, params) for r in records]
    kind = device.split(":", 1)[0]
    checks = []
    for backend in backends or default_backends(manifest, kind):
        t0 = time.monotonic()
        ref = evaluate_run(RuntimeChoice(backend, Precision.FP32, device), bundle_dir, manifest,
                           records, images)  # fmt: skip
        low = evaluate_run(RuntimeChoice(backend, precision, device), bundle_dir, manifest,
                           records, images)  # fmt: skip
        changed = int(np.sum(ref.calls != low.calls))
        diff = float(np.max(np.abs(ref.member_probs - low.member_probs)))
        tol = PRECISION_TOLERANCES
        if ref.map50 is None or low.map50 is None:
            map_ok = False  # no ground-truth box: the detector's agreement is not shown
        else:
            map_ok = abs(low.map50 - ref.map50) <= tol["map50"]
        check = PrecisionCheck(
            precision=precision.value,
            backend=backend.value,
            device=kind,
            passed=changed == 0 and diff <= tol["member_probability"] and map_ok,
            n_images=len(records),
            triage_calls_changed=changed,
            max_member_probability_diff=round(diff, 6),
            map50_fp32=None if ref.map50 is None else round(ref.map50, 6),
            map50=None if low.map50 is None else round(low.map50, 6),
            tolerances=dict(tol),
            data=data,
            checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        logger.info(
            "precision check %s: %s (%.0f s)",
            "passed" if check.passed else "FAILED",
            check.summary(),
            time.monotonic() - t0,
        )
        checks.append(check)
    return checks


def record_checks(bundle_dir: Path, checks: Sequence[PrecisionCheck]) -> Manifest:
    """Write ``checks`` into the bundle's manifest, replacing earlier ones with the same key."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    keys = {(c.precision, c.backend, c.device) for c in checks}
    kept = [c for c in manifest.precision_checks if (c.precision, c.backend, c.device) not in keys]
    manifest = replace(manifest, precision_checks=(*kept, *checks))
    write_manifest(bundle_dir, manifest)
    return manifest


def check_bundle_precision(
    bundle_dir: Path,
    data_root: Path,
    *,
    split: str = "test",
    precision: Precision = Precision.BF16,
    backends: Sequence[Backend] | None = None,
    device: str = "cpu",
) -> list[PrecisionCheck]:
    """Check a built bundle on a VinDr-layout split and record the checks in its manifest.

    Parameters
    ----------
    bundle_dir : pathlib.Path
        The bundle (its manifest is rewritten).
    data_root : pathlib.Path
        VinDr-SpineXR layout root (the demo build's phantom).
    split : str
        ``"test"`` (held out) by default.
    precision, backends, device
        As for :func:`check_precision`.

    Returns
    -------
    list of PrecisionCheck
    """
    records = load_records(data_root, split)
    checks = check_precision(
        bundle_dir,
        records,
        precision=precision,
        backends=backends,
        device=device,
        data=f"{Path(data_root).name} {split} split, {len(records)} images",
    )
    record_checks(bundle_dir, checks)
    return checks


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train check-precision`` arguments."""
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    parser.add_argument(
        "--data", type=Path, required=True, help="VinDr-layout root (e.g. the demo's phantom)"
    )
    parser.add_argument("--split", default="test", help="split to compare on (default test)")
    parser.add_argument(
        "--precision", choices=("bf16", "fp16"), default="bf16", help="default bf16"
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=[b.value for b in Backend],
        default=None,
        help="backend to check (repeatable; default torch, and openvino on the CPU)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train check-precision``; exit 1 when a check failed."""
    if args.device == "cpu" and args.precision == "bf16" and not has_native_bf16(cpu_flags()):
        logger.warning("this CPU has no native bf16: the check runs, but slowly")
    checks = check_bundle_precision(
        args.bundle,
        args.data,
        split=args.split,
        precision=Precision(args.precision),
        backends=None if not args.backend else [Backend(b) for b in args.backend],
        device=args.device,
    )
    for check in checks:
        print(("passed: " if check.passed else "FAILED: ") + check.summary())
    return 0 if all(c.passed for c in checks) else 1

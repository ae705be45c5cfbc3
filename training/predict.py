"""``spine-train predict``: run a bundle's own cascade over a VinDr-format split.

The node's cascade (:class:`spine_node.pipeline.Cascade`: tag gate, preparation, TTA, weighted
ensemble, content gate, threshold, gated detector at the bundle's confidence) runs over every
image of ``ROOT/annotations/<split>.csv`` as the node would run it on a received image, in
batches (bounded memory). It writes, in ``--out``:

* ``scores.csv``: ``image_id,study_id,score,status,reason,threshold,score_<member>...``;
  ``status`` is ``positive``, ``negative`` or ``not_processed`` (the node refused the image:
  the score is empty and ``spine-train evaluate`` counts it as a negative call with score 0);
* ``detections.csv``: ``image_id,lesion_type,score,xmin,ymin,xmax,ymax,grade``: the findings the
  node reports (source-image pixels), i.e. only on images it calls abnormal (hard gate);
* ``predict.json``: provenance (:class:`PredictionRun`): bundle and its hash, split and its
  hash, counts.

``spine-train evaluate --run OUT`` then scores them at the bundle's threshold. A test split
already evaluated with another bundle is refused here too (see :mod:`training.model_card`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spine_node.results.types import CascadeResult, Status
from training import model_card
from training.vindr import ImageRecord, load_records

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTIONS_NAME",
    "PREDICT_NAME",
    "SCORES_NAME",
    "PredictionRun",
    "add_arguments",
    "predict_split",
    "run",
]

SCORES_NAME = "scores.csv"
DETECTIONS_NAME = "detections.csv"
PREDICT_NAME = "predict.json"


@dataclass(frozen=True)
class PredictionRun:
    """Provenance of one ``spine-train predict`` run (``predict.json``)."""

    bundle: Path
    bundle_hash: str
    bundle_version: str
    data: Path
    split: str
    annotations: Path
    split_hash: str
    n_images: int
    n_positive: int
    n_negative: int
    n_not_processed: int
    threshold: float
    tta_views: int
    detector_conf: float
    backend: str
    device: str
    seconds: float
    allow_retest: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON object (paths as strings)."""
        out = asdict(self)
        for key in ("bundle", "data", "annotations"):
            out[key] = str(out[key])
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PredictionRun:
        """Inverse of :meth:`to_json`."""
        if not isinstance(doc, dict):
            raise TypeError(f"predict.json must hold an object, got {type(doc).__name__}")
        values = dict(doc)
        for key in ("bundle", "data", "annotations"):
            values[key] = Path(values[key])
        return cls(**values)

    @classmethod
    def read(cls, out_dir: Path) -> PredictionRun:
        """Read ``predict.json`` of an output directory."""
        path = Path(out_dir) / PREDICT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a spine-train predict output (no {PREDICT_NAME})")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def _batches(records: Sequence[ImageRecord], size: int) -> Iterator[Sequence[ImageRecord]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


def _analyze(cascade: Any, batch: Sequence[ImageRecord]) -> list[CascadeResult]:
    """The cascade on a batch of files; a file that cannot be read is not processed."""
    from spine_node.imaging import ImageError, read_dataset

    datasets = []
    unreadable: dict[int, str] = {}
    for i, record in enumerate(batch):
        try:
            datasets.append(read_dataset(record.path, max_pixels=cascade.prep.max_pixels))
        except (ImageError, OSError) as exc:
            unreadable[i] = f"image could not be read: {exc}"
    results = iter(cascade.analyze(datasets))
    out = []
    for i in range(len(batch)):
        if i in unreadable:
            out.append(
                CascadeResult(
                    sop_instance_uid="",
                    status=Status.NOT_PROCESSED,
                    reason=unreadable[i],
                    threshold=cascade.manifest.threshold,
                )
            )
        else:
            out.append(next(results))
    return out


def predict_split(
    bundle_dir: Path,
    data_root: Path,
    split: str,
    out_dir: Path,
    *,
    device: str = "cpu",
    backend: str = "torch",
    batch_size: int = 8,
    allow_retest: str | None = None,
) -> PredictionRun:
    """Run the bundle's cascade over one split and write the CSVs ``evaluate`` reads.

    Parameters
    ----------
    bundle_dir : pathlib.Path
        Model bundle.
    data_root : pathlib.Path
        VinDr-layout data root (the phantom writes the same layout).
    split : str
        ``"train"`` or ``"test"``.
    out_dir : pathlib.Path
        Output directory (created).
    device, backend : str
        As for :meth:`spine_node.pipeline.Cascade.load`.
    batch_size : int
        Images decoded and analysed at once (memory is bounded by it).
    allow_retest : str, optional
        Reason to predict on a test split already evaluated with another bundle.

    Returns
    -------
    PredictionRun

    Raises
    ------
    training.model_card.RetestRefusedError
        For a test split already evaluated with another bundle and no reason.
    """
    from spine_node.pipeline import Cascade

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    bundle_dir, data_root, out_dir = Path(bundle_dir), Path(data_root), Path(out_dir)
    annotations = data_root / "annotations" / f"{split}.csv"
    split_digest = model_card.split_hash(annotations)
    bundle_digest = model_card.bundle_hash(bundle_dir)
    if split == "test":
        allow_retest = model_card.check_retest(
            bundle_dir, split_digest, bundle_digest, allow_retest
        )
    records = load_records(data_root, split)
    if not records:
        raise ValueError(f"{annotations} lists no image")
    cascade = Cascade.load(bundle_dir, device=device, backend=backend)
    manifest = cascade.manifest
    members = [m.name for m in manifest.members]
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {s: 0 for s in Status}
    t0 = time.monotonic()
    with (
        open(out_dir / SCORES_NAME, "w", newline="", encoding="utf-8") as fs,
        open(out_dir / DETECTIONS_NAME, "w", newline="", encoding="utf-8") as fd,
    ):
        scores = csv.writer(fs)
        scores.writerow(
            ["image_id", "study_id", "score", "status", "reason", "threshold"]
            + [f"score_{m}" for m in members]
        )
        dets = csv.writer(fd)
        dets.writerow(["image_id", "lesion_type", "score", "xmin", "ymin", "xmax", "ymax", "grade"])
        done = 0
        for batch in _batches(records, batch_size):
            for record, result in zip(batch, _analyze(cascade, batch), strict=True):
                counts[result.status] += 1
                scores.writerow(
                    [
                        record.image_id,
                        record.study_id,
                        "" if result.score is None else repr(float(result.score)),
                        result.status.value,
                        result.reason or "",
                        repr(float(manifest.threshold)),
                    ]
                    + [
                        repr(float(result.member_scores[m])) if m in result.member_scores else ""
                        for m in members
                    ]
                )
                for f in result.findings:
                    dets.writerow(
                        [record.image_id, f.label, repr(f.score), *map(repr, f.box), f.grade or ""]
                    )
            done += len(batch)
            logger.info("predict: %d / %d images", done, len(records))
    prediction = PredictionRun(
        bundle=bundle_dir,
        bundle_hash=bundle_digest,
        bundle_version=manifest.version,
        data=data_root,
        split=split,
        annotations=annotations,
        split_hash=split_digest,
        n_images=len(records),
        n_positive=counts[Status.POSITIVE],
        n_negative=counts[Status.NEGATIVE],
        n_not_processed=counts[Status.NOT_PROCESSED],
        threshold=float(manifest.threshold),
        tta_views=manifest.tta_views,
        detector_conf=float(manifest.detector.conf),
        backend=backend,
        device=device,
        seconds=round(time.monotonic() - t0, 1),
        allow_retest=allow_retest,
    )
    (out_dir / PREDICT_NAME).write_text(
        json.dumps(prediction.to_json(), indent=2) + "\n", encoding="utf-8"
    )
    return prediction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train predict`` arguments."""
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--data", type=Path, required=True, help="VinDr-layout data root")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument(
        "--allow-retest",
        metavar="REASON",
        help="predict on a test split already evaluated with another bundle (recorded)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train predict``; returns the exit status (2: refused re-test)."""
    try:
        prediction = predict_split(
            args.bundle,
            args.data,
            args.split,
            args.out,
            device=args.device,
            backend=args.backend,
            batch_size=args.batch,
            allow_retest=args.allow_retest,
        )
    except model_card.RetestRefusedError as exc:
        print(f"spine-train predict: refused: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(prediction.to_json(), indent=2))
    return 0

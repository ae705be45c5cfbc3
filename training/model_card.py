"""A bundle's model card and its ledger of test-split evaluations ("touched once", in code).

Every evaluation of a test split is recorded in the bundle directory:

* ``evaluations.json``: the machine-readable ledger, one :class:`EvaluationRecord` each
  (UTC time, split name, split hash, bundle hash, figures, the command, the reason);
* ``MODEL_CARD.md``: the bundle's model card, rendered from the manifest and that ledger.

The **split hash** is SHA-256 over the split's sorted image ids and the bytes of its annotation
(label) file; the **bundle hash** is SHA-256 over the canonical manifest without its
``metrics`` (the manifest names every file with its own SHA-256, so any changed weight, threshold
or setting changes it; recording figures does not).

Rule (:func:`check_retest`): a split already evaluated with another bundle hash is refused
unless an explicit reason is given (``--allow-retest REASON``); the reason is recorded and
listed in the model card. Evaluating the same bundle on the same split again is allowed (the
model is unchanged, nothing can have been tuned) and recorded too. A rebuilt bundle written to
the same directory keeps the ledger (:func:`training.export.build_bundle` carries it over).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVALUATIONS_NAME = "evaluations.json"
MODEL_CARD_NAME = "MODEL_CARD.md"
LEDGER_FORMAT = 1

__all__ = [
    "EVALUATIONS_NAME",
    "MODEL_CARD_NAME",
    "EvaluationRecord",
    "RetestRefusedError",
    "bundle_hash",
    "check_retest",
    "read_evaluations",
    "record_evaluation",
    "split_hash",
    "write_evaluations",
    "write_model_card",
]


class RetestRefusedError(ValueError):
    """A test split already evaluated with another bundle, and no reason was given."""


def split_hash(annotations: str | os.PathLike[str]) -> str:
    """SHA-256 of a split: its sorted image ids and the bytes of its annotation CSV.

    Parameters
    ----------
    annotations : path
        The split's VinDr annotation CSV (``annotations/test.csv``).

    Returns
    -------
    str
        Hex digest.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the CSV has no ``image_id`` column.
    """
    path = Path(annotations)
    data = path.read_bytes()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "image_id" not in (reader.fieldnames or ()):
            raise ValueError(f"{path} has no image_id column")
        ids = sorted({(row["image_id"] or "").strip() for row in reader})
    h = hashlib.sha256()
    h.update(b"spine-node split v1\nimage ids:\n")
    h.update("\n".join(ids).encode())
    h.update(b"\nlabels:\n")
    h.update(data)
    return h.hexdigest()


def bundle_hash(bundle_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of a bundle: its canonical manifest without ``metrics``.

    The manifest holds every file's SHA-256 and every serving setting, so this changes with
    any weight, threshold, TTA, detector or gate setting, but not when figures (``metrics``) or
    precision agreement checks (``precision_checks``) are recorded.
    """
    from spine_node.models.bundle import MANIFEST_NAME, manifest_from_json

    raw = json.loads((Path(bundle_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{bundle_dir}/{MANIFEST_NAME} is not a JSON object")
    doc = manifest_from_json(raw).to_json()  # defaults filled in: a rewrite keeps the hash
    doc.pop("metrics", None)
    # bf16/fp16 agreement checks are recorded figures too (spine-train check-precision): the
    # model is the same, and hashes made before the key existed stay valid
    doc.pop("precision_checks", None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class EvaluationRecord:
    """One evaluation of a test split, as the ledger keeps it.

    Attributes
    ----------
    when : str
        UTC time, ISO 8601.
    split : str
        Split name (``"test"``).
    split_hash, bundle_hash : str
        See :func:`split_hash` and :func:`bundle_hash`.
    bundle_version : str
        The manifest's version.
    n_images : int
        Images evaluated.
    command : str
        How it was run (the command line).
    reason : str or None
        Why a split already evaluated with another bundle was evaluated again (None for a
        first evaluation; ``"same bundle"`` for a repeat with an unchanged bundle).
    figures : Mapping[str, Any]
        The headline figures (AUROC, sensitivity, specificity, F1, mAP, their CIs, threshold,
        images not processed).
    data : str
        Where the split came from (data root or annotation file).
    """

    when: str
    split: str
    split_hash: str
    bundle_hash: str
    bundle_version: str
    n_images: int
    command: str
    reason: str | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)
    data: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON object of this record."""
        out = asdict(self)
        out["figures"] = dict(self.figures)
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EvaluationRecord:
        """Inverse of :meth:`to_json`."""
        if not isinstance(doc, Mapping):
            raise TypeError(f"an evaluation record must be a JSON object, got {type(doc).__name__}")
        try:
            return cls(
                when=str(doc["when"]),
                split=str(doc["split"]),
                split_hash=str(doc["split_hash"]),
                bundle_hash=str(doc["bundle_hash"]),
                bundle_version=str(doc["bundle_version"]),
                n_images=int(doc["n_images"]),
                command=str(doc["command"]),
                reason=None if doc.get("reason") is None else str(doc["reason"]),
                figures=dict(doc.get("figures") or {}),
                data=str(doc.get("data", "")),
            )
        except KeyError as exc:
            raise ValueError(f"evaluation record lacks the key {exc.args[0]!r}") from exc


def read_evaluations(bundle_dir: str | os.PathLike[str]) -> list[EvaluationRecord]:
    """The bundle's ledger (empty when it has none)."""
    path = Path(bundle_dir) / EVALUATIONS_NAME
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("evaluations"), list):
        raise ValueError(f"{path}: expected {{'format': 1, 'evaluations': [...]}}")
    return [EvaluationRecord.from_json(e) for e in doc["evaluations"]]


def write_evaluations(
    bundle_dir: str | os.PathLike[str], records: Sequence[EvaluationRecord]
) -> Path:
    """Write the ledger (atomically: a temporary file renamed over it)."""
    path = Path(bundle_dir) / EVALUATIONS_NAME
    tmp = path.with_suffix(".json.tmp")
    doc = {"format": LEDGER_FORMAT, "evaluations": [r.to_json() for r in records]}
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def check_retest(
    bundle_dir: str | os.PathLike[str],
    split_digest: str,
    bundle_digest: str,
    allow_retest: str | None = None,
) -> str | None:
    """Apply the touched-once rule before a test split is evaluated.

    Parameters
    ----------
    bundle_dir : path
        Bundle directory (its ledger).
    split_digest, bundle_digest : str
        Hashes of the split and of the bundle about to be evaluated.
    allow_retest : str, optional
        The reason for evaluating a split again with a changed bundle.

    Returns
    -------
    str or None
        The reason to record: None for a first evaluation, ``"same bundle"`` for a repeat
        with an unchanged bundle, else ``allow_retest``.

    Raises
    ------
    RetestRefusedError
        The split was evaluated with another bundle and no reason was given.
    """
    if allow_retest is not None and not allow_retest.strip():
        raise ValueError("allow_retest must be a non-empty reason")
    earlier = [e for e in read_evaluations(bundle_dir) if e.split_hash == split_digest]
    if not earlier:
        return allow_retest
    changed = [e for e in earlier if e.bundle_hash != bundle_digest]
    if not changed:
        return allow_retest or "same bundle"
    if allow_retest is None:
        first = changed[0]
        raise RetestRefusedError(
            f"this test split (hash {split_digest[:12]}) was already evaluated on {first.when} "
            f"with bundle {first.bundle_version} (hash {first.bundle_hash[:12]}); the bundle "
            f"has changed since (hash {bundle_digest[:12]}). A test split is touched once: "
            "evaluate a fresh split, or give --allow-retest REASON (recorded in the model card)"
        )
    return allow_retest


def record_evaluation(
    bundle_dir: str | os.PathLike[str], record: EvaluationRecord
) -> EvaluationRecord:
    """Append ``record`` to the ledger and re-render the model card.

    The touched-once rule is checked again here (with ``record.reason`` as the reason).

    Raises
    ------
    RetestRefusedError
        As :func:`check_retest`.
    """
    if not isinstance(record, EvaluationRecord):
        raise TypeError(f"record must be an EvaluationRecord, got {type(record).__name__}")
    reason = check_retest(
        bundle_dir,
        record.split_hash,
        record.bundle_hash,
        None if record.reason == "same bundle" else record.reason,
    )
    if reason != record.reason:
        from dataclasses import replace

        record = replace(record, reason=reason)
    records = [*read_evaluations(bundle_dir), record]
    write_evaluations(bundle_dir, records)
    write_model_card(bundle_dir)
    logger.info(
        "evaluation of split %s (hash %s) recorded in %s",
        record.split,
        record.split_hash[:12],
        Path(bundle_dir) / MODEL_CARD_NAME,
    )
    return record


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fmt(value: Any, ci: Any = None) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    text = f"{value:.3f}"
    if (
        isinstance(ci, list | tuple)
        and len(ci) == 2
        and all(isinstance(v, int | float) for v in ci)
    ):
        text += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return text


def write_model_card(bundle_dir: str | os.PathLike[str]) -> Path:
    """Render ``MODEL_CARD.md`` from the manifest and the ledger.

    Returns
    -------
    pathlib.Path
        The card's path.
    """
    from spine_node.models.bundle import MANIFEST_NAME

    bundle_dir = Path(bundle_dir)
    doc = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    triage = doc.get("triage", {})
    det = doc.get("detector", {})
    gate = doc.get("gate") or {}
    metrics = doc.get("metrics", {}) or {}
    fit = metrics.get("ensemble_fit", {}) or {}
    fitted_on = fit.get("fitted_on", {}) or {}
    members = [m.get("name") for m in triage.get("members", [])]
    lines = [
        f"# Model card: {doc.get('name')} {doc.get('version')}",
        "",
        f"- Intended use: {doc.get('intended_use')}"
        + (" (DEMO bundle)" if doc.get("demo") else ""),
        f"- Bundle hash (manifest without metrics): `{bundle_hash(bundle_dir)}`",
        f"- Triage: members {members}, ensemble weights {triage.get('ensemble_weights')}, "
        f"threshold {triage.get('threshold')}, TTA views {triage.get('tta_views')}",
        f"- Weights and threshold fitted on: {fitted_on.get('description', 'not recorded')}",
        f"- Detector: confidence {det.get('conf')}, NMS IoU {det.get('iou')}, gate "
        f"{det.get('gate')}, image size {det.get('imgsz')}",
        f"- Content gate threshold: {gate.get('threshold', 'none')}",
        "",
        "## Evaluations of held-out test splits",
        "",
        "Each evaluation of a test split is recorded here and in `evaluations.json` (split hash",
        "over its image ids and annotation file, bundle hash over the manifest without metrics).",
        "A second evaluation of the same split by a changed bundle is refused unless",
        "`--allow-retest REASON` is given; the reason is listed. Figures are the node's own gated",
        "output (`spine-train predict`): images the node did not process count as negative calls",
        "with score 0. 95 % intervals: percentile bootstrap over studies.",
        "",
    ]
    records = read_evaluations(bundle_dir)
    if not records:
        lines.append("None yet.")
    else:
        lines += [
            "| # | when (UTC) | split | split hash | bundle | images (not processed) | "
            "threshold | AUROC | sensitivity | specificity | F1 | mAP@0.5 | mAP@0.5:0.95 | "
            "reason | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, r in enumerate(records, start=1):
            f = dict(r.figures)
            lines.append(
                f"| {n} | {r.when} | {r.split} ({r.data}) | `{r.split_hash[:12]}` | "
                f"{r.bundle_version} `{r.bundle_hash[:12]}` | {r.n_images} "
                f"({f.get('n_not_processed', 'n/a')}) | {_fmt(f.get('threshold'))} | "
                f"{_fmt(f.get('auroc'), f.get('auroc_ci95'))} | "
                f"{_fmt(f.get('sensitivity'), f.get('sensitivity_ci95'))} | "
                f"{_fmt(f.get('specificity'), f.get('specificity_ci95'))} | "
                f"{_fmt(f.get('f1'), f.get('f1_ci95'))} | "
                f"{_fmt(f.get('map50'), f.get('map50_ci95'))} | "
                f"{_fmt(f.get('map50_95'), f.get('map50_95_ci95'))} | "
                f"{r.reason or 'first evaluation'} | `{r.command}` |"
            )
    lines.append("")
    path = bundle_dir / MODEL_CARD_NAME
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

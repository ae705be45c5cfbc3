"""Read the radiologists' feedback exported by ``spine-node feedback export --csv FILE``.

Each CSV row is one feedback on one image (columns: ``spine_node.feedback.CSV_COLUMNS``). For
retraining, :func:`reference_labels` keeps each image's last word and turns it into a
reference label: "agree" confirms the AI's verdict (positive -> abnormal, negative -> normal;
agreeing with "not processed" gives no label), "disagree" takes the corrected label (no
label when none was given). :func:`image_records` then makes VinDr-style
:class:`training.vindr.ImageRecord` rows for the images the site can provide (by SOP Instance
UID, e.g. from ``spine-node export --identified``), so they join a training split.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from spine_node.feedback import CSV_COLUMNS, CorrectedLabel, FeedbackEntry, Verdict, csv_value
from training.vindr import ImageRecord


class FeedbackCSVError(ValueError):
    """The file is not a feedback export (message names the file, row and column)."""


def read_feedback_csv(path: str | os.PathLike[str]) -> list[FeedbackEntry]:
    """Every feedback row of an export, in file order, with the values as recorded (the
    quote :func:`spine_node.feedback.csv_cell` puts before formula-like text is taken off).

    Raises
    ------
    FeedbackCSVError
        When a column is missing or a row holds an invalid value (naming the row).
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise FeedbackCSVError(f"{path}: not a spine-node feedback export, "
                                   f"columns missing: {missing}")
        out = []
        for number, row in enumerate(reader, start=2):
            try:
                # cells written with a quote in front (no spreadsheet formulas) lose it here
                values = {k: csv_value(v) if isinstance(v, str) else v for k, v in row.items()}
                out.append(FeedbackEntry.from_json(values))
            except (TypeError, ValueError) as exc:
                raise FeedbackCSVError(f"{path} row {number}: {exc}") from None
    return out


@dataclass(frozen=True)
class ReferenceLabel:
    """An image's reference label from the reader's last feedback.

    Attributes
    ----------
    sop_instance_uid, study_instance_uid : str
        The image and its study.
    abnormal : bool
        The triage class.
    lesion : str or None
        The lesion class given with a corrected "abnormal" (no box: image level only).
    verdict : Verdict
        Whether the reader agreed with the AI.
    """

    sop_instance_uid: str
    study_instance_uid: str
    abnormal: bool
    lesion: str | None
    verdict: Verdict


def reference_labels(entries: Iterable[FeedbackEntry]) -> list[ReferenceLabel]:
    """One reference label per image that has one (the latest feedback decides), in the order
    the images were first given feedback."""
    latest: dict[str, FeedbackEntry] = {}
    for entry in sorted(entries, key=lambda e: (e.recorded_at, e.feedback_id or 0)):
        latest[entry.sop_instance_uid] = entry
    labels = []
    for entry in latest.values():
        if entry.verdict is Verdict.AGREE:
            if entry.model_status not in ("positive", "negative"):
                continue  # agreeing with "not processed" says nothing about the image
            abnormal = entry.model_status == "positive"
        elif entry.corrected_label is None:
            continue  # disagree without a label: the reader did not say what it shows
        else:
            abnormal = entry.corrected_label is CorrectedLabel.ABNORMAL
        labels.append(
            ReferenceLabel(entry.sop_instance_uid, entry.study_instance_uid, abnormal,
                           entry.lesion, entry.verdict)
        )
    return labels


def image_records(
    labels: Iterable[ReferenceLabel], paths: Mapping[str, Path], split: str = "feedback"
) -> list[ImageRecord]:
    """Training records for the labelled images whose file is in ``paths``.

    Parameters
    ----------
    labels : iterable of ReferenceLabel
        From :func:`reference_labels`.
    paths : Mapping[str, pathlib.Path]
        SOP Instance UID -> the image's DICOM file.
    split : str
        The records' split name.

    Returns
    -------
    list of ImageRecord
        Image-level labels only (no boxes); images without a file are left out.
    """
    return [
        ImageRecord(image_id=label.sop_instance_uid, study_id=label.study_instance_uid,
                    split=split, path=paths[label.sop_instance_uid], abnormal=label.abnormal)
        for label in labels
        if label.sop_instance_uid in paths
    ]

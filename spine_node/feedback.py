"""Radiologist feedback on one image's result: agree or disagree, with a corrected label.

Recorded from the web page or ``spine-node feedback record``, kept in the queue database
(table ``feedback``, :class:`spine_node.store.FeedbackLog`) and exported as CSV
(:data:`CSV_COLUMNS`) that ``training/feedback.py`` reads back for retraining.

Text cells of the export cannot run as spreadsheet formulas (OWASP "CSV Injection"): a cell
that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a
single quote in front (:func:`csv_cell`), and :func:`csv_value` takes it off again when the
file is read back, so the values round-trip.
"""

from __future__ import annotations

import csv
import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_node.labels import LESION_LABELS


class Verdict(str, enum.Enum):
    """The reader's opinion of the AI result for one image."""

    AGREE = "agree"
    DISAGREE = "disagree"


class CorrectedLabel(str, enum.Enum):
    """What the image shows according to the reader (the triage classes)."""

    NORMAL = "normal"
    ABNORMAL = "abnormal"


class FeedbackSource(str, enum.Enum):
    """Where the feedback was given."""

    WEB = "web"
    CLI = "cli"


#: Columns of the exported CSV, in order (one row per feedback given; the newest row of an
#: image is the reader's last word).
CSV_COLUMNS: tuple[str, ...] = (
    "feedback_id",
    "recorded_at",
    "study_instance_uid",
    "sop_instance_uid",
    "verdict",
    "corrected_label",
    "lesion",
    "model_status",
    "model_score",
    "reader",
    "comment",
    "source",
)


@dataclass(frozen=True)
class FeedbackEntry:
    """One feedback given on one image.

    Attributes
    ----------
    sop_instance_uid, study_instance_uid : str
        The image (as received) and its study.
    verdict : Verdict
        Agree or disagree with the AI result.
    corrected_label : CorrectedLabel or None
        What the image shows, given with a disagreement (None with agreement: the AI's own
        verdict stands).
    lesion : str or None
        A VinDr lesion class (``LESION_LABELS``), only with ``corrected_label`` abnormal.
    model_status : str or None
        The AI result the reader saw: ``positive``, ``negative`` or ``not_processed``.
    model_score : float or None
        Its score.
    reader : str
        Who gave it (initials or user name; may be empty).
    comment : str
        Free text (may be empty).
    source : FeedbackSource
        Web page or command line.
    recorded_at : float
        Epoch seconds.
    feedback_id : int or None
        Database id (None before it is recorded).

    Raises
    ------
    TypeError
        When ``verdict``, ``corrected_label`` or ``source`` is not its enum.
    ValueError
        A corrected label with agreement, a lesion without an abnormal label, an unknown
        lesion class, an empty UID.
    """

    sop_instance_uid: str
    study_instance_uid: str
    verdict: Verdict
    corrected_label: CorrectedLabel | None = None
    lesion: str | None = None
    model_status: str | None = None
    model_score: float | None = None
    reader: str = ""
    comment: str = ""
    source: FeedbackSource = FeedbackSource.CLI
    recorded_at: float = 0.0
    feedback_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, Verdict):
            raise TypeError(f"verdict must be a Verdict, got {self.verdict!r}")
        if self.corrected_label is not None and not isinstance(
            self.corrected_label, CorrectedLabel
        ):
            raise TypeError(f"corrected_label must be a CorrectedLabel, got "
                            f"{self.corrected_label!r}")
        if not isinstance(self.source, FeedbackSource):
            raise TypeError(f"source must be a FeedbackSource, got {self.source!r}")
        if not self.sop_instance_uid or not self.study_instance_uid:
            raise ValueError("feedback needs the image's SOP Instance UID and its study's UID")
        if self.verdict is Verdict.AGREE and self.corrected_label is not None:
            raise ValueError("a corrected label goes with disagree, not agree")
        if self.lesion is not None:
            if self.lesion not in LESION_LABELS:
                raise ValueError(f"lesion must be one of {LESION_LABELS}, got {self.lesion!r}")
            if self.corrected_label is not CorrectedLabel.ABNORMAL:
                raise ValueError("a lesion class goes with the corrected label abnormal")
        if self.model_score is not None and not math.isfinite(self.model_score):
            raise ValueError(f"model_score must be finite, got {self.model_score!r}")

    def to_json(self) -> dict[str, Any]:
        """JSON form; the same keys as :data:`CSV_COLUMNS`."""
        return {
            "feedback_id": self.feedback_id,
            "recorded_at": self.recorded_at,
            "study_instance_uid": self.study_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "verdict": self.verdict.value,
            "corrected_label": None if self.corrected_label is None
            else self.corrected_label.value,
            "lesion": self.lesion,
            "model_status": self.model_status,
            "model_score": self.model_score,
            "reader": self.reader,
            "comment": self.comment,
            "source": self.source.value,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeedbackEntry:
        """Rebuild an entry from :meth:`to_json` output.

        Raises
        ------
        ValueError
            When a key is missing or a value is invalid (naming it).
        """
        try:
            label = data["corrected_label"]
            score = data["model_score"]
            ident = data["feedback_id"]
            return cls(
                sop_instance_uid=str(data["sop_instance_uid"]),
                study_instance_uid=str(data["study_instance_uid"]),
                verdict=Verdict(data["verdict"]),
                corrected_label=None if label in (None, "") else CorrectedLabel(label),
                lesion=data["lesion"] or None,
                model_status=data["model_status"] or None,
                model_score=None if score in (None, "") else float(score),
                reader=str(data["reader"] or ""),
                comment=str(data["comment"] or ""),
                source=FeedbackSource(data["source"]),
                recorded_at=float(data["recorded_at"]),
                feedback_id=None if ident in (None, "") else int(ident),
            )
        except KeyError as exc:
            raise ValueError(f"feedback has no {exc.args[0]!r}") from None


def parse_label(text: str | None) -> CorrectedLabel | None:
    """``normal`` / ``abnormal`` (any case) or empty -> the label.

    Raises
    ------
    ValueError
        For any other text.
    """
    if text is None or not text.strip():
        return None
    try:
        return CorrectedLabel(text.strip().lower())
    except ValueError:
        raise ValueError(f"corrected label must be normal or abnormal, got {text!r}") from None


#: First characters that make a spreadsheet (Excel, LibreOffice Calc, Google Sheets) read a
#: cell as a formula (OWASP "CSV Injection"; https://owasp.org/www-community/attacks/CSV_Injection).
FORMULA_STARTS: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")

#: The prefix that makes a spreadsheet show a cell as text.
TEXT_PREFIX = "'"


def csv_cell(value: str) -> str:
    """``value`` as a CSV cell that a spreadsheet shows as text, never runs as a formula.

    A value starting with one of :data:`FORMULA_STARTS` gets :data:`TEXT_PREFIX` in front; so
    does a value that already starts with the prefix, which keeps :func:`csv_value` exact.

    Raises
    ------
    TypeError
        When ``value`` is not a str.
    """
    if not isinstance(value, str):
        raise TypeError(f"value must be a str, got {type(value).__name__}")
    if value.startswith((*FORMULA_STARTS, TEXT_PREFIX)):
        return TEXT_PREFIX + value
    return value


def csv_value(cell: str) -> str:
    """The value :func:`csv_cell` wrote as ``cell`` (the inverse of :func:`csv_cell`).

    Raises
    ------
    TypeError
        When ``cell`` is not a str.
    """
    if not isinstance(cell, str):
        raise TypeError(f"cell must be a str, got {type(cell).__name__}")
    return cell[len(TEXT_PREFIX):] if cell.startswith(TEXT_PREFIX) else cell


def write_csv(entries: Iterable[FeedbackEntry], path: Path) -> int:
    """Write entries as CSV (:data:`CSV_COLUMNS`, header first, UTF-8); return the row count.

    Text cells go through :func:`csv_cell` (no spreadsheet formulas); numbers as written.

    Raises
    ------
    OSError
        When the file cannot be written.
    """
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for entry in entries:
            row = entry.to_json()
            writer.writerow({k: _cell(row[k]) for k in CSV_COLUMNS})
            n += 1
    return n


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return csv_cell(value) if isinstance(value, str) else value

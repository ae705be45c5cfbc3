"""What the pages show, computed from the queue with the CLI's own functions.

``spine-node status`` (:func:`spine_node.status.status_report`) gives the queue, the
destinations, dead letters and workers; ``spine-node worklist``
(:func:`spine_node.worklist.build_worklist`) gives each study's priority. This module adds the
per-image view: each received object's outcome in words.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spine_node.config import Settings
from spine_node.labels import display_label
from spine_node.status import status_report
from spine_node.store import DELIVERY_FIELDS, JobState, JobStore
from spine_node.worklist import build_worklist


class Outcome(str, enum.Enum):
    """What happened to one received object, as the page shows it."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    NOT_PROCESSED = "not_processed"
    IGNORED = "ignored"
    WAITING = "waiting"  # queued, running, or failed and waiting for another attempt
    DEAD = "dead"  # no result could be made: an operator must replay it


#: How each outcome is written on the page.
OUTCOME_WORDS: Mapping[Outcome, str] = {
    Outcome.POSITIVE: "positive",
    Outcome.NEGATIVE: "negative",
    Outcome.NOT_PROCESSED: "not processed",
    Outcome.IGNORED: "ignored",
    Outcome.WAITING: "waiting",
    Outcome.DEAD: "dead (replay)",
}

#: Why an object without a job was ignored, in words, by its category.
IGNORED_WORDS: Mapping[str, str] = {
    "not_image": "not an image",
    "out_of_scope": "out of scope",
}


@dataclass(frozen=True)
class ImageRow:
    """One received object on the page.

    Attributes
    ----------
    sop_instance_uid, series_instance_uid, study_instance_uid : str
        Its UIDs.
    outcome : Outcome
        What happened to it.
    reason : str or None
        Why it was not processed, ignored, is waiting or is dead, in words.
    score : float or None
        The ensemble's probability of "abnormal".
    threshold : float or None
        The bundle's decision threshold.
    findings : tuple of str
        Detected lesions in words (label, grade, confidence).
    notes : tuple of str
        What the gate noticed but allowed.
    received_at : float
        Epoch seconds.
    has_overlay : bool
        True when the result lists objects (the overlay may be among them).
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    outcome: Outcome
    reason: str | None
    score: float | None
    threshold: float | None
    findings: tuple[str, ...]
    notes: tuple[str, ...]
    received_at: float
    has_overlay: bool

    @property
    def outcome_words(self) -> str:
        """The outcome as written on the page."""
        return OUTCOME_WORDS[self.outcome]


def _finding_words(finding: Mapping[str, Any]) -> str:
    label = finding.get("display_label") or display_label(str(finding["label"]))
    grade = f" grade {finding['grade']}" if finding.get("grade") else ""
    return f"{label}{grade} ({float(finding['score']):.2f})"


def image_row(item: Mapping[str, Any]) -> ImageRow:
    """Turn one row of :meth:`JobStore.study_images` into what the page shows."""
    result = item["result"]
    reason: str | None = None
    score = threshold = None
    findings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    objects: Sequence[str] = ()
    if result is not None:
        outcome = Outcome(result["status"])
        reason = result.get("reason")
        score, threshold = result.get("score"), result.get("threshold")
        findings = tuple(_finding_words(f) for f in result.get("findings", ()))
        notes = tuple(str(n) for n in result.get("notes", ()))
        objects = result.get("objects", ())
    elif item["category"] != "image" or item["job_state"] is None:
        outcome = Outcome.IGNORED
        reason = item["category_reason"] or IGNORED_WORDS.get(item["category"], item["category"])
    elif item["job_state"] == JobState.DEAD.value:
        outcome = Outcome.DEAD
        reason = item["last_error"]
    else:
        outcome = Outcome.WAITING
        state = item["job_state"]
        reason = (
            f"{state}, attempt {item['attempts']}: {item['last_error']}"
            if state == JobState.FAILED.value
            else state
        )
    return ImageRow(
        sop_instance_uid=item["sop_instance_uid"],
        series_instance_uid=item["series_instance_uid"],
        study_instance_uid=item["study_instance_uid"],
        outcome=outcome,
        reason=reason,
        score=score,
        threshold=threshold,
        findings=findings,
        notes=notes,
        received_at=float(item["received_at"]),
        has_overlay=len(objects) > 1,
    )


#: How a study's delivery of one kind is written when nothing of that kind is configured or
#: queued for it (the CLI worklist prints "-").
NO_DELIVERY = "none"


def recent_studies(
    store: JobStore,
    limit: int,
    offset: int = 0,
    commitment_destinations: Collection[str] = (),
) -> list[dict[str, Any]]:
    """The studies received last, newest first, each with its worklist row and its images.

    Parameters
    ----------
    store : JobStore
        The open queue.
    limit, offset : int
        Page size and how many newer studies to skip.
    commitment_destinations : collection of str
        The DICOM destinations that confirm results by Storage Commitment
        (``Settings.commitment_destinations``), as ``spine-node worklist`` passes them.

    Returns
    -------
    list of dict
        ``study_instance_uid``, ``priority`` (the worklist's: ``"ignored"`` for a study none
        of whose objects is analysed; before the first result ``"waiting"``), ``max_score``,
        ``reason`` (why an ignored study is ignored, as ``spine-node worklist`` says it; else
        None), ``delivery`` (per :data:`~spine_node.store.DELIVERY_FIELDS` entry, ``ris`` and
        ``commitment``: ``"done"``, ``"pending"``, ``"dead"`` or :data:`NO_DELIVERY`),
        ``arrival`` (first object), ``last_arrival``, ``counts`` (Outcome value -> number
        of objects), ``images`` (list of ImageRow) and ``spool_paths`` (its received files
        still kept, relative to the spool).
    """
    return studies_view(store, store.recent_study_uids(limit, offset), commitment_destinations)


def one_study(
    store: JobStore, study_uid: str, commitment_destinations: Collection[str] = ()
) -> dict[str, Any] | None:
    """One study as :func:`recent_studies` shows it (None when nothing was received)."""
    found = studies_view(store, [study_uid], commitment_destinations)
    return found[0] if found and found[0]["images"] else None


def studies_view(
    store: JobStore, uids: Sequence[str], commitment_destinations: Collection[str] = ()
) -> list[dict[str, Any]]:
    """The studies ``uids`` in that order, as :func:`recent_studies` describes them."""
    if not uids:
        return []
    listed_studies = store.studies(commitment_destinations, only=uids, ignored_studies=True)
    worklist = {row["study_instance_uid"]: row for row in build_worklist(listed_studies)}
    images: dict[str, list[ImageRow]] = {uid: [] for uid in uids}
    spool: dict[str, list[str]] = {uid: [] for uid in uids}
    for item in store.study_images(uids):
        images[item["study_instance_uid"]].append(image_row(item))
        if item["spool_path"]:
            spool[item["study_instance_uid"]].append(item["spool_path"])
    out = []
    for uid in uids:
        rows = images[uid]
        listed = worklist.get(uid)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.outcome.value] = counts.get(row.outcome.value, 0) + 1
        if listed:
            priority = listed["priority"]
        elif rows and all(r.outcome is Outcome.IGNORED for r in rows):
            priority = Outcome.IGNORED.value  # nothing in it is analysed
        else:
            priority = Outcome.WAITING.value
        out.append(
            {
                "study_instance_uid": uid,
                "priority": priority,
                "max_score": listed["max_score"] if listed else None,
                "reason": listed["reason"] if listed else None,
                "delivery": {
                    key: (listed["delivery"][key] if listed else None) or NO_DELIVERY
                    for key in DELIVERY_FIELDS
                },
                "summary_revision": listed["summary_revision"] if listed else None,
                "arrival": min(r.received_at for r in rows) if rows else None,
                "last_arrival": max(r.received_at for r in rows) if rows else None,
                "counts": counts,
                "images": rows,
                "spool_paths": spool[uid],
            }
        )
    return out


def overview(settings: Settings, store: JobStore) -> dict[str, Any]:
    """The status report of ``spine-node status`` (queue, destinations, dead letters,
    workers, problems), read from ``store``."""
    report = status_report(settings, store)
    report["generated_at"] = time.time()
    return report

"""Rank studies for the reading worklist: positive first (highest score first), then arrival.

A row's ``priority`` is the study's verdict value (``positive``, ``not_processed``,
``negative``: :class:`~spine_node.results.types.Status`, the vocabulary of image results).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from spine_node.results.priority import LEVELS, study_priority
from spine_node.results.types import ResultRecord, Status
from spine_node.sop_classes import Category
from spine_node.store import DELIVERY_FIELDS


class Outcome(str, enum.Enum):
    """Whether the AI analysed a study (``outcome`` of a worklist row)."""

    ANALYSED = "analysed"
    IGNORED = "ignored"


#: Reading order of priority values: positive studies first, then those the AI could not read
#: (a radiologist must read them unassisted), then negative.
LEVEL_ORDER = {level.value: i for i, level in enumerate(LEVELS)}


def build_worklist(studies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank studies.

    Parameters
    ----------
    studies : sequence of dict
        From :meth:`JobStore.studies`: ``study_instance_uid``, ``arrival`` and ``results``
        (``[(sop_instance_uid, payload)]``).

    Returns
    -------
    list of dict
        One row per study with ``rank``, ``priority``, ``max_score``, ``n_images``,
        ``n_positive``, ``n_not_processed``, ``n_not_image`` (objects ignored: not an image),
        ``n_out_of_scope`` (images outside the intended use), ``arrival``,
        ``study_instance_uid``, and ``summary_revision`` / ``summary_sop_instance_uid``: the
        study summary SR revision that states the same priority (None before the first),
        and ``delivery``: per delivery kind (``ris``: the HL7 ORU to the RIS; ``commitment``:
        Storage Commitment of the result objects at the PACS) ``"done"``, ``"pending"``,
        ``"dead"`` or None (nothing of that kind configured or queued), and ``outcome``:
        ``"analysed"`` (``reason`` None) or, for a study none of whose objects is analysed
        (from ``JobStore.studies(ignored_studies=True)``: no results, no job),
        ``"ignored"`` with ``priority`` ``"ignored"``, no score, no images and ``reason``:
        why, e.g. "not an image: Basic Text SR Storage" (distinct reasons joined by "; ").
        Ignored objects never change the priority; ignored studies come last.
    """
    rows = []
    for study in studies:
        if not study["results"]:
            rows.append(_ignored_row(study))
            continue
        records = [ResultRecord.from_json(p) for _, p in study["results"]]
        results = [(r.sop_instance_uid, r.result) for r in records]
        priority = study_priority(results)
        rows.append(
            {
                "study_instance_uid": study["study_instance_uid"],
                "priority": priority.level.value,
                "max_score": priority.max_score,
                "n_images": priority.n_images,
                "n_positive": priority.n_positive,
                "n_not_processed": priority.n_not_processed,
                "n_not_image": study.get("ignored", {}).get("not_image", 0),
                "n_out_of_scope": study.get("ignored", {}).get("out_of_scope", 0),
                "arrival": study["arrival"],
                # the study summary SR that states this priority (its latest revision)
                "summary_revision": study.get("summary", {}).get("revision"),
                "summary_sop_instance_uid": study.get("summary", {}).get("sop_instance_uid"),
                "delivery": {k: study.get("delivery", {}).get(k) for k in DELIVERY_FIELDS},
                "outcome": Outcome.ANALYSED.value,
                "reason": None,
            }
        )
    rows.sort(
        key=lambda r: (
            LEVEL_ORDER.get(r["priority"], 3),
            -(r["max_score"] or 0.0) if r["priority"] == Status.POSITIVE.value else 0.0,
            r["arrival"],
        )
    )
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def _ignored_row(study: dict[str, Any]) -> dict[str, Any]:
    """The row of a study none of whose objects is analysed (same keys as any row)."""
    reasons = sorted({Category(c).why(r) for c, r in study.get("ignored_reasons", [])})
    return {
        "study_instance_uid": study["study_instance_uid"],
        "priority": Outcome.IGNORED.value,
        "max_score": None,
        "n_images": 0,
        "n_positive": 0,
        "n_not_processed": 0,
        "n_not_image": study.get("ignored", {}).get("not_image", 0),
        "n_out_of_scope": study.get("ignored", {}).get("out_of_scope", 0),
        "arrival": study["arrival"],
        "summary_revision": None,
        "summary_sop_instance_uid": None,
        "delivery": {k: study.get("delivery", {}).get(k) for k in DELIVERY_FIELDS},
        "outcome": Outcome.IGNORED.value,
        "reason": "; ".join(reasons) or "not analysed",
    }

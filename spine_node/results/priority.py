"""One triage priority per study, from the results of all its images (pure function).

The study's level is a value of the same verdict vocabulary as an image's result
(:class:`~spine_node.results.types.Status`): a study is ``positive`` when any image is,
``negative`` when every image is, else ``not_processed``. Stored, JSON, webhook and worklist
values are these; only displayed text says "abnormal" / "normal" (:func:`level_text`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spine_node.results.types import CascadeResult, Status

#: Priority levels, most urgent first: positive, then what the AI could not read (a
#: radiologist reads it unassisted), then negative.
LEVELS: tuple[Status, ...] = (Status.POSITIVE, Status.NOT_PROCESSED, Status.NEGATIVE)

#: Words shown to a reader for each level (reports, banners, the worklist table).
_LEVEL_TEXT: Mapping[Status, str] = {
    Status.POSITIVE: "abnormal",
    Status.NEGATIVE: "normal",
    Status.NOT_PROCESSED: "not processed",
}


def level_text(level: Status) -> str:
    """Return the displayed word of a verdict: "abnormal", "normal" or "not processed".

    Raises
    ------
    TypeError
        When ``level`` is not a :class:`Status`.
    """
    if not isinstance(level, Status):
        raise TypeError(f"level must be a Status, got {type(level).__name__}")
    return _LEVEL_TEXT[level]


@dataclass(frozen=True)
class StudyPriority:
    """Triage priority of a study.

    Attributes
    ----------
    level : Status
        ``positive`` when any image is positive; ``negative`` when every image is
        negative; ``not_processed`` otherwise (no positive image and at least one image
        the cascade could not read: an unread image is never called negative).
    max_score : float or None
        Highest ensemble probability over the processed images (None when none was).
    n_images, n_positive, n_not_processed : int
        Counts over distinct source images.
    """

    level: Status
    max_score: float | None
    n_images: int
    n_positive: int
    n_not_processed: int

    def __post_init__(self) -> None:
        if not isinstance(self.level, Status):
            raise TypeError(f"level must be a Status, got {self.level!r}")
        if self.max_score is not None and not 0.0 <= self.max_score <= 1.0:
            raise ValueError(f"max_score must be in [0, 1], got {self.max_score!r}")
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images!r}")
        if not 0 <= self.n_positive + self.n_not_processed <= self.n_images:
            raise ValueError(
                f"n_positive ({self.n_positive}) + n_not_processed ({self.n_not_processed}) "
                f"must be within [0, n_images={self.n_images}]"
            )

    @property
    def sort_key(self) -> tuple[int, float]:
        """Key that sorts a worklist most urgent first (positive by descending score)."""
        return (LEVELS.index(self.level), -(self.max_score or 0.0))

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (webhook body, worklist): ``level`` is the verdict's value."""
        return {
            "level": self.level.value,
            "max_score": self.max_score,
            "n_images": self.n_images,
            "n_positive": self.n_positive,
            "n_not_processed": self.n_not_processed,
        }

    def summary(self) -> str:
        """Return one sentence describing the priority, for reports and banners."""
        score = "n/a" if self.max_score is None else f"{self.max_score:.3f}"
        return (
            f"Study priority: {level_text(self.level)}; highest probability {score}; "
            f"{self.n_positive} of {self.n_images} images positive, "
            f"{self.n_not_processed} not processed"
        )


def study_priority(results: Sequence[tuple[str, CascadeResult]]) -> StudyPriority:
    """Combine the results of a study's images into one priority.

    Parameters
    ----------
    results : sequence of (str, CascadeResult)
        ``(SOP Instance UID, result)`` for each image of one study. The same image listed
        twice (a retry) counts once: its last result wins.

    Returns
    -------
    StudyPriority
        Any positive image makes the study ``positive``, ranked by its highest score; all
        negative gives ``negative``; otherwise ``not_processed``.
    """
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
        raise TypeError(f"results must be a sequence of pairs, got {type(results).__name__}")
    latest: dict[str, CascadeResult] = {}
    for i, item in enumerate(results):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"results[{i}] must be a (str, CascadeResult) pair, got {item!r}")
        uid, result = item
        if not isinstance(uid, str) or not uid:
            raise ValueError(f"results[{i}] needs a non-empty SOP Instance UID, got {uid!r}")
        if not isinstance(result, CascadeResult):
            raise TypeError(f"results[{i}] must hold a CascadeResult, got {type(result).__name__}")
        latest[uid] = result
    if not latest:
        raise ValueError("results must hold at least one image")

    statuses = [r.status for r in latest.values()]
    n_positive = statuses.count(Status.POSITIVE)
    n_not_processed = statuses.count(Status.NOT_PROCESSED)
    scores = [r.score for r in latest.values() if r.score is not None]
    if n_positive:
        level = Status.POSITIVE
    elif n_not_processed:
        level = Status.NOT_PROCESSED
    else:
        level = Status.NEGATIVE
    return StudyPriority(
        level=level,
        max_score=max(scores) if scores else None,
        n_images=len(latest),
        n_positive=n_positive,
        n_not_processed=n_not_processed,
    )

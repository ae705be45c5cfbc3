"""Monitoring the model in use: daily outcome rates, score drift, the once-per-crossing alarm.

Everything is read from the durable database (the ``results`` rows every worker writes), so
any process (web, worker) on any host sees the same figures. The drift statistic and its
reference are :mod:`spine_node.drift`'s; this module reads the window of scores, keeps the
alarm state in the ``drift_alarms`` table (so that several workers log a crossing once) and
groups not-processed reasons into a small fixed vocabulary (:data:`NOT_PROCESSED_REASONS`)
fit for metric labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from spine_node.config import MonitoringSettings
from spine_node.drift import DriftCheck, DriftState, ScoreReference, check_drift, window_counts
from spine_node.results.types import Status
from spine_node.store import DriftAlarm, JobStore, Result

logger = logging.getLogger(__name__)

#: Not-processed reason kinds: (kind, phrases of the reason text), first match wins. The
#: phrases are those of the gate (models/gate.py), the cascade (pipeline.py) and the worker
#: and queue (worker.py, store.py); anything else is "other".
NOT_PROCESSED_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("outside_intended_use", ("outside the intended use",)),
    ("content_gate", ("does not look like a spine radiograph",)),
    ("decode_failed", ("could not be decoded",)),
    ("bad_header", ("image header could not be read",)),
    ("image_too_small", ("image too small",)),
    ("not_spine_radiograph", ("not a radiograph", "not a diagnostic radiograph", ", not spine")),
    ("processing_failed", ("worker died", "processing failed", "processing did not finish")),
)
OTHER_REASON = "other"
#: Every reason kind, in display order.
REASON_KINDS = (*(kind for kind, _ in NOT_PROCESSED_REASONS), OTHER_REASON)
#: The ``drift_alarms`` row of the ensemble score.
SCORE_ALARM = "score"


def reason_kind(reason: str | None) -> str:
    """The kind of a not-processed reason (one of :data:`REASON_KINDS`)."""
    text = (reason or "").lower()
    for kind, phrases in NOT_PROCESSED_REASONS:
        if any(p in text for p in phrases):
            return kind
    return OTHER_REASON


def reason_kind_sql(column: Any) -> Any:
    """SQL ``CASE`` giving :func:`reason_kind` of a text column (same phrases, same order)."""
    lowered = func.lower(column)
    whens = [
        (lowered.like(f"%{phrase}%"), kind)
        for kind, phrases in NOT_PROCESSED_REASONS
        for phrase in phrases
    ]
    return case(*whens, else_=OTHER_REASON)


@dataclass(frozen=True)
class DayOutcomes:
    """The results recorded on one UTC day.

    Attributes
    ----------
    day : str
        ISO date (UTC).
    positive, negative, not_processed : int
        Results of each verdict.
    not_processed_by_reason : dict
        Reason kind (:data:`REASON_KINDS`) -> count.
    """

    day: str
    positive: int = 0
    negative: int = 0
    not_processed: int = 0
    not_processed_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All results of the day."""
        return self.positive + self.negative + self.not_processed

    @property
    def positive_rate(self) -> float | None:
        """Positives among the analysed (positive or negative) images; None without any."""
        analysed = self.positive + self.negative
        return None if analysed == 0 else self.positive / analysed

    @property
    def not_processed_rate(self) -> float | None:
        """Not-processed among all results; None without any."""
        return None if self.total == 0 else self.not_processed / self.total

    def to_json(self) -> dict[str, Any]:
        """JSON form (with the rates)."""
        return {
            "day": self.day,
            "positive": self.positive,
            "negative": self.negative,
            "not_processed": self.not_processed,
            "not_processed_by_reason": dict(self.not_processed_by_reason),
            "positive_rate": self.positive_rate,
            "not_processed_rate": self.not_processed_rate,
        }


def _day(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).date().isoformat()


def daily_outcomes(store: JobStore, days: int, now: float | None = None) -> list[DayOutcomes]:
    """Results per UTC day for the last ``days`` days (today included), oldest first.

    Days without results are listed with zeros.

    Raises
    ------
    ValueError
        When ``days`` is below 1.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days!r}")
    now = store.clock() if now is None else now
    today = datetime.fromtimestamp(now, UTC).date()
    first = today - timedelta(days=days - 1)
    since = datetime(first.year, first.month, first.day, tzinfo=UTC).timestamp()

    def rows(s: Session) -> list[Any]:
        return list(
            s.execute(
                select(Result.created_at, Result.status, reason_kind_sql(Result.reason))
                .where(Result.created_at >= since)
            ).all()
        )

    counts: dict[str, dict[str, Any]] = {
        (first + timedelta(days=i)).isoformat(): {
            "positive": 0, "negative": 0, "not_processed": 0, "reasons": {}
        }
        for i in range(days)
    }
    for created_at, status, kind in store.read(rows):
        entry = counts.get(_day(created_at))
        if entry is None or status not in ("positive", "negative", "not_processed"):
            continue
        entry[status] += 1
        if status == Status.NOT_PROCESSED.value:
            entry["reasons"][kind] = entry["reasons"].get(kind, 0) + 1
    return [
        DayOutcomes(day, c["positive"], c["negative"], c["not_processed"], c["reasons"])
        for day, c in counts.items()
    ]


def _window_filter(since: float) -> Any:
    return (Result.created_at >= since) & Result.status.in_(
        [Status.POSITIVE.value, Status.NEGATIVE.value]
    ) & Result.score.is_not(None)


def window_scores(store: JobStore, since: float, bundle_version: str | None) -> np.ndarray:
    """Ensemble scores of the images analysed (positive or negative) since ``since`` (epoch s)
    by the bundle of version ``bundle_version``.

    Results of another bundle version, and those recorded before the node kept the bundle's
    version (``bundle_version`` NULL), are left out: their scores are not comparable with this
    bundle's reference. ``bundle_version`` None selects nothing (no bundle in use).
    """
    if bundle_version is None:
        return np.zeros(0, dtype=np.float64)

    def scores(s: Session) -> list[float]:
        return [
            float(v or 0.0)
            for v in s.scalars(
                select(Result.score).where(
                    _window_filter(since) & (Result.bundle_version == bundle_version)
                )
            )
        ]

    return np.asarray(store.read(scores), dtype=np.float64)


def window_analysed(store: JobStore, since: float) -> int:
    """How many images were analysed (scored positive or negative) since ``since`` (epoch s),
    by any bundle (unknown ones included)."""
    return int(store.read(
        lambda s: s.scalar(select(func.count(Result.id)).where(_window_filter(since)))
    ) or 0)


@dataclass(frozen=True)
class ScoreWindow:
    """The window's scores against the reference, for the page's plot and the metrics.

    Attributes
    ----------
    check : DriftCheck
        The drift verdict.
    reference : ScoreReference or None
        The bundle's reference.
    window_counts : tuple of int
        Window scores per reference bin (empty without a reference).
    positive_rate : float or None
        Fraction of the window's scores at or above ``threshold`` (None without scores).
    window_days : float
        The window's length.
    bundle_version : str or None
        The bundle in use, whose results alone are in the window (``check.n_window`` images).
    n_analysed : int
        Images analysed in the window by any bundle: those of an earlier bundle, or recorded
        before the node kept the bundle's version, are ``n_analysed - check.n_window``.
    """

    check: DriftCheck
    reference: ScoreReference | None
    window_counts: tuple[int, ...]
    positive_rate: float | None
    window_days: float
    bundle_version: str | None = None
    n_analysed: int = 0

    @property
    def n_other_bundles(self) -> int:
        """Images of the window left out: another bundle's, or of unknown bundle."""
        return max(0, self.n_analysed - self.check.n_window)


def score_window(
    store: JobStore,
    reference: ScoreReference | None,
    settings: MonitoringSettings,
    threshold: float | None,
    now: float | None = None,
    *,
    bundle_version: str | None,
) -> ScoreWindow:
    """Read the window's scores of the bundle in use and compare them with ``reference``
    (:func:`check_drift`).

    Parameters
    ----------
    store : JobStore
        The queue database.
    reference : ScoreReference or None
        The bundle's reference (None: "no reference").
    settings : MonitoringSettings
        Window, threshold, minimum images.
    threshold : float or None
        The bundle's decision threshold, for the window's positive rate.
    now : float, optional
        Epoch seconds (default: the store's clock).
    bundle_version : str or None
        Version of the bundle whose reference this is: only its results are in the window
        and the positive rate (:func:`window_scores`).
    """
    now = store.clock() if now is None else now
    since = now - settings.window_days * 86400.0
    scores = window_scores(store, since, bundle_version)
    check = check_drift(
        reference,
        scores,
        threshold=settings.drift_threshold,
        min_images=settings.min_window_images,
    )
    counts: tuple[int, ...] = ()
    if reference is not None and scores.size:
        counts = tuple(int(c) for c in window_counts(reference, scores))
    elif reference is not None:
        counts = (0,) * len(reference.counts)
    rate = None
    if threshold is not None and scores.size:
        rate = float(np.mean(scores >= threshold))
    return ScoreWindow(check, reference, counts, rate, settings.window_days, bundle_version,
                       window_analysed(store, since))


def record_drift_check(store: JobStore, check: DriftCheck) -> bool:
    """Store a drift check; log a WARNING when it crosses the threshold (once per crossing).

    The alarm state lives in the database (``drift_alarms``), so of several workers checking
    the same window only the first to see the crossing logs it. Two workers making the first
    check at once both try to create the row; the one that loses runs its check again and
    updates the row the other created. Falling back at or below
    the threshold is logged at INFO; "no reference" and "too few images" keep the state.

    Returns
    -------
    bool
        True when this call logged a crossing above the threshold.
    """
    now = store.clock()

    def record(s: Session) -> tuple[bool, bool]:
        row = s.get(DriftAlarm, SCORE_ALARM, with_for_update=True)
        if row is None:
            row = DriftAlarm(name=SCORE_ALARM, state=check.state.value, psi=check.psi,
                             n_window=check.n_window, alerting=0, checked_at=now,
                             changed_at=now)
            s.add(row)
        was = bool(row.alerting)
        now_alerting = was
        if check.state in (DriftState.OK, DriftState.DRIFT):
            now_alerting = check.drifted
        row.state = check.state.value
        row.psi = check.psi
        row.n_window = check.n_window
        row.checked_at = now
        if now_alerting != was:
            row.alerting = int(now_alerting)
            row.changed_at = now
        return was, now_alerting

    try:
        was, alerting = store._run(record)
    except IntegrityError:  # another worker created the alarm row at the same moment
        was, alerting = store._run(record)
    if alerting and not was:
        logger.warning("score drift: %s (window of analysed images vs the bundle's validation "
                       "scores)", check.describe())
        return True
    if was and not alerting:
        logger.info("score drift over: %s", check.describe())
    return False


def drift_check_job(
    store: JobStore,
    reference: ScoreReference | None,
    settings: MonitoringSettings,
    threshold: float | None,
    bundle_version: str | None,
) -> DriftCheck:
    """The periodic check a worker runs (scheduler): read the window of the worker's bundle
    (``bundle_version``), record, log a crossing."""
    window = score_window(store, reference, settings, threshold, bundle_version=bundle_version)
    record_drift_check(store, window.check)
    return window.check


def alarm_state(store: JobStore) -> dict[str, Any] | None:
    """The stored alarm of the score (None before the first check)."""

    def read(s: Session) -> dict[str, Any] | None:
        row = s.get(DriftAlarm, SCORE_ALARM)
        if row is None:
            return None
        return {
            "state": row.state,
            "psi": row.psi,
            "n_window": row.n_window,
            "alerting": bool(row.alerting),
            "checked_at": row.checked_at,
            "changed_at": row.changed_at,
        }

    return store.read(read)


def reason_counts(days: Sequence[DayOutcomes]) -> dict[str, int]:
    """Not-processed counts by reason kind over ``days`` (every kind listed)."""
    total = dict.fromkeys(REASON_KINDS, 0)
    for day in days:
        for kind, n in day.not_processed_by_reason.items():
            total[kind] = total.get(kind, 0) + n
    return total

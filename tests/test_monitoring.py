"""Model monitoring over the durable queue: the window's PSI against a reference with a known
value, the WARNING logged once per crossing (even with several checkers), only the bundle in
use's results in the window (after an upgrade, and the column added to an older database),
daily rates and not-processed reasons by kind."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from spine_node.config import MonitoringSettings
from spine_node.drift import DriftState, ScoreReference, psi
from spine_node.metrics import read_metrics
from spine_node.monitoring import (
    daily_outcomes,
    drift_check_job,
    reason_counts,
    reason_kind,
    score_window,
)
from spine_node.store import (
    Backoff,
    DestinationKind,
    InstanceRecord,
    JobOutcome,
    JobStore,
    SendSpec,
)

DAY = 86400.0
T0 = 1_790_000_000.0  # a fixed UTC instant: 2026-09-21
HALVES = ScoreReference(bin_edges=(0.0, 0.5, 1.0), counts=(50, 50), source="synthetic")
SETTINGS = MonitoringSettings(window_days=7, drift_threshold=0.25, min_window_images=20)
VERSION = "2.0"  # the bundle in use


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _record(store: JobStore, n: int, status: str, score: float | None = None,
            reason: str | None = None, send: bool = False,
            bundle_version: str | None = VERSION) -> None:
    """Receive ``n`` images and finish their jobs with this outcome (the worker's calls)."""
    for _ in range(n):
        i = store.status()["instances"]
        uid = f"1.2.3.{i + 1}"
        store.record_instance(InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2.3.0",
                                             "1.2.840.10008.1.2.1", "MOD", f"{uid}.dcm", 10))
        (job,) = store.claim_jobs("w", 60.0, 1, 3)
        sends = [SendSpec("pacs", DestinationKind.DICOM, f"{uid}.9", "x.dcm")] if send else []
        store.complete_job(job.job_id, "w", JobOutcome(status, score, reason, {}, bundle_version), sends,
                           {"triage": 0.2, "results": 0.05})


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = JobStore.open(url, clock=Clock(T0))
    if request.param == "postgres":
        with s.engine.begin() as conn:
            conn.execute(text("TRUNCATE outbound, results, jobs, instances, job_stage_times, "
                              "drift_alarms RESTART IDENTITY CASCADE"))
    yield s
    s.close()


def test_drift_warns_once_per_crossing(store: JobStore, caplog: pytest.LogCaptureFixture) -> None:
    clock = store.clock
    assert isinstance(clock, Clock)
    _record(store, 5, "negative", 0.1)
    check = drift_check_job(store, HALVES, SETTINGS, 0.5, VERSION)
    assert check.state is DriftState.TOO_FEW_IMAGES
    _record(store, 20, "negative", 0.1)
    _record(store, 75, "positive", 0.9)  # window 25 % / 75 % against 50 % / 50 %
    with caplog.at_level(logging.INFO, logger="spine_node.monitoring"):
        first = drift_check_job(store, HALVES, SETTINGS, 0.5, VERSION)
        again = drift_check_job(store, HALVES, SETTINGS, 0.5, VERSION)  # another worker, same window
    assert first.psi == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert first.state is DriftState.DRIFT and again.state is DriftState.DRIFT
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PSI 0.275 over 100 images" in warnings[0].getMessage()
    window = score_window(store, HALVES, SETTINGS, 0.5, bundle_version=VERSION)
    assert window.window_counts == (25, 75) and window.positive_rate == pytest.approx(0.75)
    # eight days later the old scores left the window; new ones match the reference
    clock.now = T0 + 8 * DAY
    _record(store, 30, "negative", 0.2)
    _record(store, 30, "positive", 0.8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spine_node.monitoring"):
        back = drift_check_job(store, HALVES, SETTINGS, 0.5, VERSION)
    assert back.state is DriftState.OK and back.psi == pytest.approx(0.0)
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # "score drift over"
    assert drift_check_job(store, None, SETTINGS, 0.5, VERSION).state is DriftState.NO_REFERENCE


def test_window_counts_only_the_bundle_in_use(store: JobStore) -> None:
    """After an upgrade the old bundle's scores (and those of unknown bundle) in the window move
    neither the new bundle's PSI nor its positive rate; a drift of the new bundle is found."""
    # the old bundle 1.0 scored high (its own distribution), rows from before the column: low
    _record(store, 80, "positive", 0.9, bundle_version="1.0")
    _record(store, 10, "negative", 0.1, bundle_version=None)
    _record(store, 15, "negative", 0.2)
    _record(store, 15, "positive", 0.7)  # the new bundle matches its reference: 50 % / 50 %
    window = score_window(store, HALVES, SETTINGS, 0.5, bundle_version=VERSION)
    assert window.check.state is DriftState.OK and window.check.psi == pytest.approx(0.0)
    assert window.check.n_window == 30 and window.window_counts == (15, 15)
    assert window.positive_rate == pytest.approx(0.5)
    assert window.n_analysed == 120 and window.n_other_bundles == 90
    # every result of the window counted together would have raised a false alarm
    mixed = [0.9] * 80 + [0.1] * 10 + [0.2] * 15 + [0.7] * 15
    assert psi(HALVES, np.asarray(mixed)) > SETTINGS.drift_threshold
    old = score_window(store, HALVES, SETTINGS, 0.5, bundle_version="1.0")
    assert old.check.n_window == 80 and old.window_counts == (0, 80)
    assert score_window(store, HALVES, SETTINGS, 0.5, bundle_version=None).check.n_window == 0
    # a real drift of the new bundle: now 15 / 75 (1/6, 5/6) against 50 % / 50 %
    _record(store, 60, "positive", 0.8)
    check = drift_check_job(store, HALVES, SETTINGS, 0.5, VERSION)
    assert check.state is DriftState.DRIFT and check.n_window == 90
    assert check.psi == pytest.approx((math.log(3) + math.log(5 / 3)) / 3)
    with pytest.raises(ValueError, match="bundle_version"):
        JobOutcome("negative", 0.1, None, {}, "")
    with pytest.raises(TypeError, match="bundle_version"):
        JobOutcome("negative", 0.1, None, {}, 2)  # type: ignore[arg-type]


def test_opening_an_older_database_adds_the_bundle_column(store: JobStore) -> None:
    """A database made before results recorded their bundle gets the column on open; its old
    rows stay NULL and are left out of the window."""
    _record(store, 25, "positive", 0.9)
    url = store.engine.url.render_as_string(hide_password=False)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE results DROP COLUMN bundle_version"))
    store.close()
    reopened = JobStore.open(url, clock=Clock(T0))
    try:
        with reopened.engine.connect() as conn:
            versions = conn.execute(text("SELECT bundle_version FROM results")).scalars().all()
        assert len(versions) == 25 and set(versions) == {None}
        _record(reopened, 20, "negative", 0.1)
        window = score_window(reopened, HALVES, SETTINGS, 0.5, bundle_version=VERSION)
        assert window.check.n_window == 20 and window.n_analysed == 45
        assert window.window_counts == (20, 0) and window.positive_rate == 0.0
    finally:
        reopened.close()


def test_daily_rates_and_reasons(store: JobStore) -> None:
    clock = store.clock
    assert isinstance(clock, Clock)
    _record(store, 3, "positive", 0.9)
    _record(store, 1, "negative", 0.1)
    _record(store, 2, "not_processed", reason="outside the intended use (age 12 years; ...)")
    clock.now = T0 + DAY
    _record(store, 1, "not_processed", reason="image could not be decoded: truncated")
    _record(store, 1, "not_processed", reason="worker died during processing 3 times")
    days = daily_outcomes(store, 3)
    assert [d.total for d in days] == [0, 6, 2]
    assert days[1].positive_rate == pytest.approx(0.75)
    assert days[1].not_processed_rate == pytest.approx(2 / 6)
    assert days[0].positive_rate is None and days[2].positive_rate is None
    assert days[1].not_processed_by_reason == {"outside_intended_use": 2}
    counts = reason_counts(days)
    assert counts["decode_failed"] == 1 and counts["processing_failed"] == 1
    assert counts["other"] == 0
    assert reason_kind("CT image, not a radiograph") == "not_spine_radiograph"
    assert reason_kind("image content does not look like a spine radiograph (...)") == (
        "content_gate")
    assert reason_kind("something new") == "other"


def test_metrics_read_from_the_database(store: JobStore) -> None:
    clock = store.clock
    assert isinstance(clock, Clock)
    _record(store, 2, "positive", 0.9, send=True)
    clock.now += 3.0
    _record(store, 1, "not_processed", reason="image too small (10 x 10 pixels; ...)")
    (first, second) = store.claim_sends(60.0, 10)
    clock.now += 4.0
    store.mark_sent(first.send_id)
    store.mark_send_failed(second.send_id, "refused", 1, Backoff(1, 1, 0), random.Random(0))
    store.record_decoder_crash(3)
    m = read_metrics(store, live_worker_age_s=30)
    assert m.received["image"] == 3 and m.outcomes["positive"] == 2
    assert m.outcomes["not_processed"] == 1 and m.not_processed["image_too_small"] == 1
    assert m.result_latency.count == 3 and m.result_latency.total == pytest.approx(0.0)
    # the first image was received at T0 and delivered 7 s later: bucket 10 s, not 5 s
    delivered = m.delivery_latency["pacs"]
    assert delivered.count == 1 and delivered.total == pytest.approx(7.0)
    assert dict(delivered.buckets)[5.0] == 0 and dict(delivered.buckets)[10.0] == 1
    assert m.send_failures == {"pacs": 1} and m.dead_sends == 1
    assert m.sends[("pacs", "sent")] == 1 and m.decoder_crashes == 1
    triage = m.stage_seconds["triage"]
    assert triage.count == 3 and triage.total == pytest.approx(0.6)
    assert dict(triage.buckets)[0.1] == 0 and dict(triage.buckets)[0.25] == 3
    assert m.queue_depth == 0 and m.oldest_queued_age_s == 0.0


def test_metrics_read_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """A scrape reads a snapshot (deferred transaction in WAL mode): it neither waits for the
    receiver's write lock nor takes it."""
    import sqlite3

    from spine_node.store import DatabaseBusy

    path = tmp_path / "q.db"
    store = JobStore.open(f"sqlite:///{path}", clock=Clock(T0), busy_timeout_s=0.1)
    try:
        _record(store, 2, "negative", 0.2)
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # another process writing (e.g. a receiver)
        try:
            m = read_metrics(store, live_worker_age_s=30)
            assert m.outcomes["negative"] == 2
            one = text("SELECT 1")
            assert store.read(lambda s: s.execute(one).scalar(), wait_s=0.0) == 1
            with pytest.raises(DatabaseBusy):  # a write transaction does wait for it
                store._run(lambda s: s.execute(one).scalar(), wait_s=0.0)
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    finally:
        store.close()


class _LosesTheRace(JobStore):
    """A worker whose first alarm transaction finds no row, then another worker commits it."""

    def __init__(self, other: JobStore) -> None:
        super().__init__(other.engine, other.clock)
        self.other = other
        self.raced = False

    def _run(self, fn, wait_s=None):  # type: ignore[no-untyped-def]
        if self.raced or getattr(fn, "__name__", "") != "record":
            return super()._run(fn, wait_s)
        self.raced = True

        def interleaved(s):  # type: ignore[no-untyped-def]
            out = fn(s)  # found no row and added one, not flushed yet
            drift_check_job(self.other, HALVES, SETTINGS, 0.5, VERSION)  # the other worker commits its row
            return out

        return super()._run(interleaved, wait_s)


# PostgreSQL only: SQLite's BEGIN IMMEDIATE serialises the two transactions.
@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_two_workers_creating_the_alarm_at_once(store: JobStore,
                                                caplog: pytest.LogCaptureFixture) -> None:
    _record(store, 25, "negative", 0.1)
    _record(store, 75, "positive", 0.9)  # drifted
    loser = _LosesTheRace(store)
    with caplog.at_level(logging.INFO, logger="spine_node.monitoring"):
        check = drift_check_job(loser, HALVES, SETTINGS, 0.5, VERSION)
    assert loser.raced and check.state is DriftState.DRIFT
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the winner logged the crossing; the loser updated its row
    from spine_node.monitoring import alarm_state

    state = alarm_state(store)
    assert state is not None and state["alerting"] and state["n_window"] == 100

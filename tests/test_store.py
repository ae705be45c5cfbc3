"""The queue on SQLite and on PostgreSQL: same code, same behaviour."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from spine_node.store import (
    Backoff,
    Commitments,
    DatabaseBusy,
    DestinationKind,
    InstanceRecord,
    JobOutcome,
    JobState,
    JobStore,
    LeaseLost,
    Monitor,
    SendSpec,
    SendState,
)


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[JobStore, Clock]]:
    clock = Clock()
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = JobStore.open(url, clock)
    if request.param == "postgres":
        with s.engine.begin() as conn:
            conn.execute(text("TRUNCATE outbound, results, jobs, instances RESTART IDENTITY CASCADE"))
    yield s, clock
    s.close()


def record(uid: str, study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.1", study, "1.2.3.4", "1.2.840.10008.1.2.1",
                          "MOD", f"xx/{uid}.dcm", 100)


def test_record_is_idempotent(store: tuple[JobStore, Clock]) -> None:
    s, _ = store
    assert isinstance(s.record_instance(record("1.1")), int)
    assert s.record_instance(record("1.1")) is None
    status = s.status()
    assert status["instances"] == 1
    assert status["jobs"]["queued"] == 1


def test_claim_is_exclusive_between_concurrent_workers(store: tuple[JobStore, Clock]) -> None:
    s, _ = store
    for i in range(40):
        s.record_instance(record(f"2.{i}"))
    claimed: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while True:
            jobs = s.claim_jobs(owner, 60, 3, 3)
            if not jobs:
                return
            with lock:
                claimed.extend(j.job_id for j in jobs)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed))
    assert len(claimed) == 40


def test_expired_lease_is_claimed_again_and_old_owner_loses(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.record_instance(record("3.1"))
    (job,) = s.claim_jobs("crashed", lease_s=10, limit=5, max_attempts=3)
    assert s.claim_jobs("other", 10, 5, 3) == []
    clock.now += 11
    (again,) = s.claim_jobs("other", 10, 5, 3)
    assert again.job_id == job.job_id and again.attempts == 2
    with pytest.raises(LeaseLost):
        s.complete_job(job.job_id, "crashed", JobOutcome("negative", 0.1, None, {}), [])
    s.complete_job(again.job_id, "other", JobOutcome("negative", 0.1, None, {}), [])
    assert s.job_state("3.1") == "done"


def test_failures_retry_with_backoff_then_dead_and_replay(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.record_instance(record("4.1"))
    for attempt in (1, 2):
        (job,) = s.claim_jobs("w", 10, 1, 3)
        assert job.attempts == attempt
        assert s.fail_job(job.job_id, "w", "boom", max_attempts=3, retry_delay_s=5) is JobState.FAILED
        assert s.claim_jobs("w", 10, 1, 3) == []  # backoff holds it
        clock.now += 6
    (job,) = s.claim_jobs("w", 10, 1, 3)
    assert s.fail_job(job.job_id, "w", "boom", 3, 5) is JobState.DEAD
    clock.now += 100
    assert s.claim_jobs("w", 10, 1, 3) == []
    assert s.status()["jobs"]["dead"] == 1
    assert s.dead_letters()["jobs"][0]["error"] == "boom"
    assert s.replay("jobs") == 1
    (job,) = s.claim_jobs("w", 10, 1, 3)
    assert job.attempts == 1


def test_a_job_whose_worker_dies_is_claimed_at_most_max_attempts_times(
    store: tuple[JobStore, Clock],
) -> None:
    """The claim itself ends a poison job: no race with the lease sweep decides it."""
    s, clock = store
    s.record_instance(record("5.1"))
    s.record_instance(record("5.2"))
    for attempt in (1, 2):
        (job,) = s.claim_jobs("w", 10, 1, max_attempts=2)  # the worker dies holding it
        assert (job.attempts, job.report_reason) == (attempt, None)
        clock.now += 11
        if attempt == 1:
            assert s.expire_leases(max_attempts=2) == 1  # the sweep requeues, counts the attempt
            assert s.job_info("5.1") == ("queued", 1, "worker died during processing")
    assert s.expire_leases(max_attempts=2) == 0  # spent: left for a worker to report
    report, other = s.claim_jobs("w", 10, 5, max_attempts=2)
    assert report.report_reason == "worker died during processing 2 times"
    assert other.report_reason is None and other.sop_instance_uid == "5.2"
    outcome = JobOutcome("not_processed", None, report.report_reason, {})
    s.complete_job(report.job_id, "w", outcome, [SendSpec("pacs", DestinationKind.DICOM, "9.5.1", "sr.dcm")])
    assert s.job_info("5.1") == ("not_processed", 3, "worker died during processing 2 times")
    assert s.status()["outbound"]["pacs"]["pending"] == 1


def test_a_job_whose_report_also_dies_ends_dead(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.record_instance(record("5.3"))
    s.record_instance(record("5.4"))
    s.claim_jobs("w", 10, 1, max_attempts=1)  # attempt 1 dies
    clock.now += 11
    (report,) = s.claim_jobs("w", 10, 1, max_attempts=1)  # the report dies too
    assert report.report_reason == "worker died during processing 1 times"
    clock.now += 11
    (job,) = s.claim_jobs("w", 10, 5, max_attempts=1)  # the dead one is not handed out
    assert job.sop_instance_uid == "5.4"
    state, attempts, error = s.job_info("5.3")  # type: ignore[misc]
    assert (state, attempts) == ("dead", 2)
    assert error is not None and "again while reporting" in error
    assert s.dead_letters()["jobs"][0]["job_id"] == report.job_id


def test_the_job_with_an_error_and_then_a_death_names_both(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.record_instance(record("5.5"))
    (job,) = s.claim_jobs("w", 10, 1, max_attempts=2)
    assert s.fail_job(job.job_id, "w", "cascade error: boom", 2, 0) is JobState.FAILED
    s.claim_jobs("w", 10, 1, max_attempts=2)  # attempt 2 dies
    clock.now += 11
    (report,) = s.claim_jobs("w", 10, 1, max_attempts=2)
    assert report.report_reason == (
        "processing did not finish in 2 attempts: cascade error: boom; "
        "then worker died during processing"
    )


def test_complete_records_result_and_sends_once(store: tuple[JobStore, Clock]) -> None:
    s, _ = store
    s.record_instance(record("6.1"))
    (job,) = s.claim_jobs("w", 10, 1, 3)
    sends = [SendSpec("pacs", DestinationKind.DICOM, "9.9.1", "a/b.dcm"), SendSpec("pacs2", DestinationKind.DICOM, "9.9.1", "a/b.dcm")]
    s.complete_job(job.job_id, "w", JobOutcome("positive", 0.9, None, {"k": 1}), sends)
    assert s.is_own_object("9.9.1")
    # a re-run producing the same UIDs queues nothing new
    s.add_sends([SendSpec("pacs", DestinationKind.DICOM, "9.9.1", "a/b.dcm")])
    status = s.status()
    idle = {"sending": 0, "committing": 0, "sent": 0, "dead": 0, "superseded": 0}
    assert status["outbound"] == {"pacs": {"pending": 1, **idle}, "pacs2": {"pending": 1, **idle}}
    assert status["results"] == {"positive": 1}
    assert s.study_results("1.2.3")[0][1] == {"k": 1}


def test_send_backoff_dead_and_replay(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.add_sends([SendSpec("pacs", DestinationKind.DICOM, "7.1", "x.dcm")])
    backoff = Backoff(base_s=10, cap_s=100, jitter=0.0)
    rng = random.Random(1)
    (send,) = s.claim_sends(60, 10)
    assert s.mark_send_failed(send.send_id, "down", 2, backoff, rng) is SendState.PENDING
    clock.now += 9
    assert s.claim_sends(60, 10) == []
    clock.now += 2
    (send,) = s.claim_sends(60, 10)
    assert send.attempts == 2
    assert s.mark_send_failed(send.send_id, "down", 2, backoff, rng) is SendState.DEAD
    assert s.status()["outbound"]["pacs"]["dead"] == 1
    assert s.replay("sends") == 1
    (send,) = s.claim_sends(60, 10)
    s.mark_sent(send.send_id)
    assert s.status()["outbound"]["pacs"]["sent"] == 1


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    b = Backoff(base_s=2, cap_s=50, jitter=0.2)
    rng = random.Random(0)
    for attempt, nominal in ((1, 2), (2, 4), (3, 8), (6, 50), (30, 50)):
        d = b.delay(attempt, rng)
        assert nominal * 0.8 <= d <= nominal * 1.2
    with pytest.raises(ValueError, match="attempt"):
        b.delay(0, rng)


def _hold_write_lock(db: Path, seconds: float, held: threading.Event) -> threading.Thread:
    """Another connection holds SQLite's write lock (BEGIN IMMEDIATE) for ``seconds``."""

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread


def test_a_lock_longer_than_the_busy_timeout_is_waited_for_or_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers wait for the lock; the receiver's write gives up after the busy timeout."""
    db = tmp_path / "q.db"
    s = JobStore.open(f"sqlite:///{db}", busy_timeout_s=0.2)
    s.record_instance(record("8.1"))
    try:
        holder = _hold_write_lock(db, 1.5, threading.Event())
        with pytest.raises(DatabaseBusy, match="locked"):
            s.receive(record("8.2"))
        (job,) = s.claim_jobs("w", 10, 1, 3)  # waits until the holder commits
        assert not holder.is_alive()
        assert job.sop_instance_uid == "8.1"
        assert s.job_info("8.2") is None  # the refused write left nothing behind
        # a process that opens the queue while the lock is held waits too
        holder = _hold_write_lock(db, 1.0, threading.Event())
        other = JobStore.open(f"sqlite:///{db}", busy_timeout_s=0.2)
        assert not holder.is_alive()
        assert other.job_info("8.1") == ("running", 1, None)
        other.close()
    finally:
        s.close()
    assert "Traceback" not in caplog.text
    assert "the database is locked by another connection; waiting" in caplog.text


def test_objects_that_are_not_processed_are_recorded_without_a_job(
    store: tuple[JobStore, Clock],
) -> None:
    from dataclasses import replace

    from spine_node.results.types import CascadeResult, ResultRecord, Status
    from spine_node.worklist import build_worklist

    s, _ = store
    assert s.receive(record("7.1", study="7"))[0] == "new"
    dose_sr = replace(record("7.2", study="7"), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67",
                      category="not_image", category_reason="X-Ray Radiation Dose SR Storage",
                      queue_job=False)
    ct = replace(record("7.3", study="7"), category="out_of_scope",
                 category_reason="modality CT is outside the intended use (CR, DX)",
                 queue_job=False)
    assert s.receive(dose_sr) == ("recorded", None)
    assert s.receive(ct) == ("recorded", None)
    assert s.receive(dose_sr) == ("duplicate", None)
    assert s.job_state("7.2") is None and s.job_state("7.3") is None
    status = s.status()
    assert status["instances"] == 3 and status["jobs"]["queued"] == 1
    assert status["categories"] == {"image": 1, "not_image": 1, "out_of_scope": 1}
    [job] = s.claim_jobs("w", 60, 5, 3)
    negative = CascadeResult("7.1", Status.NEGATIVE, score=0.1, threshold=0.5)
    s.complete_job(job.job_id, "w", JobOutcome("negative", 0.1, None,
                                               ResultRecord("7", negative).to_json()), [])
    [study] = s.studies()
    assert study["ignored"] == {"not_image": 1, "out_of_scope": 1}
    [row] = build_worklist([study])
    assert (row["n_images"], row["n_not_image"], row["n_out_of_scope"]) == (1, 1, 1)
    assert row["priority"] == "negative"  # ignored objects do not change the priority


def test_part_files_of_running_writers_survive_a_restart(tmp_path: Path) -> None:
    """A shared spool/outbox: a process that starts removes only dead writers' part files."""
    import os
    import socket

    from spine_node.spool import remove_stale_parts, write_durable

    folder = tmp_path / "ab"
    folder.mkdir()
    host = socket.gethostname()
    live = folder / f".incoming-{os.getpid()}@{host}@x1.part"
    gone = folder / f".incoming-999999999@{host}@x2.part"  # no such pid
    legacy = folder / ".incoming-abc.part"  # written before part files named their writer
    foreign = folder / ".incoming-12@otherhost@x3.part"
    for path in (live, gone, legacy, foreign):
        path.write_bytes(b"x")
    assert remove_stale_parts(tmp_path) == 2
    assert live.exists() and foreign.exists()
    assert not gone.exists() and not legacy.exists()
    assert remove_stale_parts(tmp_path, now=time.time() + 2 * 24 * 3600) == 1  # foreign, old
    assert live.exists()
    write_durable(tmp_path, "ab/y.dcm", b"data")
    assert (folder / "y.dcm").read_bytes() == b"data"


def test_an_outcome_speaks_the_result_vocabulary() -> None:
    from spine_node.results.types import Status

    assert JobOutcome("negative", 0.1, None, {}).status is Status.NEGATIVE
    assert JobState.NOT_PROCESSED.value == Status.NOT_PROCESSED.value
    with pytest.raises(ValueError, match="'abnormal'"):
        JobOutcome("abnormal", 0.9, None, {})
    with pytest.raises(ValueError, match="content_sha256 must be 64 lowercase hex digits"):
        JobOutcome("negative", 0.1, None, {}, None, "AB" * 32)
    with pytest.raises(TypeError, match="content_sha256 must be a str or None"):
        JobOutcome("negative", 0.1, None, {}, None, b"ab" * 32)  # type: ignore[arg-type]


def test_complete_job_records_the_analysed_hash_and_last_job_in_its_commit(
    store: tuple[JobStore, Clock],
) -> None:
    """One commit per image: the result, the analysed file's hash (re-send detection) and the
    worker's last job are written together."""
    from spine_node.store import Monitor, WorkerIdentity

    s, _ = store
    monitor = Monitor(s)
    monitor.beat(WorkerIdentity("w1", "host", 1, "bundle", "1.0", "ab" * 32), started_at=0.0)
    s.receive(record("1.2.3.1"))
    (job,) = s.claim_jobs("w1", 60.0, 1, 3)
    s.complete_job(job.job_id, "w1", JobOutcome("negative", 0.1, None, {}, "1.0", "0f" * 32), [])
    # the PostgreSQL database is shared: other tests' workers may have beaten there too
    (worker,) = [w for w in monitor.workers() if w["owner"] == "w1"]
    assert worker["last_job_id"] == job.job_id
    assert monitor.resent_with_new_content("1.2.3.1", "0f" * 32) is None  # the bytes analysed
    assert monitor.analysis_revision(job.job_id) == 1
    assert monitor.resent_with_new_content("1.2.3.1", "1e" * 32) == job.job_id  # other bytes
    assert monitor.analysis_revision(job.job_id) == 2


def test_study_delivery_supersede_and_webhook_update(store: tuple[JobStore, Clock]) -> None:
    """Per-study RIS state from the newest HL7 send per destination; an older send is
    superseded by a newer one; a posted webhook is queued again once per change."""
    from spine_node.store import Monitor

    s, _ = store
    monitor = Monitor(s)
    hl7, hook = DestinationKind.HL7, DestinationKind.WEBHOOK
    s.add_sends([SendSpec("ris", hl7, "hl7:S:1", "a/1.hl7", "S"),
                 SendSpec("ris2", hl7, "hl7:S:1", "a/2.hl7", "S"),
                 SendSpec("hook", hook, "webhook:S:1", "a/1.json", "S")])
    assert monitor.study_delivery(["S", "T"]) == {
        "S": {"ris": "pending", "commitment": None}, "T": {"ris": None, "commitment": None}}
    rng, backoff = random.Random(0), Backoff(1.0, 1.0, 0.0)
    ids = {c.destination: c.send_id for c in s.claim_sends(60.0, 10)}
    s.mark_sent(ids["ris"])
    assert monitor.study_delivery(["S"])["S"]["ris"] == "pending"  # ris2 still owes it
    assert s.mark_send_failed(ids["ris2"], "ACK AE", 1, backoff, rng) is SendState.DEAD
    assert monitor.study_delivery() == {"S": {"ris": "dead", "commitment": None}}
    assert s.queue_webhook_update("S", "ris-dead") == 0  # the webhook was not posted yet
    s.mark_sent(ids["hook"])
    assert s.queue_webhook_update("S", "ris-dead") == 1
    assert s.queue_webhook_update("S", "ris-dead") == 0  # once per change
    assert s.supersede_if_newer(ids["ris2"]) is None  # nothing newer yet
    s.add_sends([SendSpec("ris2", hl7, "hl7:S:2", "a/3.hl7", "S")])
    assert monitor.study_delivery(["S"])["S"]["ris"] == "pending"  # the newest counts
    newer = s.supersede_if_newer(ids["ris2"])
    assert newer is not None and newer > ids["ris2"]
    counts = s.status()["outbound"]
    assert counts["ris2"]["superseded"] == 1 and counts["ris2"]["pending"] == 1
    assert counts["hook"]["pending"] == 1  # the update, same body


def test_storage_commitment_states(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    for uid in ("7.1", "7.2"):
        s.record_instance(record(uid, study="7.7"))
    for job in s.claim_jobs("w", 10, 2, 3):
        s.complete_job(job.job_id, "w", JobOutcome("negative", 0.1, None, {"k": 1}),
                       [SendSpec("pacs", DestinationKind.DICOM, f"9.7.{job.job_id}", "a/b.dcm")])
    c = Commitments(s)
    claimed = s.claim_sends(60, 10)
    for send in claimed:
        c.stored(send.send_id, 60)  # C-STORE success: committing, leased to this dispatcher
    assert c.claim_due(60, 10) == []
    ids = sorted(send.send_id for send in claimed)
    assert c.begin(ids, "2.25.1", 30, 2) == (ids, [])
    assert c.open_transactions() == {"2.25.1": 2}
    assert c.study_states(["pacs"]) == {"7.7": "pending"}
    assert s.status()["outbound"]["pacs"]["committing"] == 2
    clock.now += 5
    assert Monitor(s).oldest_pending_send_age() == 5.0  # stored is not delivered

    committed, failed = (send.object_uid for send in sorted(claimed, key=lambda x: x.send_id))
    counts = c.record_report("2.25.1", [committed], {failed: "no such object instance (0x0112)"},
                             {"pacs": 2})
    assert counts == {"committed": 1, "resend": 1, "dead": 0, "unknown": 0}
    assert c.studies_of(transaction_uid="2.25.1") == ["7.7"]
    assert c.is_open("2.25.1") is False
    outbound = s.status()["outbound"]["pacs"]
    assert (outbound["sent"], outbound["pending"]) == (1, 1)
    # the same report again changes nothing
    assert c.record_report("2.25.1", [committed, failed], {}, {"pacs": 2})["unknown"] == 2

    # the failed object is sent again and asked again; no report comes: asked no more, dead
    (again,) = s.claim_sends(60, 10)
    c.stored(again.send_id, 60)
    assert c.begin([again.send_id], "2.25.2", 30, 2) == ([again.send_id], [])
    assert c.claim_due(60, 10) == []  # its report is not overdue yet
    clock.now += 31
    (due,) = c.claim_due(60, 10)
    assert c.begin([due.send_id], "2.25.3", 30, 2) == ([], [due.send_id])
    assert c.study_states(["pacs"]) == {"7.7": "dead"}
    assert c.study_states(["other"]) == {} and c.study_states([]) == {}
    (dead,) = s.dead_letters()["sends"]
    assert dead["error"] == "no storage commitment report within 30 s after 2 request(s)"
    # replay: stored and asked again, its requests counted afresh
    assert s.replay("sends") == 1
    (replayed,) = s.claim_sends(60, 10)
    c.stored(replayed.send_id, 60)
    assert c.begin([replayed.send_id], "2.25.4", 30, 2) == ([replayed.send_id], [])

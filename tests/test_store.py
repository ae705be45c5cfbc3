"""The queue on SQLite and on PostgreSQL: same code, same behaviour."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from spine_node.store import (
    Backoff,
    InstanceRecord,
    JobOutcome,
    JobState,
    JobStore,
    LeaseLost,
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
            jobs = s.claim_jobs(owner, 60, 3)
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
    (job,) = s.claim_jobs("crashed", lease_s=10, limit=5)
    assert s.claim_jobs("other", 10, 5) == []
    clock.now += 11
    (again,) = s.claim_jobs("other", 10, 5)
    assert again.job_id == job.job_id and again.attempts == 2
    with pytest.raises(LeaseLost):
        s.complete_job(job.job_id, "crashed", JobOutcome("negative", 0.1, None, {}), [])
    s.complete_job(again.job_id, "other", JobOutcome("negative", 0.1, None, {}), [])
    assert s.job_state("3.1") == "done"


def test_failures_retry_with_backoff_then_dead_and_replay(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.record_instance(record("4.1"))
    for attempt in (1, 2):
        (job,) = s.claim_jobs("w", 10, 1)
        assert job.attempts == attempt
        assert s.fail_job(job.job_id, "w", "boom", max_attempts=3, retry_delay_s=5) is JobState.FAILED
        assert s.claim_jobs("w", 10, 1) == []  # backoff holds it
        clock.now += 6
    (job,) = s.claim_jobs("w", 10, 1)
    assert s.fail_job(job.job_id, "w", "boom", 3, 5) is JobState.DEAD
    clock.now += 100
    assert s.claim_jobs("w", 10, 1) == []
    assert s.status()["jobs"]["dead"] == 1
    assert s.dead_letters()["jobs"][0]["error"] == "boom"
    assert s.replay("jobs") == 1
    (job,) = s.claim_jobs("w", 10, 1)
    assert job.attempts == 1


def test_expire_leases_kills_poison_job(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.record_instance(record("5.1"))
    for _ in range(2):
        s.claim_jobs("w", 10, 1)
        clock.now += 11
        s.expire_leases(max_attempts=2)
    assert s.job_state("5.1") == "dead"


def test_complete_records_result_and_sends_once(store: tuple[JobStore, Clock]) -> None:
    s, _ = store
    s.record_instance(record("6.1"))
    (job,) = s.claim_jobs("w", 10, 1)
    sends = [SendSpec("pacs", "dicom", "9.9.1", "a/b.dcm"), SendSpec("pacs2", "dicom", "9.9.1", "a/b.dcm")]
    s.complete_job(job.job_id, "w", JobOutcome("positive", 0.9, None, {"k": 1}), sends)
    assert s.is_own_object("9.9.1")
    # a re-run producing the same UIDs queues nothing new
    s.add_sends([SendSpec("pacs", "dicom", "9.9.1", "a/b.dcm")])
    status = s.status()
    assert status["outbound"] == {"pacs": {"pending": 1, "sending": 0, "sent": 0, "dead": 0},
                                  "pacs2": {"pending": 1, "sending": 0, "sent": 0, "dead": 0}}
    assert status["results"] == {"positive": 1}
    assert s.study_results("1.2.3")[0][1] == {"k": 1}


def test_send_backoff_dead_and_replay(store: tuple[JobStore, Clock]) -> None:
    s, clock = store
    s.add_sends([SendSpec("pacs", "dicom", "7.1", "x.dcm")])
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

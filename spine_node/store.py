"""The durable queue: instances, jobs, results and outbound sends in SQLAlchemy 2.

One code path serves SQLite (one box; WAL, ``synchronous=FULL``, every transaction
``BEGIN IMMEDIATE`` so claims are exclusive) and PostgreSQL (several worker machines;
claims use ``SELECT ... FOR UPDATE SKIP LOCKED``).

Job states::

    queued --claim--> running --ok--> done | not_processed
                         |--error, attempts left--> failed (waits not_before) --claim--> running
                         |--error, attempts spent--> dead (or not_processed when a
                         |                           "processing failed" result could be made)
                         '--lease expired--> claimable again (attempt already counted)

Outbound states: ``pending`` (due at next_attempt_at) -> ``sending`` (leased) -> ``sent``,
or back to ``pending`` with exponential backoff, or ``dead`` after the last attempt.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    """States of a processing job."""

    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"
    DONE = "done"
    NOT_PROCESSED = "not_processed"
    DEAD = "dead"


class SendState(str, enum.Enum):
    """States of one outbound object for one destination."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


TERMINAL_JOB_STATES = (JobState.DONE, JobState.NOT_PROCESSED, JobState.DEAD)


class Base(DeclarativeBase):
    """Declarative base of the queue tables."""


class Instance(Base):
    """One received SOP instance (distinct SOP Instance UID)."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(128))
    study_instance_uid: Mapped[str] = mapped_column(String(128), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(128))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(128))
    calling_ae: Mapped[str] = mapped_column(String(16))
    spool_path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    spool_deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Job(Base):
    """Processing of one instance through the cascade."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Result(Base):
    """The outcome of a job: positive, negative or not_processed."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Outbound(Base):
    """One result object (or webhook call) for one destination."""

    __tablename__ = "outbound"
    __table_args__ = (UniqueConstraint("destination", "object_uid", name="uq_outbound_dest_obj"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), nullable=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    object_uid: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about a stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    spool_path: str
    size_bytes: int


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to one worker."""

    job_id: int
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str
    spool_path: str
    attempts: int


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job recorded."""

    status: str
    score: float | None
    reason: str | None
    payload: dict[str, Any]


@dataclass(frozen=True)
class SendSpec:
    """One object to deliver to one destination."""

    destination: str
    kind: str
    object_uid: str
    path: str


@dataclass(frozen=True)
class ClaimedSend:
    """An outbound send leased to one dispatcher."""

    send_id: int
    destination: str
    kind: str
    object_uid: str
    path: str
    attempts: int


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: ``min(cap, base * 2**(n-1)) * (1 +- jitter)``."""

    base_s: float
    cap_s: float
    jitter: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Return the delay before retry number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt!r}")
        raw = min(self.cap_s, self.base_s * 2 ** min(attempt - 1, 60))
        return float(max(0.0, raw * (1.0 + self.jitter * rng.uniform(-1.0, 1.0))))


class LeaseLost(RuntimeError):
    """The job's lease expired and another worker may own it now."""


def make_engine(url: str) -> Engine:
    """Create the engine with the pragmas (SQLite) that make the queue durable.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///path`` or ``postgresql+psycopg://...``.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _is_locked(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text


class JobStore:
    """Queue operations over one database. Every method is one short transaction.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        From :func:`make_engine`.
    clock : callable, optional
        Returns the current time in epoch seconds (injected by tests).
    """

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, clock: Callable[[], float] = time.time) -> JobStore:
        """Open (and create when needed) the queue database at ``url``."""
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        return cls(engine, clock)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    @contextmanager
    def _tx(self, retries: int = 5) -> Iterator[Session]:
        """One transaction; a locked SQLite database is retried, not fatal."""
        attempt = 0
        while True:
            session = self._sessions()
            try:
                with session.begin():
                    yield session
                return
            except OperationalError as exc:
                attempt += 1
                if not _is_locked(exc) or attempt > retries:
                    raise
                logger.warning("database locked, retrying (attempt %d)", attempt)
                time.sleep(0.05 * attempt)
            finally:
                session.close()

    # -- receiving ---------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Return True when the instance was received before."""
        with self._tx() as s:
            return (
                s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
                is not None
            )

    def is_own_object(self, sop_instance_uid: str) -> bool:
        """Return True when ``sop_instance_uid`` is one of the result objects this node made."""
        with self._tx() as s:
            return (
                s.scalar(
                    select(Outbound.id).where(Outbound.object_uid == sop_instance_uid).limit(1)
                )
                is not None
            )

    def record_instance(self, record: InstanceRecord) -> int | None:
        """Insert the instance and its queued job in one transaction.

        Returns
        -------
        int or None
            The new job's id; None when the SOP Instance UID was already known, or is one of
            our own result objects (nothing changes).
        """
        return self.receive(record)[1]

    def receive(self, record: InstanceRecord) -> tuple[str, int | None]:
        """What the receiver does after the file is durable, in one transaction.

        Returns
        -------
        (str, int or None)
            ``("new", job_id)``; ``("duplicate", None)`` when the instance was received before
            and its spooled file is kept; ``("duplicate_removed", None)`` when its spooled file
            was already removed by retention; ``("own", None)`` for a result object this node
            made (loop prevention). Only ``new`` changes the database.
        """
        now = self.clock()
        try:
            with self._tx() as s:
                existing = s.execute(
                    select(Instance.id, Instance.spool_deleted_at).where(
                        Instance.sop_instance_uid == record.sop_instance_uid
                    )
                ).first()
                if existing is not None:
                    return ("duplicate" if existing[1] is None else "duplicate_removed", None)
                if s.scalar(
                    select(Outbound.id).where(Outbound.object_uid == record.sop_instance_uid).limit(1)
                ):
                    return ("own", None)
                inst = Instance(
                    sop_instance_uid=record.sop_instance_uid,
                    sop_class_uid=record.sop_class_uid,
                    study_instance_uid=record.study_instance_uid,
                    series_instance_uid=record.series_instance_uid,
                    transfer_syntax_uid=record.transfer_syntax_uid,
                    calling_ae=record.calling_ae,
                    spool_path=record.spool_path,
                    size_bytes=record.size_bytes,
                    received_at=now,
                )
                s.add(inst)
                s.flush()
                job = Job(
                    instance_id=inst.id,
                    state=JobState.QUEUED.value,
                    attempts=0,
                    not_before=0.0,
                    created_at=now,
                    updated_at=now,
                )
                s.add(job)
                s.flush()
                job_id = int(job.id)
            return ("new", job_id)
        except IntegrityError:
            return ("duplicate", None)  # a concurrent association stored it first

    # -- jobs ----------------------------------------------------------------------------------

    def claim_jobs(self, owner: str, lease_s: float, limit: int) -> list[ClaimedJob]:
        """Lease up to ``limit`` claimable jobs to ``owner`` (oldest first).

        Claimable: queued; failed whose backoff has passed; running whose lease expired.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        now = self.clock()
        claimable = (
            (Job.state == JobState.QUEUED.value)
            | ((Job.state == JobState.FAILED.value) & (Job.not_before <= now))
            | ((Job.state == JobState.RUNNING.value) & (Job.lease_until < now))
        )
        with self._tx() as s:
            jobs = s.scalars(
                select(Job)
                .where(claimable)
                .order_by(Job.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            claimed = []
            for job in jobs:
                job.state = JobState.RUNNING.value
                job.attempts += 1
                job.lease_owner = owner
                job.lease_until = now + lease_s
                job.updated_at = now
                inst = s.get_one(Instance, job.instance_id)
                claimed.append(
                    ClaimedJob(
                        job.id,
                        inst.id,
                        inst.sop_instance_uid,
                        inst.study_instance_uid,
                        inst.spool_path,
                        job.attempts,
                    )
                )
            return claimed

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> None:
        """Extend a running job's lease.

        Raises
        ------
        LeaseLost
            When the job is no longer leased to ``owner``.
        """
        now = self.clock()
        with self._tx() as s:
            n = s.execute(
                update(Job)
                .where(
                    (Job.id == job_id)
                    & (Job.lease_owner == owner)
                    & (Job.state == JobState.RUNNING.value)
                )
                .values(lease_until=now + lease_s, updated_at=now)
            ).rowcount  # type: ignore[attr-defined]
            if n != 1:
                raise LeaseLost(f"job {job_id} is no longer leased to {owner}")

    def complete_job(
        self, job_id: int, owner: str, outcome: JobOutcome, sends: Sequence[SendSpec]
    ) -> None:
        """Record the result and its outbound sends, and end the job, in one transaction.

        Raises
        ------
        LeaseLost
            When the lease was lost (another worker may have processed it): nothing is written.
        """
        if outcome.status not in ("positive", "negative", "not_processed"):
            raise ValueError(
                f"outcome.status must be positive/negative/not_processed, got {outcome.status!r}"
            )
        now = self.clock()
        with self._tx() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.lease_owner != owner or job.state != JobState.RUNNING.value:
                raise LeaseLost(f"job {job_id} is no longer leased to {owner}")
            inst = s.get_one(Instance, job.instance_id)
            result = Result(
                job_id=job.id,
                instance_id=inst.id,
                study_instance_uid=inst.study_instance_uid,
                status=outcome.status,
                score=outcome.score,
                reason=outcome.reason,
                payload=json.dumps(outcome.payload, sort_keys=True),
                created_at=now,
            )
            s.add(result)
            s.flush()
            self._add_sends(s, result.id, sends, now)
            job.state = (
                JobState.NOT_PROCESSED.value
                if outcome.status == "not_processed"
                else JobState.DONE.value
            )
            job.lease_owner = None
            job.lease_until = None
            job.last_error = outcome.reason if outcome.status == "not_processed" else None
            job.updated_at = now

    def _add_sends(
        self, s: Session, result_id: int | None, sends: Sequence[SendSpec], now: float
    ) -> None:
        for spec in sends:
            exists = s.scalar(
                select(Outbound.id).where(
                    (Outbound.destination == spec.destination)
                    & (Outbound.object_uid == spec.object_uid)
                )
            )
            if exists is not None:
                continue  # same UID already queued or sent: the PACS must not get a duplicate
            s.add(
                Outbound(
                    result_id=result_id,
                    destination=spec.destination,
                    kind=spec.kind,
                    object_uid=spec.object_uid,
                    path=spec.path,
                    state=SendState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
            )

    def add_sends(self, sends: Sequence[SendSpec]) -> None:
        """Queue extra outbound objects not tied to one result (study-level webhooks)."""
        with self._tx() as s:
            self._add_sends(s, None, sends, self.clock())

    def fail_job(
        self, job_id: int, owner: str, error: str, max_attempts: int, retry_delay_s: float
    ) -> JobState:
        """Record a failed attempt: retry later, or ``dead`` when attempts are spent.

        Returns
        -------
        JobState
            ``FAILED`` (will be retried) or ``DEAD``.
        """
        now = self.clock()
        with self._tx() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.lease_owner != owner:
                raise LeaseLost(f"job {job_id} is no longer leased to {owner}")
            final = job.attempts >= max_attempts
            job.state = JobState.DEAD.value if final else JobState.FAILED.value
            job.last_error = error[:2000]
            job.lease_owner = None
            job.lease_until = None
            job.not_before = now + retry_delay_s
            job.updated_at = now
            return JobState(job.state)

    def expire_leases(self, max_attempts: int) -> int:
        """Release running jobs whose lease expired; those out of attempts become ``dead``.

        Returns
        -------
        int
            How many jobs were released.
        """
        now = self.clock()
        with self._tx() as s:
            jobs = s.scalars(
                select(Job).where((Job.state == JobState.RUNNING.value) & (Job.lease_until < now))
            ).all()
            for job in jobs:
                if job.attempts >= max_attempts:
                    job.state = JobState.DEAD.value
                    job.last_error = (
                        f"worker stopped during the last of {job.attempts} attempts (lease expired)"
                    )
                else:
                    job.state = JobState.QUEUED.value
                job.lease_owner = None
                job.lease_until = None
                job.updated_at = now
            return len(jobs)

    def job_state(self, sop_instance_uid: str) -> str | None:
        """Return the state of the job of an instance (None when unknown)."""
        with self._tx() as s:
            return s.scalar(
                select(Job.state)
                .join(Instance, Instance.id == Job.instance_id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            )

    # -- outbound ----------------------------------------------------------------------------

    def claim_sends(self, lease_s: float, limit: int) -> list[ClaimedSend]:
        """Lease due outbound sends (pending and due, or sending with an expired lease)."""
        now = self.clock()
        due = ((Outbound.state == SendState.PENDING.value) & (Outbound.next_attempt_at <= now)) | (
            (Outbound.state == SendState.SENDING.value) & (Outbound.lease_until < now)
        )
        with self._tx() as s:
            rows = s.scalars(
                select(Outbound)
                .where(due)
                .order_by(Outbound.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            out = []
            for row in rows:
                row.state = SendState.SENDING.value
                row.attempts += 1
                row.lease_until = now + lease_s
                out.append(
                    ClaimedSend(
                        row.id, row.destination, row.kind, row.object_uid, row.path, row.attempts
                    )
                )
            return out

    def mark_sent(self, send_id: int) -> None:
        """Record a confirmed delivery."""
        now = self.clock()
        with self._tx() as s:
            s.execute(
                update(Outbound)
                .where(Outbound.id == send_id)
                .values(state=SendState.SENT.value, sent_at=now, lease_until=None, last_error=None)
            )

    def mark_send_failed(
        self, send_id: int, error: str, max_attempts: int, backoff: Backoff, rng: random.Random
    ) -> SendState:
        """Record a failed delivery: retry after backoff, or ``dead`` after the last attempt."""
        now = self.clock()
        with self._tx() as s:
            row = s.get_one(Outbound, send_id)
            if row.attempts >= max_attempts:
                row.state = SendState.DEAD.value
            else:
                row.state = SendState.PENDING.value
                row.next_attempt_at = now + backoff.delay(row.attempts, rng)
            row.lease_until = None
            row.last_error = error[:2000]
            return SendState(row.state)

    # -- operations ----------------------------------------------------------------------------

    def replay(self, what: str, ids: Sequence[int] = ()) -> int:
        """Requeue dead sends (``what="sends"``) or dead/failed jobs (``what="jobs"``).

        Returns
        -------
        int
            How many rows were requeued.
        """
        now = self.clock()
        with self._tx() as s:
            if what == "sends":
                cond: Any = Outbound.state == SendState.DEAD.value
                if ids:
                    cond = cond & Outbound.id.in_(ids)
                stmt: Any = (
                    update(Outbound)
                    .where(cond)
                    .values(state=SendState.PENDING.value, attempts=0, next_attempt_at=now)
                )
            elif what == "jobs":
                jcond: Any = Job.state.in_([JobState.DEAD.value, JobState.FAILED.value])
                if ids:
                    jcond = jcond & Job.id.in_(ids)
                stmt = (
                    update(Job)
                    .where(jcond)
                    .values(state=JobState.QUEUED.value, attempts=0, not_before=0.0, updated_at=now)
                )
            else:
                raise ValueError(f"what must be 'sends' or 'jobs', got {what!r}")
            return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]

    def status(self) -> dict[str, Any]:
        """Counts for ``spine-node status``."""
        now = self.clock()
        with self._tx() as s:
            instances = s.scalar(select(func.count(Instance.id))) or 0
            jobs = {state.value: 0 for state in JobState}
            for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                jobs[state] = n
            outbound: dict[str, dict[str, int]] = {}
            for dest, state, n in s.execute(
                select(Outbound.destination, Outbound.state, func.count()).group_by(
                    Outbound.destination, Outbound.state
                )
            ):
                outbound.setdefault(dest, {st.value: 0 for st in SendState})[state] = n
            oldest = s.scalar(
                select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED.value)
            )
            results = {}
            for status, n in s.execute(select(Result.status, func.count()).group_by(Result.status)):
                results[status] = n
        return {
            "instances": instances,
            "jobs": jobs,
            "results": results,
            "outbound": outbound,
            "oldest_queued_age_s": None if oldest is None else round(now - oldest, 3),
        }

    def dead_letters(self, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        """Dead jobs and dead sends with their last errors (for status output)."""
        with self._tx() as s:
            jobs = [
                {"job_id": j.id, "attempts": j.attempts, "error": j.last_error}
                for j in s.scalars(
                    select(Job)
                    .where(Job.state == JobState.DEAD.value)
                    .order_by(Job.id)
                    .limit(limit)
                )
            ]
            sends = [
                {
                    "send_id": o.id,
                    "destination": o.destination,
                    "kind": o.kind,
                    "attempts": o.attempts,
                    "error": o.last_error,
                }
                for o in s.scalars(
                    select(Outbound)
                    .where(Outbound.state == SendState.DEAD.value)
                    .order_by(Outbound.id)
                    .limit(limit)
                )
            ]
        return {"jobs": jobs, "sends": sends}

    def study_results(self, study_instance_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """All results of one study as ``(sop_instance_uid, payload)`` pairs."""
        with self._tx() as s:
            rows = s.execute(
                select(Instance.sop_instance_uid, Result.payload)
                .join(Result, Result.instance_id == Instance.id)
                .where(Result.study_instance_uid == study_instance_uid)
                .order_by(Result.id)
            ).all()
        return [(uid, json.loads(payload)) for uid, payload in rows]

    def studies(self) -> list[dict[str, Any]]:
        """Every study with results: first arrival time and its results (for the worklist)."""
        with self._tx() as s:
            rows = s.execute(
                select(
                    Result.study_instance_uid,
                    Instance.sop_instance_uid,
                    Instance.received_at,
                    Result.payload,
                )
                .join(Instance, Instance.id == Result.instance_id)
                .order_by(Instance.received_at)
            ).all()
        studies: dict[str, dict[str, Any]] = {}
        for study_uid, sop_uid, received_at, payload in rows:
            entry = studies.setdefault(
                study_uid, {"study_instance_uid": study_uid, "arrival": received_at, "results": []}
            )
            entry["results"].append((sop_uid, json.loads(payload)))
        return list(studies.values())

    def deliverable_spool(self, older_than: float) -> list[tuple[int, str]]:
        """Instances whose job is terminal, all sends delivered, received before ``older_than``."""
        with self._tx() as s:
            pending_sends = (
                select(Result.instance_id)
                .join(Outbound, Outbound.result_id == Result.id)
                .where(Outbound.state != SendState.SENT.value)
            )
            rows = s.execute(
                select(Instance.id, Instance.spool_path)
                .join(Job, Job.instance_id == Instance.id)
                .where(
                    Job.state.in_([st.value for st in TERMINAL_JOB_STATES])
                    & (Instance.received_at < older_than)
                    & Instance.spool_deleted_at.is_(None)
                    & Instance.id.not_in(pending_sends)
                )
            ).all()
        return [(int(i), str(p)) for i, p in rows]

    def mark_spool_deleted(self, instance_id: int) -> None:
        """Record that an instance's spool file was removed by retention."""
        with self._tx() as s:
            s.execute(
                update(Instance)
                .where(Instance.id == instance_id)
                .values(spool_deleted_at=self.clock())
            )

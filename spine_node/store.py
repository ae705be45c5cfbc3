"""The durable queue: instances, jobs, results and outbound sends in SQLAlchemy 2.

One code path serves SQLite (one box; WAL, ``synchronous=FULL``, every transaction
``BEGIN IMMEDIATE`` so claims are exclusive) and PostgreSQL (several worker machines;
claims use ``SELECT ... FOR UPDATE SKIP LOCKED``).

Job states::

    queued --claim--> running --ok--> done | not_processed
                         |--error, attempts left--> failed (waits not_before) --claim--> running
                         |--error, attempts spent--> not_processed ("processing failed" result)
                         |                           or dead when even that cannot be made
                         '--lease expired (worker died)--> claimable again (attempt counted)

A job is processed at most ``job_max_attempts`` times whatever ended its attempts: the claim
that finds a job's attempts spent hands it to the worker to report "not processed" (the
worker writes that result without decoding pixels); if that claim's worker dies too, the job
ends ``dead``. A locked SQLite database is waited for, never an error (see
:func:`retry_while_locked`), except in :meth:`JobStore.receive`, which gives up after the busy
timeout so the receiver can answer "out of resources".

Outbound states: ``pending`` (due at next_attempt_at) -> ``sending`` (leased) -> ``sent``,
or back to ``pending`` with exponential backoff, or ``dead`` after the last attempt. At a
destination with Storage Commitment a stored object is ``committing`` until the peer's report
confirms it (``sent``), reports it failed (``pending``: sent again, then asked again) or the
requests are spent (``dead``); a committing object's ``commitment_uid`` is the Transaction UID
of its latest request and ``next_attempt_at`` when it is asked again (report overdue).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import random
import re
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    mapped_column,
    sessionmaker,
)

from spine_node.feedback import FeedbackEntry
from spine_node.results.types import Status
from spine_node.timing import check_stage_seconds

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Execution option of :meth:`JobStore.read` connections: SQLite begins a deferred transaction.
READ_ONLY_OPTION = "spine_node_read_only"
#: A SHA-256 digest as ``hashlib``'s ``hexdigest`` writes it.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: How long one SQLite statement waits for another connection's write lock (``busy_timeout``).
DEFAULT_BUSY_TIMEOUT_S = 30.0
#: Pause between two tries when the database stayed locked for a whole busy timeout.
_RETRY_PAUSE_S = (0.05, 1.0)
#: While waiting for a locked database, a warning is logged at most this often.
_LOCK_LOG_EVERY_S = 30.0


class JobState(str, enum.Enum):
    """States of a processing job."""

    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"
    DONE = "done"
    NOT_PROCESSED = Status.NOT_PROCESSED.value  # the result's verdict, same word
    DEAD = "dead"


class SendState(str, enum.Enum):
    """States of one outbound object for one destination."""

    PENDING = "pending"
    SENDING = "sending"
    #: stored by the peer, waiting for its Storage Commitment report
    COMMITTING = "committing"
    SENT = "sent"
    DEAD = "dead"
    #: never sent, and never will be: a newer message of the same study to the same
    #: destination states the study's whole current state (HL7 ORU revisions)
    SUPERSEDED = "superseded"


#: Send states after which nothing more happens to a send (its outbox file may expire).
FINISHED_SEND_STATES = (SendState.SENT.value, SendState.SUPERSEDED.value)


class DestinationKind(str, enum.Enum):
    """How an outbound object is delivered; the dispatcher picks its sender by this kind."""

    DICOM = "dicom"  # C-STORE of a stored Part 10 file to a configured DICOM peer
    WEBHOOK = "webhook"  # HTTP POST of a stored JSON document to the destination's ``url``
    HL7 = "hl7"  # a stored HL7 v2 message over MLLP; delivered only on an accepting ACK


class DeliveryState(str, enum.Enum):
    """Where a study's delivery of one kind stands (``status``, worklist, webhook ``delivery``)."""

    DONE = "done"  # the newest message reached every destination (e.g. HL7: ACK AA)
    PENDING = "pending"  # queued, being sent, or waiting to retry
    DEAD = "dead"  # retries exhausted for a destination: an operator replays it


def delivery_state(states: Sequence[str]) -> DeliveryState | None:
    """Combine the send states of a study's newest message per destination into one.

    Parameters
    ----------
    states : sequence of str
        :class:`SendState` values, one per destination.

    Returns
    -------
    DeliveryState or None
        ``dead`` when any is dead, else ``pending`` when any is not sent yet, else ``done``;
        None when there are none (nothing of this kind is configured or queued).
    """
    if not states:
        return None
    if SendState.DEAD.value in states:
        return DeliveryState.DEAD
    if any(state not in FINISHED_SEND_STATES for state in states):
        return DeliveryState.PENDING
    return DeliveryState.DONE


#: The per-study delivery fields: ``ris`` (HL7 to the RIS); each kind adds its field here.
DELIVERY_KINDS: Mapping[str, DestinationKind] = {"ris": DestinationKind.HL7}
#: Every per-study delivery field: the kinds above, and ``commitment`` (Storage Commitment of
#: the study's result objects at the DICOM destinations that ask for it).
DELIVERY_FIELDS: tuple[str, ...] = (*DELIVERY_KINDS, "commitment")


@dataclass(frozen=True)
class DestinationRef:
    """A configured destination as the worker and the study reporter see it: name and kind.

    Attributes
    ----------
    name : str
        The destination's name (``[[destinations]] name``).
    kind : DestinationKind
        Its kind, which decides what is queued for it and which sender delivers it.
    """

    name: str
    kind: DestinationKind

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DestinationKind):
            raise TypeError(f"kind must be a DestinationKind, got {self.kind!r}")

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
    #: spine_node.sop_classes.Category: image, not_image or out_of_scope
    category: Mapped[str] = mapped_column(String(16), default="image", index=True)
    #: why an object is not processed (not an image, outside the intended use)
    category_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


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
    #: times the isolated decoder crashed or hung on this job's image (never reset)
    decoder_crashes: Mapped[int] = mapped_column(Integer, default=0)


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
    #: version of the model bundle that produced it (None: recorded before the node kept it)
    bundle_version: Mapped[str | None] = mapped_column(String(64), nullable=True)


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
    #: when it was delivered (or superseded: finished without being sent)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: the study a study-level send (summary SR, webhook, HL7) belongs to (None: a result's)
    study_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    #: failed delivery attempts (never reset, not even by replay: a counter for metrics)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    #: Transaction UID of the latest Storage Commitment request naming this object
    commitment_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: Storage Commitment requests made for this object (since it was queued or replayed)
    commit_attempts: Mapped[int] = mapped_column(Integer, default=0)


class DriftAlarm(Base):
    """The last drift check of one monitored statistic (one row; ``name`` "score")."""

    __tablename__ = "drift_alarms"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: spine_node.drift.DriftState value of the last check
    state: Mapped[str] = mapped_column(String(16))
    psi: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_window: Mapped[int] = mapped_column(Integer, default=0)
    #: 1 while the statistic is above its threshold (a crossing is logged once)
    alerting: Mapped[int] = mapped_column(Integer, default=0)
    checked_at: Mapped[float] = mapped_column(Float)
    #: when ``alerting`` last changed
    changed_at: Mapped[float] = mapped_column(Float)


class JobStageTime(Base):
    """Seconds one job's image spent in one inference stage (:class:`spine_node.timing.Stage`),
    written with its result; a batch stage's time is shared among the batch's images."""

    __tablename__ = "job_stage_times"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    stage: Mapped[str] = mapped_column(String(16), index=True)
    seconds: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[float] = mapped_column(Float)


class StudyState(Base):
    """The study-level summary's revision: bumped when what it states would change.

    ``report_due_at`` is set (with ``report_due_seq`` counted up) in the transaction that
    records an image's result, and cleared by the study report that queued the study's
    summary, or found it unchanged, after reading that result: while it is set the summary
    is owed (:meth:`JobStore.owed_studies`).
    """

    __tablename__ = "study_states"
    study_instance_uid: Mapped[str] = mapped_column(String(128), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    state_key: Mapped[str] = mapped_column(String(128), default="")
    queued_revision: Mapped[int] = mapped_column(Integer, default=0)
    document_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    document_series_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)
    #: when the last result not yet reported was recorded (None: no report owed)
    report_due_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    #: counted up with every recorded result (never reset): a report clears the mark only
    #: when no result was recorded since it read the study
    report_due_seq: Mapped[int] = mapped_column(Integer, default=0)
    #: owed reports of the study that failed in a row (reset when one is made, or a result is
    #: recorded): the next is tried no earlier than ``report_retry_at``
    report_failures: Mapped[int] = mapped_column(Integer, default=0)
    report_retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)


#: Columns added to existing tables after their first release: (table, column, SQL type).
_ADDED_COLUMNS = (
    ("study_states", "report_due_at", "FLOAT"),
    ("study_states", "report_due_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("outbound", "study_instance_uid", "VARCHAR(128)"),
    ("jobs", "decoder_crashes", "INTEGER NOT NULL DEFAULT 0"),
    ("outbound", "failures", "INTEGER NOT NULL DEFAULT 0"),
    ("outbound", "commitment_uid", "VARCHAR(64)"),
    ("outbound", "commit_attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("study_states", "report_failures", "INTEGER NOT NULL DEFAULT 0"),
    ("study_states", "report_retry_at", "FLOAT"),
    ("results", "bundle_version", "VARCHAR(64)"),
)


def _add_missing_columns(engine: Engine) -> None:
    """Add :data:`_ADDED_COLUMNS` to a database created before them (SQLite, PostgreSQL)."""
    with engine.begin() as conn:
        tables = inspect(conn)
        for table, column, sql_type in _ADDED_COLUMNS:
            if column not in {c["name"] for c in tables.get_columns(table)}:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


#: Indexes added after their tables' first release, for ``status`` and the status page
#: (counts by state per destination and by result status, recent studies by arrival):
#: part of the tables' metadata (created with them) and created on open when missing.
_ADDED_INDEXES = (
    Index("ix_instances_received_at", Instance.received_at),
    Index("ix_results_status", Result.status),
    Index("ix_outbound_destination_state", Outbound.destination, Outbound.state),
    # a study's last arrival in one index lookup (JobStore.study_page)
    Index("ix_instances_study_received", Instance.study_instance_uid, Instance.received_at),
)


#: :meth:`JobStore.recent_study_uids` reads the newest rows for pages up to this many studies
#: deep, and groups every study in SQL beyond (both orders are the same).
_STREAMED_STUDIES = 500


@dataclass(frozen=True)
class StudyCursor:
    """A study's place in the newest-first list of studies (keyset pagination).

    Studies are ordered by their last arrival, newest first, then by Study Instance UID
    (:meth:`JobStore.recent_study_uids` and :meth:`JobStore.study_page` agree on it).

    Attributes
    ----------
    last_arrival : float
        When its newest object was received, epoch seconds.
    study_instance_uid : str
        The study.

    Raises
    ------
    TypeError
        When a field has the wrong type.
    ValueError
        When ``last_arrival`` is not finite or the UID is empty.
    """

    last_arrival: float
    study_instance_uid: str

    def __post_init__(self) -> None:
        if not isinstance(self.last_arrival, (int, float)) or isinstance(self.last_arrival, bool):
            raise TypeError(f"last_arrival must be a float, got {self.last_arrival!r}")
        if not isinstance(self.study_instance_uid, str):
            raise TypeError(f"study_instance_uid must be a str, got {self.study_instance_uid!r}")
        if not math.isfinite(self.last_arrival):
            raise ValueError(f"last_arrival must be finite, got {self.last_arrival!r}")
        if not self.study_instance_uid:
            raise ValueError("study_instance_uid must not be empty")

    def to_text(self) -> str:
        """``LAST_ARRIVAL_UID`` (the float's repr: exact), for a URL."""
        return f"{self.last_arrival!r}_{self.study_instance_uid}"

    @classmethod
    def from_text(cls, text: str) -> StudyCursor:
        """Parse :meth:`to_text` output.

        Raises
        ------
        ValueError
            When ``text`` is not a cursor (naming it).
        """
        when, sep, uid = str(text).partition("_")
        try:
            if not sep:
                raise ValueError
            return cls(float(when), uid)
        except (TypeError, ValueError):
            raise ValueError(f"not a study cursor: {text!r}") from None


def _add_missing_indexes(engine: Engine) -> None:
    """Create :data:`_ADDED_INDEXES` in a database created before them."""
    for index in _ADDED_INDEXES:
        index.create(engine, checkfirst=True)


@dataclass(frozen=True)
class StudyImage:
    """One analysed image of a study, as stored: identity and result payload."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class StudySnapshot:
    """A study's analysed images and its summary revision, read in one transaction.

    ``changed`` is True when this call opened ``revision`` (what the summary states
    changed), or when ``revision`` was opened earlier but its document never queued; the
    caller then builds and queues the document for ``revision``. ``previous_document_uid``
    / ``previous_document_series_uid`` name the last document queued (its predecessor).
    ``report_due_seq`` is the study's count of recorded results when read (passed back to
    :meth:`JobStore.queue_study_document` to clear the owed report).
    """

    study_instance_uid: str
    revision: int
    changed: bool
    images: tuple[StudyImage, ...]
    previous_document_uid: str | None
    previous_document_series_uid: str | None
    report_due_seq: int = 0


@dataclass(frozen=True)
class OwedStudy:
    """A study whose summary report is owed (:meth:`JobStore.owed_studies`).

    ``spool_paths`` are its analysed images still in the spool (relative names); ``images``
    its analysed images as stored, whose payloads name the result objects made for them
    (``objects``, in the outbox unless expired): either gives the patient and study
    attributes for the document. ``failures``: the owed reports of the study that failed
    in a row before this one (0: the first attempt).
    """

    study_instance_uid: str
    spool_paths: tuple[str, ...]
    images: tuple[StudyImage, ...]
    failures: int = 0


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about a stored instance.

    ``category`` is a :class:`spine_node.sop_classes.Category` value and ``category_reason``
    says why an object is not processed; ``queue_job`` is False for objects that are only
    recorded (not an image; out of scope unless "not processed" reports are asked for).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    spool_path: str
    size_bytes: int
    category: str = "image"
    category_reason: str | None = None
    queue_job: bool = True


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to one worker."""

    job_id: int
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str
    spool_path: str
    attempts: int
    #: Set when the job's attempts are spent (its worker died each time): the worker must not
    #: run the cascade again but report the image "not processed" for this reason.
    report_reason: str | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job recorded.

    Attributes
    ----------
    status : Status
        The result's verdict (the one vocabulary of results, jobs and studies; a plain
        string naming one is converted).
    score, reason : float or None, str or None
        As in the result.
    payload : dict
        The result's JSON form (``ResultRecord.to_json``).
    bundle_version : str or None
        Version of the model bundle that produced it (``ModelInfo.version``; the score drift
        window counts only the results of the bundle in use). None: no bundle (tests).
    content_sha256 : str or None
        SHA-256 (64 hex digits) of the received file that was analysed, remembered with the
        result (a later re-send with other bytes is analysed again); None: not read (a
        report from the header of a job whose attempts are spent).

    Raises
    ------
    TypeError
        When ``bundle_version`` or ``content_sha256`` is neither a string nor None.
    ValueError
        When ``status`` names no :class:`Status`, ``bundle_version`` is empty or longer
        than 64 characters, or ``content_sha256`` is not 64 lowercase hex digits.
    """

    status: Status
    score: float | None
    reason: str | None
    payload: dict[str, Any]
    bundle_version: str | None = None
    content_sha256: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "status", Status(self.status))
        except ValueError:
            raise ValueError(
                f"outcome status must be one of {[s.value for s in Status]}, got {self.status!r}"
            ) from None
        version = self.bundle_version
        if version is not None and not isinstance(version, str):
            raise TypeError(f"bundle_version must be a str or None, got {type(version).__name__}")
        if version is not None and not 0 < len(version) <= 64:
            raise ValueError(f"bundle_version must be 1 to 64 characters, got {version!r}")
        digest = self.content_sha256
        if digest is not None and not isinstance(digest, str):
            raise TypeError(f"content_sha256 must be a str or None, got {type(digest).__name__}")
        if digest is not None and not _SHA256_HEX.fullmatch(digest):
            raise ValueError(f"content_sha256 must be 64 lowercase hex digits, got {digest!r}")


@dataclass(frozen=True)
class SendSpec:
    """One object to deliver to one destination.

    Attributes
    ----------
    destination : str
        The configured destination's name (of any kind).
    kind : DestinationKind
        How it is delivered.
    object_uid : str
        SOP Instance UID of the object (or the webhook document's key): unique per
        destination, so the same object is never queued twice.
    path : str
        The stored object, relative to the outbox.
    study_instance_uid : str or None
        The study of a study-level send (as received); None for a result's objects (their
        study is the result's).
    """

    destination: str
    kind: DestinationKind
    object_uid: str
    path: str
    study_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DestinationKind):
            raise TypeError(f"kind must be a DestinationKind, got {self.kind!r}")


@dataclass(frozen=True)
class ClaimedSend:
    """An outbound send leased to one dispatcher."""

    send_id: int
    destination: str
    kind: DestinationKind
    object_uid: str
    path: str
    attempts: int

    @classmethod
    def of(cls, row: Outbound) -> ClaimedSend:
        """The claimed form of an ``outbound`` row."""
        return cls(
            row.id, row.destination, DestinationKind(row.kind), row.object_uid, row.path,
            row.attempts,
        )  # fmt: skip


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


class DatabaseBusy(RuntimeError):
    """The database stayed locked by another connection for longer than the caller waits."""


def make_engine(url: str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Engine:
    """Create the engine with the pragmas (SQLite) that make the queue durable.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///path`` or ``postgresql+psycopg://...``.
    busy_timeout_s : float
        SQLite only: how long one statement waits for another connection's write lock
        before it fails with "database is locked" (which :class:`JobStore` then retries or
        reports, see its ``lock_wait_s``).

    Raises
    ------
    ValueError
        When ``busy_timeout_s`` is negative.
    """
    if busy_timeout_s < 0:
        raise ValueError(f"busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}
        )
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            if conn.get_execution_options().get(READ_ONLY_OPTION):
                conn.exec_driver_sql("BEGIN")  # deferred: a WAL reader takes no write lock
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _is_locked(exc: Exception) -> bool:
    """True for SQLite's "database is locked" / "database is busy" (another writer holds it)."""
    if not isinstance(exc, OperationalError | sqlite3.OperationalError):
        return False
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "database is locked" in text or "database is busy" in text


def retry_while_locked(op: Callable[[], T], wait_s: float | None, what: str) -> T:
    """Run ``op``; while it fails because the database is locked, wait and run it again.

    Each try already waits up to the SQLite busy timeout inside SQLite; this loop adds the
    caller's patience on top. No traceback is logged: one warning when the wait starts (and
    every 30 s while it lasts), one line when it is over.

    Parameters
    ----------
    op : callable
        One complete unit of work (a whole transaction), safe to run again after it failed.
    wait_s : float or None
        How long to keep trying after the first locked try; None waits until the lock is
        released (workers, dispatcher), 0 tries once (the receiver: the sender retries).
    what : str
        Names the operation in the log.

    Raises
    ------
    DatabaseBusy
        When the database is still locked after ``wait_s``.
    """
    started: float | None = None
    last_log = 0.0
    pause = _RETRY_PAUSE_S[0]
    while True:
        try:
            value = op()
        except (OperationalError, sqlite3.OperationalError) as exc:
            if not _is_locked(exc):
                raise
            now = time.monotonic()
            if started is None:
                started = now
            waited = now - started
            if wait_s is not None and waited >= wait_s:
                raise DatabaseBusy(
                    f"{what}: the database is locked by another connection"
                    + (f" (waited {waited:.1f} s)" if wait_s else "")
                ) from None
            if now - last_log >= _LOCK_LOG_EVERY_S:
                logger.warning("%s: the database is locked by another connection; waiting", what)
                last_log = now
            time.sleep(pause)
            pause = min(_RETRY_PAUSE_S[1], pause * 2)
            continue
        if started is not None:
            logger.info(
                "%s: the database lock was released after %.1f s", what, time.monotonic() - started
            )
        return value


class JobStore:
    """Queue operations over one database. Every method is one short transaction.

    A transaction that finds the database locked by another connection (SQLite) is run again
    as a whole (:func:`retry_while_locked`): workers and dispatchers wait for as long as the
    lock is held, while :meth:`receive` gives up after the busy timeout so that the receiver
    can answer "out of resources" and the sender retries.

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
    def open(
        cls,
        url: str,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> JobStore:
        """Open (and create when needed) the queue database at ``url``.

        A database locked by another process is waited for (no error while it stays locked).
        """
        engine = make_engine(url, busy_timeout_s)
        retry_while_locked(lambda: Base.metadata.create_all(engine), None, "opening the queue")
        retry_while_locked(lambda: _add_missing_columns(engine), None, "opening the queue")
        retry_while_locked(lambda: _add_missing_indexes(engine), None, "opening the queue")
        return cls(engine, clock)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def _run(self, fn: Callable[[Session], T], wait_s: float | None = None) -> T:
        """Run ``fn(session)`` in one transaction; rerun it whole while the database is locked.

        Parameters
        ----------
        fn : callable
            The transaction's body; it may run more than once, so it must only touch the
            session (and its own locals).
        wait_s : float or None
            See :func:`retry_while_locked` (None: wait until the lock is released).
        """

        def once() -> T:
            with self._sessions() as session, session.begin():
                return fn(session)

        what = getattr(fn, "__qualname__", "transaction").split(".<locals>.")[0]
        return retry_while_locked(once, wait_s, what)

    def read(self, fn: Callable[[Session], T], wait_s: float | None = None) -> T:
        """Run ``fn(session)`` in a read-only transaction (for metrics and monitoring pages).

        On SQLite the transaction is deferred (``BEGIN``, not ``BEGIN IMMEDIATE``): in WAL mode
        a reader sees a consistent snapshot and neither waits for nor blocks the writer, so a
        scrape never delays a C-STORE acknowledgement. ``fn`` must not write. On PostgreSQL it
        is an ordinary transaction.

        Parameters
        ----------
        fn, wait_s
            As for the store's write transactions (:func:`retry_while_locked`).
        """

        def once() -> T:
            with self.engine.connect() as conn:
                conn.execution_options(**{READ_ONLY_OPTION: True})
                with Session(bind=conn) as session, session.begin():
                    return fn(session)

        what = getattr(fn, "__qualname__", "read").split(".<locals>.")[0]
        return retry_while_locked(once, wait_s, what)

    # -- receiving ---------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Return True when the instance was received before."""

        def has_instance(s: Session) -> bool:
            found = s.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return found is not None

        return self._run(has_instance)

    def is_own_object(self, sop_instance_uid: str) -> bool:
        """Return True when ``sop_instance_uid`` is one of the result objects this node made."""

        def is_own_object(s: Session) -> bool:
            found = s.scalar(
                select(Outbound.id).where(Outbound.object_uid == sop_instance_uid).limit(1)
            )
            return found is not None

        return self._run(is_own_object)

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
            ``("new", job_id)``; ``("recorded", None)`` for an object recorded without a job
            (``record.queue_job`` False); ``("duplicate", None)`` when the instance was
            received before and its spooled file is kept; ``("duplicate_removed", None)`` when its spooled file
            was already removed by retention; ``("own", None)`` for a result object this node
            made (loop prevention). Only ``new`` and ``recorded`` change the database.

        Raises
        ------
        DatabaseBusy
            When another connection held the write lock for the whole busy timeout: the
            receiver answers "out of resources" and the sender retries (nothing was written).
        """
        now = self.clock()

        def receive(s: Session) -> tuple[str, int | None]:
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
                category=record.category,
                category_reason=record.category_reason,
            )
            s.add(inst)
            s.flush()
            if not record.queue_job:
                return ("recorded", None)
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
            return ("new", int(job.id))

        try:
            return self._run(receive, wait_s=0.0)
        except IntegrityError:
            return ("duplicate", None)  # a concurrent association stored it first

    # -- jobs ----------------------------------------------------------------------------------

    def claim_jobs(
        self, owner: str, lease_s: float, limit: int, max_attempts: int
    ) -> list[ClaimedJob]:
        """Lease up to ``limit`` claimable jobs to ``owner`` (oldest first).

        Claimable: queued; failed whose backoff has passed; running whose lease expired (its
        worker died or hung). A job is processed at most ``max_attempts`` times, however the
        earlier attempts ended: a claimable job whose attempts are spent is leased once more
        with :attr:`ClaimedJob.report_reason` set, and the worker reports it "not processed"
        without running the cascade. If even that claim's worker dies, the job ends ``dead``.

        Raises
        ------
        ValueError
            When ``limit`` or ``max_attempts`` is below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        now = self.clock()
        lease_expired = (Job.state == JobState.RUNNING.value) & (Job.lease_until < now)
        claimable = (
            (Job.state == JobState.QUEUED.value)
            | ((Job.state == JobState.FAILED.value) & (Job.not_before <= now))
            | lease_expired
        )

        def claim_jobs(s: Session) -> list[ClaimedJob]:
            jobs = s.scalars(
                select(Job)
                .where(claimable)
                .order_by(Job.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            claimed = []
            for job in jobs:
                died = job.state == JobState.RUNNING.value
                if died:
                    job.last_error = _died_error(job.last_error)
                report_reason = None
                if job.attempts > max_attempts:
                    # the worker died while writing the "not processed" report itself
                    job.state = JobState.DEAD.value
                    job.last_error = f"{job.last_error}; the worker died again while reporting it"
                    job.lease_owner = None
                    job.lease_until = None
                    job.updated_at = now
                    logger.error("job %d is dead: %s", job.id, job.last_error)
                    continue
                if job.attempts == max_attempts:
                    report_reason = _exhausted_reason(job.attempts, job.last_error)
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
                        report_reason,
                    )
                )
            return claimed

        return self._run(claim_jobs)

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> None:
        """Extend a running job's lease.

        Raises
        ------
        LeaseLost
            When the job is no longer leased to ``owner``.
        """
        now = self.clock()

        def renew_lease(s: Session) -> None:
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

        self._run(renew_lease)

    def complete_job(
        self,
        job_id: int,
        owner: str,
        outcome: JobOutcome,
        sends: Sequence[SendSpec],
        stage_seconds: Mapping[str, float] | None = None,
    ) -> None:
        """Record the result and its outbound sends, and end the job, in one transaction.

        The same transaction marks the study's summary report owed (``study_states``
        ``report_due_at``, the row created when absent), so that a report that fails or
        never runs after this commit is made later (:meth:`owed_studies`), records the
        seconds the image spent in each inference stage (``job_stage_times``), the analysed
        file's hash (``outcome.content_sha256``, ``analysed_content``) and the worker's last
        job (its ``worker_heartbeats`` row, when it has one): one commit per image, so the
        dispatcher woken by it finds the database free.

        Parameters
        ----------
        stage_seconds : Mapping[str, float], optional
            :class:`spine_node.timing.Stage` value -> seconds (for the metrics).

        Raises
        ------
        LeaseLost
            When the lease was lost (another worker may have processed it): nothing is written.
        ValueError
            An unknown stage or a negative duration in ``stage_seconds``.
        """
        now = self.clock()
        timings = check_stage_seconds(stage_seconds or {})

        def complete_job(s: Session) -> None:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.lease_owner != owner or job.state != JobState.RUNNING.value:
                raise LeaseLost(f"job {job_id} is no longer leased to {owner}")
            inst = s.get_one(Instance, job.instance_id)
            result = Result(
                job_id=job.id,
                instance_id=inst.id,
                study_instance_uid=inst.study_instance_uid,
                status=outcome.status.value,
                score=outcome.score,
                reason=outcome.reason,
                payload=json.dumps(outcome.payload, sort_keys=True),
                created_at=now,
                bundle_version=outcome.bundle_version,
            )
            s.add(result)
            s.flush()
            self._add_sends(s, result.id, sends, now)
            job.state = (
                JobState.NOT_PROCESSED.value
                if outcome.status is Status.NOT_PROCESSED
                else JobState.DONE.value
            )
            job.lease_owner = None
            job.lease_until = None
            job.last_error = outcome.reason if outcome.status is Status.NOT_PROCESSED else None
            job.updated_at = now
            _mark_report_due(s, inst.study_instance_uid, now)
            for stage, seconds in timings.items():
                s.add(JobStageTime(job_id=job.id, stage=stage, seconds=seconds, recorded_at=now))
            if outcome.content_sha256 is not None:
                _record_analysed(s, inst.id, outcome.content_sha256, now)
            _record_worker_job(s, owner, job.id, now)

        self._run(complete_job)

    def record_decoder_crash(self, job_id: int) -> None:
        """Count one crash (or hang) of the isolated decoder on job ``job_id``'s image."""

        def record_decoder_crash(s: Session) -> None:
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(decoder_crashes=Job.decoder_crashes + 1)
            )

        self._run(record_decoder_crash)

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
                    kind=spec.kind.value,
                    object_uid=spec.object_uid,
                    path=spec.path,
                    study_instance_uid=spec.study_instance_uid,
                    state=SendState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
            )

    def add_sends(self, sends: Sequence[SendSpec]) -> None:
        """Queue extra outbound objects not tied to one result (study-level webhooks)."""

        def add_sends(s: Session) -> None:
            self._add_sends(s, None, sends, self.clock())

        self._run(add_sends)

    def queue_webhook_update(self, study_instance_uid: str, change: str) -> int:
        """Post a study's webhook again because where its delivery stands changed.

        For each webhook destination whose newest send of the study was already posted, queue
        that same stored body once more (the dispatcher fills in ``delivery`` when posting);
        a webhook not yet posted will carry the new state anyway. Each ``change`` (e.g.
        ``"ris-done"``) is queued at most once per posted body and destination.

        Returns
        -------
        int
            How many webhook sends were queued.
        """
        now = self.clock()

        def queue_webhook_update(s: Session) -> int:
            newest = (
                select(func.max(Outbound.id))
                .where(Outbound.study_instance_uid == study_instance_uid)
                .where(Outbound.kind == DestinationKind.WEBHOOK.value)
                .group_by(Outbound.destination)
            )
            rows = s.scalars(select(Outbound).where(Outbound.id.in_(newest))).all()
            specs = []
            for row in rows:
                if row.state != SendState.SENT.value:
                    continue
                base = row.object_uid.split("|", 1)[0]  # the revision's body, not an update
                key = f"{base}|{change}"
                if len(key) > 128:
                    digest = hashlib.sha256(key.encode()).hexdigest()
                    key = f"webhook-update:sha256:{digest}"
                specs.append(
                    SendSpec(row.destination, DestinationKind.WEBHOOK, key, row.path,
                             study_instance_uid)
                )
            before = s.scalar(select(func.count(Outbound.id))) or 0
            self._add_sends(s, None, specs, now)
            s.flush()
            return int((s.scalar(select(func.count(Outbound.id))) or 0) - before)

        return self._run(queue_webhook_update)

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

        def fail_job(s: Session) -> JobState:
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

        return self._run(fail_job)

    def expire_leases(self, max_attempts: int) -> int:
        """Requeue running jobs whose lease expired (their worker died or hung).

        A job with attempts left goes back to ``queued`` (the attempt stays counted). A job
        whose attempts are spent stays claimable so that a worker reports it "not processed"
        (see :meth:`claim_jobs`); one whose report itself was cut off ends ``dead``.

        Returns
        -------
        int
            How many jobs were released or ended.
        """
        now = self.clock()

        def expire_leases(s: Session) -> int:
            jobs = s.scalars(
                select(Job)
                .where((Job.state == JobState.RUNNING.value) & (Job.lease_until < now))
                .with_for_update(skip_locked=True)
            ).all()
            changed = 0
            for job in jobs:
                if job.attempts == max_attempts:
                    continue  # a worker reports it "not processed" (claim_jobs)
                job.last_error = _died_error(job.last_error)
                if job.attempts > max_attempts:
                    job.state = JobState.DEAD.value
                    job.last_error = f"{job.last_error}; the worker died again while reporting it"
                else:
                    job.state = JobState.QUEUED.value
                job.lease_owner = None
                job.lease_until = None
                job.updated_at = now
                changed += 1
            return changed

        return self._run(expire_leases)

    def job_state(self, sop_instance_uid: str) -> str | None:
        """Return the state of the job of an instance (None when unknown)."""

        def job_state(s: Session) -> str | None:
            return s.scalar(
                select(Job.state)
                .join(Instance, Instance.id == Job.instance_id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            )

        return self._run(job_state)

    def job_info(self, sop_instance_uid: str) -> tuple[str, int, str | None] | None:
        """Return ``(state, attempts, last_error)`` of an instance's job (None when unknown)."""

        def job_info(s: Session) -> tuple[str, int, str | None] | None:
            row = s.execute(
                select(Job.state, Job.attempts, Job.last_error)
                .join(Instance, Instance.id == Job.instance_id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
            return None if row is None else (str(row[0]), int(row[1]), row[2])

        return self._run(job_info)

    # -- outbound ----------------------------------------------------------------------------

    def claim_sends(self, lease_s: float, limit: int) -> list[ClaimedSend]:
        """Lease due outbound sends (pending and due, or sending with an expired lease)."""
        now = self.clock()
        due = ((Outbound.state == SendState.PENDING.value) & (Outbound.next_attempt_at <= now)) | (
            (Outbound.state == SendState.SENDING.value) & (Outbound.lease_until < now)
        )

        def claim_sends(s: Session) -> list[ClaimedSend]:
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
                out.append(ClaimedSend.of(row))
            return out

        return self._run(claim_sends)

    def mark_sent(self, send_id: int) -> None:
        """Record a confirmed delivery."""
        now = self.clock()

        def mark_sent(s: Session) -> None:
            s.execute(
                update(Outbound)
                .where(Outbound.id == send_id)
                .values(state=SendState.SENT.value, sent_at=now, lease_until=None, last_error=None)
            )

        self._run(mark_sent)

    def supersede_if_newer(self, send_id: int) -> int | None:
        """Finish a study-level send without sending it when a newer one replaces it.

        A newer send is one queued later (higher id) of the same kind, study and destination:
        it carries the study's whole current state, so the older one must never arrive after
        it (an HL7 ORU of revision 1 after revision 2 would set the RIS back).

        Returns
        -------
        int or None
            The newer send's id (this send is now ``superseded``), or None (send it).
        """
        now = self.clock()

        def supersede_if_newer(s: Session) -> int | None:
            row = s.get_one(Outbound, send_id)
            if row.study_instance_uid is None:
                return None
            newer = s.scalar(
                select(func.max(Outbound.id)).where(
                    (Outbound.destination == row.destination)
                    & (Outbound.kind == row.kind)
                    & (Outbound.study_instance_uid == row.study_instance_uid)
                    & (Outbound.id > row.id)
                )
            )
            if newer is None:
                return None
            row.state = SendState.SUPERSEDED.value
            row.sent_at = now
            row.lease_until = None
            row.last_error = f"superseded by send {newer} (not sent)"
            return int(newer)

        return self._run(supersede_if_newer)

    def mark_send_failed(
        self, send_id: int, error: str, max_attempts: int, backoff: Backoff, rng: random.Random
    ) -> SendState:
        """Record a failed delivery: retry after backoff, or ``dead`` after the last attempt."""
        now = self.clock()

        def mark_send_failed(s: Session) -> SendState:
            row = s.get_one(Outbound, send_id)
            row.failures = (row.failures or 0) + 1
            if row.attempts >= max_attempts:
                row.state = SendState.DEAD.value
            else:
                row.state = SendState.PENDING.value
                row.next_attempt_at = now + backoff.delay(row.attempts, rng)
            row.lease_until = None
            row.last_error = error[:2000]
            return SendState(row.state)

        return self._run(mark_send_failed)

    # -- operations ----------------------------------------------------------------------------

    def replay(self, what: str, ids: Sequence[int] = ()) -> int:
        """Requeue dead sends (``what="sends"``) or dead/failed jobs (``what="jobs"``).

        Returns
        -------
        int
            How many rows were requeued.
        """
        now = self.clock()
        if what == "sends":
            cond: Any = Outbound.state == SendState.DEAD.value
            if ids:
                cond = cond & Outbound.id.in_(ids)
            stmt: Any = (
                update(Outbound)
                .where(cond)
                .values(
                    state=SendState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    commit_attempts=0,
                    commitment_uid=None,
                )
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

        def replay(s: Session) -> int:
            return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]

        return self._run(replay)

    def status(self) -> dict[str, Any]:
        """Counts for ``spine-node status``.

        ``summaries_owed``: studies with a recorded result whose summary report is not queued
        yet (a worker makes it after its batch, once the batch's objects have left, or an
        idle worker makes it later; see ``Worker``): work still to come.
        """
        now = self.clock()

        def status(s: Session) -> dict[str, Any]:
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
            owed = s.scalar(
                select(func.count()).where(StudyState.report_due_at.is_not(None))
            )
            categories = {"image": 0, "not_image": 0, "out_of_scope": 0}
            for category, n in s.execute(
                select(Instance.category, func.count()).group_by(Instance.category)
            ):
                categories[category] = n
            return {
                "instances": instances,
                "categories": categories,
                "jobs": jobs,
                "results": results,
                "outbound": outbound,
                "summaries_owed": owed or 0,
                "oldest_queued_age_s": None if oldest is None else round(now - oldest, 3),
            }

        return self._run(status)

    def dead_letters(self, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        """Dead jobs and dead sends with their last errors (for status output)."""

        def dead_letters(s: Session) -> dict[str, list[dict[str, Any]]]:
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

        return self._run(dead_letters)

    def advance_study(
        self, study_instance_uid: str, state_key: Callable[[Sequence[StudyImage]], str]
    ) -> StudySnapshot:
        """Read a study's analysed images and open a new summary revision if they changed.

        One transaction with the study's state row locked, so that concurrent workers
        finishing images of one study take turns: the last one always sees every committed
        result.

        Parameters
        ----------
        study_instance_uid : str
            As received.
        state_key : callable
            ``images -> str``: what the summary states (a new key opens a revision).
        """
        now = self.clock()

        def advance_study(s: Session) -> StudySnapshot:
            state = s.get(StudyState, study_instance_uid, with_for_update=True)
            if state is None:
                state = StudyState(
                    study_instance_uid=study_instance_uid,
                    revision=0,
                    state_key="",
                    queued_revision=0,
                    updated_at=now,
                )
                s.add(state)
                s.flush()
            rows = s.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.sop_class_uid,
                    Instance.series_instance_uid,
                    Result.payload,
                )
                .join(Result, Result.instance_id == Instance.id)
                .where(Result.study_instance_uid == study_instance_uid)
                .order_by(Result.id)
            ).all()
            images = tuple(
                StudyImage(uid, sop_class, series, json.loads(payload))
                for uid, sop_class, series, payload in rows
            )
            key = state_key(images) if images else ""
            changed = False
            if images and key != state.state_key:
                state.revision += 1
                state.state_key = key
                state.updated_at = now
                changed = True
            elif images and state.queued_revision < state.revision:
                changed = True  # opened earlier, never queued (e.g. a crash in between)
            if not changed:
                _report_made(state)  # every recorded result is in the summary queued
            return StudySnapshot(
                study_instance_uid,
                state.revision,
                changed,
                images,
                state.document_uid,
                state.document_series_uid,
                state.report_due_seq,
            )

        try:
            return self._run(advance_study)
        except IntegrityError:  # another worker created the state row at the same moment
            return self._run(advance_study)

    def queue_study_document(
        self,
        study_instance_uid: str,
        revision: int,
        document_uid: str,
        document_series_uid: str,
        sends: Sequence[SendSpec],
        report_due_seq: int | None = None,
    ) -> bool:
        """Queue the sends of a study summary revision unless a newer revision was opened.

        Parameters
        ----------
        report_due_seq : int or None
            ``StudySnapshot.report_due_seq`` of the snapshot the document was built from:
            the owed report is cleared when no result was recorded since (None: left as is).

        Returns
        -------
        bool
            False when ``revision`` is no longer the study's current one (nothing queued:
            the newer revision's document supersedes it) or was already queued by another
            worker (each revision is queued once).
        """
        now = self.clock()

        def queue_study_document(s: Session) -> bool:
            state = s.get(StudyState, study_instance_uid, with_for_update=True)
            if state is None or state.revision != revision:
                return False
            queued = state.queued_revision < revision
            if queued:
                self._add_sends(s, None, sends, now)
                state.queued_revision = revision
                state.document_uid = document_uid
                state.document_series_uid = document_series_uid
                state.updated_at = now
            if report_due_seq is not None and state.report_due_seq == report_due_seq:
                _report_made(state)
            return queued

        return self._run(queue_study_document)

    def owed_studies(self, older_than: float, limit: int) -> list[OwedStudy]:
        """Studies whose summary report is owed since before ``older_than`` and whose retry
        time (after failed reports, :meth:`study_report_failed`) has come, oldest first.

        Parameters
        ----------
        older_than : float
            Epoch seconds: studies with a result recorded after it are left to the report
            of that result.
        limit : int
            At most this many studies.
        """

        now = self.clock()

        def owed_studies(s: Session) -> list[OwedStudy]:
            due = s.execute(
                select(StudyState.study_instance_uid, StudyState.report_failures)
                .where(StudyState.report_due_at.is_not(None))
                .where(StudyState.report_due_at < older_than)
                .where(
                    StudyState.report_retry_at.is_(None) | (StudyState.report_retry_at <= now)
                )
                .order_by(StudyState.report_due_at)
                .limit(limit)
            ).all()
            owed = []
            for uid, failures in due:
                rows = s.execute(
                    select(
                        Instance.sop_instance_uid,
                        Instance.sop_class_uid,
                        Instance.series_instance_uid,
                        Instance.spool_path,
                        Instance.spool_deleted_at,
                        Result.payload,
                    )
                    .join(Result, Result.instance_id == Instance.id)
                    .where(Result.study_instance_uid == uid)
                    .order_by(Result.id)
                ).all()
                spool = tuple(row.spool_path for row in rows if row.spool_deleted_at is None)
                images = tuple(
                    StudyImage(
                        row.sop_instance_uid,
                        row.sop_class_uid,
                        row.series_instance_uid,
                        json.loads(row.payload),
                    )
                    for row in rows
                )
                owed.append(OwedStudy(uid, spool, images, int(failures or 0)))
            return owed

        return self._run(owed_studies)

    def study_report_failed(
        self, study_instance_uid: str, backoff: Backoff, rng: random.Random
    ) -> tuple[int, float]:
        """Count a failed owed report of a study and set when the next may be tried (stored,
        so the backoff holds across worker restarts and for every worker).

        Parameters
        ----------
        study_instance_uid : str
            The study.
        backoff : Backoff
            Delay before retry number n (n = failures in a row so far).
        rng : random.Random
            For the backoff's jitter.

        Raises
        ------
        ValueError
            When the study has no state row (no result was ever recorded for it).

        Returns
        -------
        (int, float)
            Failures in a row (this one included) and the delay in seconds until the next.
        """
        now = self.clock()

        def study_report_failed(s: Session) -> tuple[int, float]:
            state = s.get(StudyState, study_instance_uid)
            if state is None:
                raise ValueError(f"no study state for {study_instance_uid!r}")
            state.report_failures = int(state.report_failures or 0) + 1
            delay = backoff.delay(state.report_failures, rng)
            state.report_retry_at = now + delay
            return state.report_failures, delay

        return self._run(study_report_failed)

    def clear_study_report(self, study_instance_uid: str) -> None:
        """Give up an owed study report (the caller logs why): it is no longer owed."""

        def clear_study_report(s: Session) -> None:
            s.execute(
                update(StudyState)
                .where(StudyState.study_instance_uid == study_instance_uid)
                .values(report_due_at=None, report_failures=0, report_retry_at=None)
            )

        self._run(clear_study_report)

    def study_results(self, study_instance_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """All results of one study as ``(sop_instance_uid, payload)`` pairs."""

        def study_results(s: Session) -> list[tuple[str, dict[str, Any]]]:
            rows = s.execute(
                select(Instance.sop_instance_uid, Result.payload)
                .join(Result, Result.instance_id == Instance.id)
                .where(Result.study_instance_uid == study_instance_uid)
                .order_by(Result.id)
            ).all()
            return [(uid, json.loads(payload)) for uid, payload in rows]

        return self._run(study_results)

    def studies(
        self,
        commitment_destinations: Collection[str] = (),
        only: Sequence[str] | None = None,
        ignored_studies: bool = False,
    ) -> list[dict[str, Any]]:
        """Every study with results (or only those of the Study Instance UIDs ``only``): first
        arrival time, its results (for the worklist), how many of its objects were ignored
        (``ignored``: ``not_image``, ``out_of_scope``), its last queued study summary
        (``summary``: ``revision``, ``sop_instance_uid``; absent before the first) and where
        its deliveries stand (``delivery``: :meth:`Monitor.study_delivery`; ``commitment``
        over ``commitment_destinations``).

        With ``ignored_studies``, also every study whose objects were all recorded without a
        job (not images, or out of scope) and none of which has a job: ``results`` empty and
        ``ignored_reasons``, the distinct ``(category, category_reason)`` of its objects."""

        def rows(s: Session) -> list[Any]:
            query = (
                select(
                    Result.study_instance_uid,
                    Instance.sop_instance_uid,
                    Instance.received_at,
                    Result.payload,
                )
                .join(Instance, Instance.id == Result.instance_id)
                .order_by(Instance.received_at)
            )
            if only is not None:
                query = query.where(Result.study_instance_uid.in_(list(only)))
            return list(s.execute(query).all())

        def ignored(s: Session) -> list[Any]:
            query = (
                select(Instance.study_instance_uid, Instance.category, func.count())
                .where(Instance.category != "image")
                .group_by(Instance.study_instance_uid, Instance.category)
            )
            if only is not None:
                query = query.where(Instance.study_instance_uid.in_(list(only)))
            return list(s.execute(query).all())

        studies: dict[str, dict[str, Any]] = {}
        for study_uid, sop_uid, received_at, payload in self._run(rows):
            entry = studies.setdefault(
                study_uid,
                {
                    "study_instance_uid": study_uid,
                    "arrival": received_at,
                    "results": [],
                    "ignored": {"not_image": 0, "out_of_scope": 0},
                },
            )
            entry["results"].append((sop_uid, json.loads(payload)))
        if ignored_studies:
            self._add_ignored_studies(studies, only)
        for study_uid, category, n in self._run(ignored):
            if study_uid in studies:
                studies[study_uid]["ignored"][category] = n

        def summaries(s: Session) -> list[Any]:
            query = select(
                StudyState.study_instance_uid,
                StudyState.queued_revision,
                StudyState.document_uid,
            ).where(StudyState.queued_revision > 0)
            if only is not None:
                query = query.where(StudyState.study_instance_uid.in_(list(only)))
            return list(s.execute(query).all())

        for study_uid, revision, document_uid in self._run(summaries):
            if study_uid in studies:
                studies[study_uid]["summary"] = {
                    "revision": int(revision),
                    "sop_instance_uid": document_uid,
                }
        delivery = Monitor(self).study_delivery(list(studies), commitment_destinations)
        for study_uid, entry in studies.items():
            entry["delivery"] = delivery[study_uid]
        return list(studies.values())

    def _add_ignored_studies(
        self, studies: dict[str, dict[str, Any]], only: Sequence[str] | None
    ) -> None:
        """Add to ``studies`` those no job exists for, whose objects were all recorded only."""

        def ignored_only(s: Session) -> list[Any]:
            with_job = (
                select(Instance.study_instance_uid)
                .join(Job, Job.instance_id == Instance.id)
                .distinct()
            )
            if only is not None:  # a page of studies: look at their jobs only
                with_job = with_job.where(Instance.study_instance_uid.in_(list(only)))
            query = (
                select(
                    Instance.study_instance_uid,
                    Instance.category,
                    Instance.category_reason,
                    func.min(Instance.received_at),
                )
                .where(Instance.study_instance_uid.not_in(with_job))
                .group_by(
                    Instance.study_instance_uid, Instance.category, Instance.category_reason
                )
                .order_by(func.min(Instance.received_at))
            )
            if only is not None:
                query = query.where(Instance.study_instance_uid.in_(list(only)))
            return list(s.execute(query).all())

        for study_uid, category, reason, received_at in self._run(ignored_only):
            if study_uid in studies and studies[study_uid]["results"]:
                continue  # results without a job cannot be, but never hide results
            entry = studies.setdefault(
                study_uid,
                {
                    "study_instance_uid": study_uid,
                    "arrival": received_at,
                    "results": [],
                    "ignored": {"not_image": 0, "out_of_scope": 0},
                    "ignored_reasons": [],
                },
            )
            entry["arrival"] = min(entry["arrival"], received_at)
            entry["ignored_reasons"].append((category, reason))

    def recent_study_uids(self, limit: int, offset: int = 0) -> list[str]:
        """Study Instance UIDs of the studies received last (newest last arrival first).

        Parameters
        ----------
        limit, offset : int
            Page size and how many newer studies to skip.
        """

        def recent_study_uids(s: Session) -> list[str]:
            if offset + limit > _STREAMED_STUDIES:  # a deep page: every study, grouped in SQL
                last = func.max(Instance.received_at).label("last")
                rows = s.execute(
                    select(Instance.study_instance_uid, last)
                    .group_by(Instance.study_instance_uid)
                    .order_by(last.desc(), Instance.study_instance_uid)
                    .limit(limit)
                    .offset(offset)
                ).all()
                return [str(uid) for uid, _ in rows]
            # the newest pages: newest object first (ix_instances_received_at); a study's
            # first appearance is its last arrival, so only the newest rows are read
            found: dict[str, None] = {}
            query = select(Instance.study_instance_uid).order_by(
                Instance.received_at.desc(), Instance.study_instance_uid
            )
            for uid in s.scalars(query.execution_options(yield_per=500)):
                found.setdefault(uid)
                if len(found) >= offset + limit:
                    break
            return list(found)[offset : offset + limit]

        return self._run(recent_study_uids)

    def study_page(
        self,
        limit: int,
        before: StudyCursor | None = None,
        after: StudyCursor | None = None,
    ) -> list[StudyCursor]:
        """One page of studies in :meth:`recent_study_uids`' order, found by keyset.

        Each object that is its study's newest (no object of the study was received later:
        ``ix_instances_study_received``) stands for the study; these are read along
        ``ix_instances_received_at`` from the cursor on, so a page costs the same however deep.

        Parameters
        ----------
        limit : int
            Page size (>= 1).
        before : StudyCursor, optional
            Only studies older than this one (the next, older page).
        after : StudyCursor, optional
            Only studies newer than this one: the ``limit`` just newer (the previous page).

        Returns
        -------
        list of StudyCursor
            Newest first (also with ``after``).

        Raises
        ------
        ValueError
            When ``limit`` < 1 or both cursors are given.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")
        newer = aliased(Instance)
        newest_of_study = ~(
            select(newer.id)
            .where(newer.study_instance_uid == Instance.study_instance_uid)
            .where(newer.received_at > Instance.received_at)
            .exists()
        )
        query = select(Instance.study_instance_uid, Instance.received_at).where(newest_of_study)
        if after is None:
            query = query.order_by(Instance.received_at.desc(), Instance.study_instance_uid)
            if before is not None:
                t, uid = before.last_arrival, before.study_instance_uid
                query = query.where(Instance.received_at <= t).where(  # <=: an index range
                    or_(Instance.received_at < t, Instance.study_instance_uid > uid))
        else:
            t, uid = after.last_arrival, after.study_instance_uid
            query = (
                query.where(Instance.received_at >= t)
                .where(or_(Instance.received_at > t, Instance.study_instance_uid < uid))
                .order_by(Instance.received_at, Instance.study_instance_uid.desc())
            )

        def study_page(s: Session) -> list[StudyCursor]:
            found: dict[str, float] = {}  # two newest objects of a study may share a time
            for study_uid, received_at in s.execute(query.execution_options(yield_per=200)):
                found.setdefault(study_uid, float(received_at))
                if len(found) >= limit:
                    break
            return [StudyCursor(t, u) for u, t in found.items()]

        page = self._run(study_page)
        return page[::-1] if after is not None else page

    def count_studies(self) -> int:
        """How many distinct studies were received."""

        def count_studies(s: Session) -> int:
            return int(
                s.scalar(select(func.count(func.distinct(Instance.study_instance_uid)))) or 0
            )

        return self._run(count_studies)

    def study_images(self, study_uids: Sequence[str]) -> list[dict[str, Any]]:
        """Every object received for these studies, with its job and result (if any).

        Returns
        -------
        list of dict
            In order of arrival: ``study_instance_uid``, ``series_instance_uid``,
            ``sop_instance_uid``, ``sop_class_uid``, ``category`` (``image``, ``not_image``,
            ``out_of_scope``), ``category_reason``, ``received_at``, ``spool_path`` (None when
            removed by retention), ``job_state`` (None: no job), ``attempts``, ``last_error``
            and ``result`` (the stored result payload, or None).
        """

        def study_images(s: Session) -> list[dict[str, Any]]:
            rows = s.execute(
                select(Instance, Job.state, Job.attempts, Job.last_error, Result.payload)
                .outerjoin(Job, Job.instance_id == Instance.id)
                .outerjoin(Result, Result.job_id == Job.id)
                .where(Instance.study_instance_uid.in_(list(study_uids)))
                .order_by(Instance.received_at, Instance.id)
            ).all()
            return [
                {
                    "study_instance_uid": inst.study_instance_uid,
                    "series_instance_uid": inst.series_instance_uid,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "sop_class_uid": inst.sop_class_uid,
                    "category": inst.category,
                    "category_reason": inst.category_reason,
                    "received_at": inst.received_at,
                    "spool_path": None if inst.spool_deleted_at is not None else inst.spool_path,
                    "job_state": state,
                    "attempts": attempts,
                    "last_error": last_error,
                    "result": None if payload is None else json.loads(payload),
                }
                for inst, state, attempts, last_error, payload in rows
            ]

        return self._run(study_images)

    def result_objects(self, sop_instance_uid: str) -> list[str]:
        """SOP Instance UIDs of the result objects made for an image (SR first; empty when it
        has no result)."""

        def result_objects(s: Session) -> list[str]:
            payload = s.scalar(
                select(Result.payload)
                .join(Instance, Instance.id == Result.instance_id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            )
            if payload is None:
                return []
            return [str(uid) for uid in json.loads(payload).get("objects", ())]

        return self._run(result_objects)

    def deliverable_spool(self, older_than: float) -> list[tuple[int, str]]:
        """Instances whose job is terminal, all sends delivered, received before ``older_than``."""

        def deliverable_spool(s: Session) -> list[tuple[int, str]]:
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

        return self._run(deliverable_spool)

    def mark_spool_deleted(self, instance_id: int) -> None:
        """Record that an instance's spool file was removed by retention."""
        now = self.clock()

        def mark_spool_deleted(s: Session) -> None:
            s.execute(
                update(Instance).where(Instance.id == instance_id).values(spool_deleted_at=now)
            )

        self._run(mark_spool_deleted)


#: ``Job.last_error`` while every ended attempt ended with the worker dying.
_DIED = "worker died during processing"


def _record_analysed(s: Session, instance_id: int, sha256: str, now: float) -> None:
    """Remember (in ``s``) which bytes of instance ``instance_id`` were analysed."""
    row = s.get(AnalysedContent, instance_id)
    if row is None:
        s.add(AnalysedContent(instance_id=instance_id, sha256=sha256, analysed_at=now, revision=1))
    else:
        row.sha256, row.analysed_at = sha256, now


def _record_worker_job(s: Session, owner: str, job_id: int, now: float) -> None:
    """Note (in ``s``) the last job worker ``owner`` finished, on its heartbeat row if any."""
    s.execute(
        update(WorkerBeat)
        .where(WorkerBeat.owner == owner)
        .values(last_job_id=job_id, last_job_at=now, last_seen_at=now)
    )


def _mark_report_due(s: Session, study_instance_uid: str, now: float) -> None:
    """Mark the study's summary report owed, creating its state row when absent.

    An upsert (``INSERT ... ON CONFLICT DO UPDATE``, SQLite and PostgreSQL) so that workers
    recording the first results of one study at once never collide on the row.
    """
    dialect = s.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(StudyState).values(
        study_instance_uid=study_instance_uid,
        revision=0,
        state_key="",
        queued_revision=0,
        updated_at=now,
        report_due_at=now,
        report_due_seq=1,
    )
    s.execute(
        statement.on_conflict_do_update(
            index_elements=[StudyState.study_instance_uid],
            set_={
                "report_due_at": now,
                "report_due_seq": StudyState.report_due_seq + 1,
                "report_failures": 0,  # a new result: owed reports start afresh
                "report_retry_at": None,
            },
        )
    )


def _report_made(state: StudyState) -> None:
    """The study's summary states every recorded result: no report owed, no failures."""
    state.report_due_at = None
    state.report_failures = 0
    state.report_retry_at = None


def _died_error(previous: str | None) -> str:
    """The job's last error after its worker died (or hung past the lease) during an attempt."""
    if previous is None or previous == _DIED:
        return _DIED
    if previous.endswith(f"; then {_DIED}"):
        return previous
    return f"{previous[:1500]}; then {_DIED}"


def _exhausted_reason(attempts: int, last_error: str | None) -> str:
    """Why a job whose ``attempts`` are spent ends "not processed" (shown to the radiologist)."""
    if last_error is None or last_error == _DIED:
        return f"{_DIED} {attempts} times"
    return f"processing did not finish in {attempts} attempts: {last_error}"

# -- worker heartbeats and operator checks (spine-node status / replay) --------------------------
# Kept in its own section: the heartbeat table is written by the worker role's heartbeat thread,
# read by ``spine-node status``.


class WorkerBeat(Base):
    """One worker process: who it is, which bundle it runs, when it was last seen alive."""

    __tablename__ = "worker_heartbeats"
    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    last_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_job_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class OutboxRemoved(Base):
    """A result object file removed from the outbox by retention (after every delivery)."""

    __tablename__ = "outbox_removed"
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    removed_at: Mapped[float] = mapped_column(Float)


class AnalysedContent(Base):
    """SHA-256 of the received file a finished job analysed (a re-send with other bytes is new)."""

    __tablename__ = "analysed_content"
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    analysed_at: Mapped[float] = mapped_column(Float)
    revision: Mapped[int] = mapped_column(Integer, default=1)


class Superseded(Base):
    """Result objects of an image's previous analysis, which the next analysis's SR amends."""

    __tablename__ = "superseded_objects"
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), primary_key=True)
    object_uids: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker's heartbeat says about it."""

    owner: str
    host: str
    pid: int
    bundle_name: str
    bundle_version: str
    bundle_sha256: str


def _beat_json(beat: WorkerBeat, now: float) -> dict[str, Any]:
    return {
        "owner": beat.owner,
        "host": beat.host,
        "pid": beat.pid,
        "bundle": {
            "name": beat.bundle_name,
            "version": beat.bundle_version,
            "sha256": beat.bundle_sha256,
        },
        "started_at": beat.started_at,
        "last_seen_at": beat.last_seen_at,
        "last_seen_age_s": round(now - beat.last_seen_at, 3),
        "last_job_id": beat.last_job_id,
        "last_job_at": beat.last_job_at,
    }


class Monitor:
    """Heartbeats of worker processes and the look-ups behind ``status`` and ``replay``.

    Parameters
    ----------
    store : JobStore
        The queue whose database holds the heartbeat table.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def beat(self, worker: WorkerIdentity, started_at: float) -> None:
        """Insert or refresh the heartbeat row of ``worker``."""
        now = self.store.clock()

        def beat(s: Session) -> None:
            row = s.get(WorkerBeat, worker.owner)
            if row is not None and row.started_at == started_at:
                row.last_seen_at = now
                return
            if row is not None:  # a new process reusing host:pid
                s.delete(row)
                s.flush()
            s.add(
                WorkerBeat(
                    owner=worker.owner,
                    host=worker.host,
                    pid=worker.pid,
                    bundle_name=worker.bundle_name,
                    bundle_version=worker.bundle_version,
                    bundle_sha256=worker.bundle_sha256,
                    started_at=started_at,
                    last_seen_at=now,
                )
            )

        self.store._run(beat)

    def worker_stopped(self, owner: str) -> None:
        """Remove the heartbeat of a worker that stopped cleanly."""

        def worker_stopped(s: Session) -> None:
            s.execute(delete(WorkerBeat).where(WorkerBeat.owner == owner))

        self.store._run(worker_stopped)

    def workers(self) -> list[dict[str, Any]]:
        """Every heartbeat row (live or not), most recently seen first."""
        now = self.store.clock()

        def workers(s: Session) -> list[dict[str, Any]]:
            beats = s.scalars(select(WorkerBeat).order_by(WorkerBeat.last_seen_at.desc())).all()
            return [_beat_json(b, now) for b in beats]

        return self.store._run(workers)

    def live_workers(self, max_age_s: float) -> list[dict[str, Any]]:
        """Workers seen within the last ``max_age_s`` seconds."""
        return [w for w in self.workers() if w["last_seen_age_s"] <= max_age_s]

    def prune_workers(self, older_than_s: float) -> list[str]:
        """Forget heartbeats not seen for ``older_than_s`` seconds; return their owners.

        Raises
        ------
        ValueError
            When ``older_than_s`` is not positive.
        """
        if not older_than_s > 0:
            raise ValueError(f"older_than_s must be positive, got {older_than_s!r}")
        cutoff = self.store.clock() - older_than_s

        def prune_workers(s: Session) -> list[str]:
            stale = WorkerBeat.last_seen_at < cutoff
            owners = list(s.scalars(select(WorkerBeat.owner).where(stale).order_by(WorkerBeat.owner)))
            s.execute(delete(WorkerBeat).where(stale))
            return owners

        return self.store._run(prune_workers)

    def oldest_pending_send_age(self) -> float | None:
        """Age in seconds of the oldest send not yet delivered (pending, sending, or stored
        and waiting for its Storage Commitment report), or None."""
        now = self.store.clock()
        waiting = [SendState.PENDING.value, SendState.SENDING.value, SendState.COMMITTING.value]

        def oldest(s: Session) -> float | None:
            return s.scalar(
                select(func.min(Outbound.created_at)).where(Outbound.state.in_(waiting))
            )

        first = self.store._run(oldest)
        return None if first is None else round(now - first, 3)

    def states_of(self, what: str, ids: Sequence[int]) -> dict[int, str]:
        """The state of each known id among ``ids`` (``what`` is ``"sends"`` or ``"jobs"``)."""
        table: Any
        if what == "sends":
            table = Outbound
        elif what == "jobs":
            table = Job
        else:
            raise ValueError(f"what must be 'sends' or 'jobs', got {what!r}")

        def states_of(s: Session) -> dict[int, str]:
            rows = s.execute(select(table.id, table.state).where(table.id.in_(list(ids)))).all()
            return {int(i): str(state) for i, state in rows}

        return self.store._run(states_of)

    def send_context(self, send_ids: Sequence[int]) -> dict[int, tuple[int | None, str | None]]:
        """``send_id -> (job_id, study_instance_uid)`` for log lines (no job for study sends)."""

        def send_context(s: Session) -> dict[int, tuple[int | None, str | None]]:
            rows = s.execute(
                select(
                    Outbound.id,
                    Result.job_id,
                    func.coalesce(Result.study_instance_uid, Outbound.study_instance_uid),
                )
                .outerjoin(Result, Result.id == Outbound.result_id)
                .where(Outbound.id.in_(list(send_ids)))
            ).all()
            return {int(i): (None if j is None else int(j), study) for i, j, study in rows}

        return self.store._run(send_context)

    def study_known_to_ris(self, study_instance_uid: str) -> bool:
        """Whether a study has a job (its revisions tell the RIS) or an HL7 send already."""

        def known(s: Session) -> bool:
            job = s.scalar(
                select(Job.id)
                .join(Instance, Instance.id == Job.instance_id)
                .where(Instance.study_instance_uid == study_instance_uid)
                .limit(1)
            )
            if job is not None:
                return True
            sent = s.scalar(
                select(Outbound.id)
                .where(Outbound.study_instance_uid == study_instance_uid)
                .where(Outbound.kind == DestinationKind.HL7.value)
                .limit(1)
            )
            return sent is not None

        return self.store._run(known)

    def study_delivery(
        self,
        study_instance_uids: Sequence[str] | None = None,
        commitment_destinations: Collection[str] = (),
    ) -> dict[str, dict[str, str | None]]:
        """Per study, where each delivery kind stands: ``{uid: {"ris": "done"|...|None,
        "commitment": ...}}``.

        For each destination only the study's newest send counts (a newer revision's message
        supersedes an older one); see :func:`delivery_state`. ``commitment`` covers every
        result object of the study at ``commitment_destinations``
        (:meth:`Commitments.study_states`).

        Parameters
        ----------
        study_instance_uids : sequence of str, optional
            Only these studies (default: every study with a study-level send or an object at
            a commitment destination).
        commitment_destinations : collection of str
            Names of the DICOM destinations with ``storage_commitment``.

        Returns
        -------
        dict
            Every listed study (or every study with such sends) with one key per
            :data:`DELIVERY_FIELDS` entry (None: nothing of that kind for the study).
        """
        kinds = {kind.value: field for field, kind in DELIVERY_KINDS.items()}

        def study_delivery(s: Session) -> list[Any]:
            newest = (
                select(func.max(Outbound.id))
                .where(Outbound.study_instance_uid.is_not(None))
                .where(Outbound.kind.in_(list(kinds)))
                .group_by(Outbound.study_instance_uid, Outbound.destination)
            )
            query = select(Outbound.study_instance_uid, Outbound.kind, Outbound.state).where(
                Outbound.id.in_(newest)
            )
            if study_instance_uids is not None:
                query = query.where(Outbound.study_instance_uid.in_(list(study_instance_uids)))
            return list(s.execute(query).all())

        found: dict[str, dict[str, list[str]]] = {}
        for study, kind, state in self.store._run(study_delivery):
            found.setdefault(study, {}).setdefault(kinds[kind], []).append(state)
        commitment = Commitments(self.store).study_states(commitment_destinations)
        uids = (
            list(dict.fromkeys([*found, *commitment]))
            if study_instance_uids is None
            else list(study_instance_uids)
        )
        out: dict[str, dict[str, str | None]] = {}
        for uid in uids:
            per_kind = found.get(uid, {})
            out[uid] = {}
            for field in DELIVERY_KINDS:
                state = delivery_state(per_kind.get(field, []))
                out[uid][field] = None if state is None else state.value
            out[uid]["commitment"] = commitment.get(uid)
        return out

    def expired_outbox(self, older_than: float, limit: int = 1000) -> list[str]:
        """Outbox files delivered to every destination, the last delivery before ``older_than``.

        Dead, pending or sending objects are never listed: their files stay for ``replay``.
        Superseded sends count as finished.
        """

        def expired_outbox(s: Session) -> list[str]:
            undelivered = func.sum(
                case((Outbound.state.not_in(FINISHED_SEND_STATES), 1), else_=0)
            )
            rows = s.execute(
                select(Outbound.path)
                .where(Outbound.path.not_in(select(OutboxRemoved.path)))
                .group_by(Outbound.path)
                .having((undelivered == 0) & (func.max(Outbound.sent_at) < older_than))
                .limit(limit)
            ).all()
            return [str(r[0]) for r in rows]

        return self.store._run(expired_outbox)

    def mark_outbox_removed(self, paths: Sequence[str]) -> None:
        """Record outbox files removed by retention (they are not listed again)."""
        now = self.store.clock()

        def mark_outbox_removed(s: Session) -> None:
            for path in paths:
                if s.get(OutboxRemoved, path) is None:
                    s.add(OutboxRemoved(path=path, removed_at=now))

        self.store._run(mark_outbox_removed)

    def requeue_finished(
        self,
        *,
        study_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        received_since: float | None = None,
    ) -> tuple[list[int], list[str]]:
        """Queue finished images again (``spine-node reprocess``), for example after a bundle
        upgrade.

        Exactly one selector is given. A finished job (done, not processed or dead) goes back to
        ``queued`` with its attempts reset; its previous result record is removed (the objects
        already sent stay known as ours: their outbound rows are kept, detached). Images whose
        source file was removed by spool retention cannot be analysed again and are returned
        apart.

        Returns
        -------
        (list of int, list of str)
            The requeued job ids, and the SOP Instance UIDs skipped for a removed source.

        Raises
        ------
        ValueError
            When not exactly one selector is given.
        """
        chosen = [v is not None for v in (study_instance_uid, sop_instance_uid, received_since)]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of study_instance_uid, sop_instance_uid, "
                             f"received_since; got {chosen.count(True)}")
        if study_instance_uid is not None:
            where: Any = Instance.study_instance_uid == study_instance_uid
        elif sop_instance_uid is not None:
            where = Instance.sop_instance_uid == sop_instance_uid
        else:
            where = Instance.received_at >= received_since
        finished = [state.value for state in TERMINAL_JOB_STATES]
        now = self.store.clock()

        def requeue_finished(s: Session) -> tuple[list[int], list[str]]:
            rows = s.execute(
                select(Job, Instance.sop_instance_uid, Instance.spool_deleted_at)
                .join(Instance, Instance.id == Job.instance_id)
                .where(where & Job.state.in_(finished))
                .order_by(Job.id)
            ).all()
            requeued: list[int] = []
            skipped: list[str] = []
            for job, sop_uid, removed in rows:
                if removed is not None:
                    skipped.append(str(sop_uid))
                    continue
                _requeue_finished_job(s, job, now)
                requeued.append(int(job.id))
            return requeued, skipped

        return self.store._run(requeue_finished)

    def analysis_revision(self, job_id: int) -> int:
        """The analysis revision of a job's image (1 unless re-sent with other content)."""

        def analysis_revision(s: Session) -> int:
            revision = s.scalar(
                select(AnalysedContent.revision)
                .join(Job, Job.instance_id == AnalysedContent.instance_id)
                .where(Job.id == job_id)
            )
            return 1 if revision is None else int(revision)

        return self.store._run(analysis_revision)

    def superseded_objects(self, job_id: int) -> list[str]:
        """SOP Instance UIDs of the objects the previous analysis of a job's image sent."""

        def superseded_objects(s: Session) -> list[str]:
            text = s.scalar(
                select(Superseded.object_uids)
                .join(Job, Job.instance_id == Superseded.instance_id)
                .where(Job.id == job_id)
            )
            return [] if text is None else [str(u) for u in json.loads(text)]

        return self.store._run(superseded_objects)

    def resent_with_new_content(self, sop_instance_uid: str, sha256: str) -> int | None:
        """Queue a finished image again when it was re-sent with other bytes than analysed.

        Returns
        -------
        int or None
            The requeued job's id; None when the content is the one analysed, or the image
            was not analysed yet (its job will read the new file anyway).
        """
        finished = [state.value for state in TERMINAL_JOB_STATES]
        now = self.store.clock()

        def resent(s: Session) -> int | None:
            row = s.execute(
                select(Job, AnalysedContent)
                .join(Instance, Instance.id == Job.instance_id)
                .join(AnalysedContent, AnalysedContent.instance_id == Instance.id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
            if row is None or row[1].sha256 == sha256 or row[0].state not in finished:
                return None
            row[1].revision += 1  # the new analysis's objects get new UIDs
            _requeue_finished_job(s, row[0], now)
            return int(row[0].id)

        return self.store._run(resent)


class Commitments:
    """Storage Commitment state of outbound objects (the ``committing`` send state).

    Every step is one transaction, so a restart loses no pending commitment: an object
    stored by the peer is ``committing`` with the Transaction UID of its latest request
    (written before the N-ACTION goes out, so a report that arrives at once finds it) and the
    time it is asked again when no report came.

    Parameters
    ----------
    store : JobStore
        The queue.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def stored(self, send_id: int, lease_s: float) -> None:
        """The peer stored the object (C-STORE success): it waits for its commitment request,
        which the same dispatcher makes next (leased for ``lease_s`` meanwhile)."""
        now = self.store.clock()

        def stored(s: Session) -> None:
            s.execute(
                update(Outbound)
                .where(Outbound.id == send_id)
                .values(
                    state=SendState.COMMITTING.value,
                    next_attempt_at=now,
                    lease_until=now + lease_s,
                    commitment_uid=None,
                    last_error=None,
                )
            )

        self.store._run(stored)

    def claim_due(self, lease_s: float, limit: int) -> list[ClaimedSend]:
        """Lease committing objects whose request is due (never made, or its report overdue)."""
        now = self.store.clock()
        due = (
            (Outbound.state == SendState.COMMITTING.value)
            & (Outbound.next_attempt_at <= now)
            & (Outbound.lease_until.is_(None) | (Outbound.lease_until < now))
        )

        def claim_due(s: Session) -> list[ClaimedSend]:
            rows = s.scalars(
                select(Outbound)
                .where(due)
                .order_by(Outbound.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            out = []
            for row in rows:
                row.lease_until = now + lease_s
                out.append(ClaimedSend.of(row))
            return out

        return self.store._run(claim_due)

    def begin(
        self, send_ids: Sequence[int], transaction_uid: str, timeout_s: float, max_requests: int
    ) -> tuple[list[int], list[int]]:
        """Record a commitment request before it is made.

        Objects whose ``max_requests`` are spent (their reports never came) end ``dead``;
        the others get ``transaction_uid`` and are asked again after ``timeout_s``.

        Returns
        -------
        (list of int, list of int)
            The send ids to request, and those that ended dead.
        """
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
        now = self.store.clock()

        def begin(s: Session) -> tuple[list[int], list[int]]:
            rows = s.scalars(
                select(Outbound)
                .where(
                    Outbound.id.in_(list(send_ids))
                    & (Outbound.state == SendState.COMMITTING.value)
                )
                .order_by(Outbound.id)
                .with_for_update()
            ).all()
            requested, dead = [], []
            for row in rows:
                row.lease_until = None
                if row.commit_attempts >= max_requests:
                    row.state = SendState.DEAD.value
                    row.last_error = (
                        f"no storage commitment report within {timeout_s:g} s after "
                        f"{row.commit_attempts} request(s)"
                        + (f"; last: {row.last_error}" if row.last_error else "")
                    )[:2000]
                    dead.append(row.id)
                    continue
                row.commit_attempts += 1
                row.commitment_uid = transaction_uid
                row.next_attempt_at = now + timeout_s
                requested.append(row.id)
            return requested, dead

        return self.store._run(begin)

    def request_failed(
        self, send_ids: Sequence[int], error: str, backoff: Backoff, rng: random.Random
    ) -> None:
        """The request could not be made or was refused: ask again after a backoff (the
        request counts)."""
        now = self.store.clock()

        def request_failed(s: Session) -> None:
            for row in s.scalars(
                select(Outbound).where(
                    Outbound.id.in_(list(send_ids))
                    & (Outbound.state == SendState.COMMITTING.value)
                )
            ):
                row.next_attempt_at = now + backoff.delay(max(1, row.commit_attempts), rng)
                row.lease_until = None
                row.last_error = error[:2000]

        self.store._run(request_failed)

    def record_report(
        self,
        transaction_uid: str,
        committed: Sequence[str],
        failed: Mapping[str, str],
        max_requests: Mapping[str, int],
    ) -> dict[str, int]:
        """Apply a Storage Commitment report (N-EVENT-REPORT) of one transaction.

        Parameters
        ----------
        transaction_uid : str
            The request's Transaction UID (only objects whose latest request it was change).
        committed : sequence of str
            SOP Instance UIDs the peer commits to keep: ``sent``.
        failed : Mapping[str, str]
            SOP Instance UID -> the failure reason, in words: sent again (``pending``) and
            asked again, or ``dead`` when the destination's requests are spent.
        max_requests : Mapping[str, int]
            Requests per object of each commitment destination (absent: 1).

        Returns
        -------
        dict of str to int
            ``committed``, ``resend``, ``dead`` and ``unknown`` (references of no pending
            object of this transaction) counts.
        """
        now = self.store.clock()

        def record_report(s: Session) -> dict[str, int]:
            rows = s.scalars(
                select(Outbound)
                .where(
                    (Outbound.commitment_uid == transaction_uid)
                    & (Outbound.state == SendState.COMMITTING.value)
                )
                .with_for_update()
            ).all()
            by_uid = {row.object_uid: row for row in rows}
            counts = {"committed": 0, "resend": 0, "dead": 0, "unknown": 0}
            for uid in committed:
                row = by_uid.pop(uid, None)
                if row is None:
                    counts["unknown"] += 1
                    continue
                row.state = SendState.SENT.value
                row.sent_at = now
                row.lease_until = None
                row.last_error = None
                counts["committed"] += 1
            for uid, reason in failed.items():
                row = by_uid.pop(uid, None)
                if row is None:
                    counts["unknown"] += 1
                    continue
                row.lease_until = None
                if row.commit_attempts >= max_requests.get(row.destination, 1):
                    row.state = SendState.DEAD.value
                    row.last_error = (
                        f"storage commitment failed after {row.commit_attempts} request(s): "
                        f"{reason}"
                    )[:2000]
                    counts["dead"] += 1
                else:
                    row.state = SendState.PENDING.value
                    row.next_attempt_at = now
                    row.last_error = f"storage commitment failed: {reason}; sent again"[:2000]
                    counts["resend"] += 1
            return counts

        return self.store._run(record_report)

    def is_open(self, transaction_uid: str) -> bool:
        """True while an object of the transaction still waits for its report."""

        def is_open(s: Session) -> bool:
            return (
                s.scalar(
                    select(Outbound.id)
                    .where(
                        (Outbound.commitment_uid == transaction_uid)
                        & (Outbound.state == SendState.COMMITTING.value)
                    )
                    .limit(1)
                )
                is not None
            )

        return self.store._run(is_open)

    def open_transactions(self) -> dict[str, int]:
        """Transaction UID -> how many of its objects still wait for the report."""

        def open_transactions(s: Session) -> dict[str, int]:
            rows = s.execute(
                select(Outbound.commitment_uid, func.count())
                .where(
                    (Outbound.state == SendState.COMMITTING.value)
                    & Outbound.commitment_uid.is_not(None)
                )
                .group_by(Outbound.commitment_uid)
            ).all()
            return {str(uid): int(n) for uid, n in rows}

        return self.store._run(open_transactions)

    def studies_of(self, send_ids: Sequence[int] = (), transaction_uid: str = "") -> list[str]:
        """The studies of the given sends, or of the objects a transaction last asked for."""

        def studies_of(s: Session) -> list[str]:
            study = func.coalesce(Outbound.study_instance_uid, Result.study_instance_uid)
            query = select(study).distinct().outerjoin(Result, Result.id == Outbound.result_id)
            if transaction_uid:
                query = query.where(Outbound.commitment_uid == transaction_uid)
            else:
                query = query.where(Outbound.id.in_(list(send_ids)))
            return [str(uid) for (uid,) in s.execute(query.where(study.is_not(None))).all()]

        return self.store._run(studies_of)

    def study_states(
        self, destinations: Collection[str], study_instance_uids: Sequence[str] | None = None
    ) -> dict[str, str]:
        """Per study (every one, or only ``study_instance_uids``), its result objects'
        commitment at ``destinations``: ``done`` (every object committed), ``pending`` (some
        still on their way) or ``dead`` (:func:`delivery_state` over every object, not only
        the newest)."""
        if not destinations:
            return {}

        def study_states(s: Session) -> dict[str, str]:
            study = func.coalesce(Outbound.study_instance_uid, Result.study_instance_uid)
            where = Outbound.destination.in_(list(destinations)) & study.is_not(None)
            if study_instance_uids is not None:
                where = where & study.in_(list(study_instance_uids))
            rows = s.execute(
                select(study, Outbound.state, func.count())
                .outerjoin(Result, Result.id == Outbound.result_id)
                .where(where)
                .group_by(study, Outbound.state)
            ).all()
            states: dict[str, list[str]] = {}
            for uid, send_state, _n in rows:
                states.setdefault(str(uid), []).append(str(send_state))
            return {
                uid: combined.value
                for uid, found in states.items()
                if (combined := delivery_state(found)) is not None
            }

        return self.store._run(study_states)


def _requeue_finished_job(s: Session, job: Job, now: float) -> None:
    """Put a finished job back in the queue; its result record goes (sent objects stay ours)."""
    previous = s.execute(select(Result.id, Result.payload).where(Result.job_id == job.id)).all()
    result_ids = [int(r[0]) for r in previous]
    objects = [uid for _, payload in previous for uid in json.loads(payload).get("objects", [])]
    if objects:
        row = s.get(Superseded, job.instance_id)
        if row is None:
            s.add(Superseded(instance_id=job.instance_id, object_uids=json.dumps(objects)))
        else:
            row.object_uids = json.dumps(objects)
    if result_ids:
        s.execute(update(Outbound).where(Outbound.result_id.in_(result_ids)).values(result_id=None))
        s.execute(delete(Result).where(Result.id.in_(result_ids)))
    job.state = JobState.QUEUED.value
    job.attempts = 0
    job.not_before = 0.0
    job.last_error = None
    job.lease_owner = None
    job.lease_until = None
    job.updated_at = now


def resent_with_new_content(store: JobStore, sop_instance_uid: str, path: Path) -> int | None:
    """The receiver's check for a duplicate: the job id queued again when the file at ``path``
    differs from what was analysed (see :meth:`Monitor.resent_with_new_content`)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return Monitor(store).resent_with_new_content(sop_instance_uid, digest)


class FeedbackRow(Base):
    """One radiologist feedback on one image's result (:class:`spine_node.feedback.FeedbackEntry`)."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(128), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(128), index=True)
    verdict: Mapped[str] = mapped_column(String(16))
    corrected_label: Mapped[str | None] = mapped_column(String(16), nullable=True)
    lesion: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    model_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    reader: Mapped[str] = mapped_column(String(128), default="")
    comment: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16))
    recorded_at: Mapped[float] = mapped_column(Float, index=True)


class UnknownImage(KeyError):
    """No image with this SOP Instance UID was received (message names it)."""


class FeedbackLog:
    """Radiologist feedback in the queue database: recorded, listed, the latest per image.

    Parameters
    ----------
    store : JobStore
        The open queue.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def record(self, entry: FeedbackEntry) -> FeedbackEntry:
        """Store a feedback; the image's study, AI status and score are taken from the database.

        Parameters
        ----------
        entry : FeedbackEntry
            ``sop_instance_uid``, ``verdict``, ``corrected_label``, ``lesion``, ``reader``,
            ``comment`` and ``source`` are used; ``study_instance_uid`` may be any non-empty
            placeholder (the received image's study is stored).

        Returns
        -------
        FeedbackEntry
            As stored, with ``feedback_id``, ``recorded_at``, the study and the AI result.

        Raises
        ------
        UnknownImage
            When no image with that SOP Instance UID was received.
        """
        if not isinstance(entry, FeedbackEntry):
            raise TypeError(f"entry must be a FeedbackEntry, got {type(entry).__name__}")
        now = self.store.clock()

        def record(s: Session) -> FeedbackRow:
            found = s.execute(
                select(Instance.study_instance_uid, Result.status, Result.score)
                .outerjoin(Result, Result.instance_id == Instance.id)
                .where(Instance.sop_instance_uid == entry.sop_instance_uid)
            ).first()
            if found is None:
                raise UnknownImage(f"no image with SOP Instance UID {entry.sop_instance_uid!r}")
            study, status, score = found
            row = FeedbackRow(
                sop_instance_uid=entry.sop_instance_uid,
                study_instance_uid=study,
                verdict=entry.verdict.value,
                corrected_label=None if entry.corrected_label is None
                else entry.corrected_label.value,
                lesion=entry.lesion,
                model_status=status,
                model_score=score,
                reader=entry.reader,
                comment=entry.comment,
                source=entry.source.value,
                recorded_at=now,
            )
            s.add(row)
            s.flush()
            return row

        return _feedback_entry(self.store._run(record))

    def entries(
        self,
        study_instance_uid: str | None = None,
        sop_instance_uids: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[FeedbackEntry]:
        """Feedback given, oldest first (of one study, or of these images, when given)."""

        def entries(s: Session) -> list[FeedbackRow]:
            query = select(FeedbackRow).order_by(FeedbackRow.id)
            if study_instance_uid is not None:
                query = query.where(FeedbackRow.study_instance_uid == study_instance_uid)
            if sop_instance_uids is not None:
                query = query.where(FeedbackRow.sop_instance_uid.in_(list(sop_instance_uids)))
            if limit is not None:
                query = query.limit(limit)
            return list(s.scalars(query))

        return [_feedback_entry(row) for row in self.store._run(entries)]

    def latest(self, sop_instance_uids: Sequence[str]) -> dict[str, FeedbackEntry]:
        """The last feedback of each of these images that has one."""
        return {e.sop_instance_uid: e for e in self.entries(sop_instance_uids=sop_instance_uids)}


def _feedback_entry(row: FeedbackRow) -> FeedbackEntry:
    return FeedbackEntry.from_json(
        {
            "feedback_id": row.id,
            "recorded_at": row.recorded_at,
            "study_instance_uid": row.study_instance_uid,
            "sop_instance_uid": row.sop_instance_uid,
            "verdict": row.verdict,
            "corrected_label": row.corrected_label,
            "lesion": row.lesion,
            "model_status": row.model_status,
            "model_score": row.model_score,
            "reader": row.reader,
            "comment": row.comment,
            "source": row.source,
        }
    )

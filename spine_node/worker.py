"""The worker: claim queued jobs, run the cascade, write result objects, queue their sends.

Models stay warm in the :class:`Cascade` passed in; queued images are processed in batches.
A job whose processing raises is retried (``failed`` with backoff) up to ``job_max_attempts``;
after the last attempt the worker still tries to give the radiologist a visible outcome: a
"not processed" result saying processing failed. A job whose attempts killed the worker each
time (out-of-memory kill, a crash inside a model library) is handed back by
:meth:`JobStore.claim_jobs` with its ``report_reason`` once the attempts are spent, and is
reported "not processed" from its header alone, without running the cascade. Only when even
that is impossible does the job end ``dead``. SIGTERM (``stop`` set) lets the current batch finish.
While a batch is processed its leases are renewed every ``lease_s / 3`` (:mod:`spine_node.lease`),
so a slow batch is never claimed by another worker. A worker with no job to claim makes the
study summary reports still owed (:meth:`Worker.report_owed`): one that failed, or whose
worker died after recording the image's result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO

from spine_node.imaging import without_pixels
from spine_node.isolation import DecoderCrash
from spine_node.lease import LeaseRenewer
from spine_node.results.types import CascadeResult, ModelInfo, ResultRecord, Status
from spine_node.spool import relative_name, write_durable
from spine_node.store import (
    Backoff,
    ClaimedJob,
    DestinationKind,
    DestinationRef,
    JobOutcome,
    JobState,
    JobStore,
    LeaseLost,
    Monitor,
    OwedStudy,
    SendSpec,
)
from spine_node.timing import Stage, timed

logger = logging.getLogger(__name__)

#: An owed study report is left this long to the worker that recorded the result (seconds).
REPORT_OWED_AFTER_S = 5.0
#: At most this many owed study reports are made per idle poll.
REPORT_OWED_PER_POLL = 8
#: The most a worker waits, after a batch that emptied the queue, for the dispatcher to send the
#: batch's objects before it builds the study summaries (seconds).
SUMMARY_WAIT_S = 1.0
#: After an owed study report fails, the next is tried no earlier than this backoff: 30 s,
#: doubling per failure in a row, at most 1 hour (stored in ``study_states.report_retry_at``).
REPORT_RETRY_BACKOFF = Backoff(base_s=30.0, cap_s=3600.0, jitter=0.1)


class DispatchNotice(Protocol):
    """The dispatcher of the worker's process, as the worker sees it (``DispatchLoop``)."""

    def wake(self) -> None:
        """Sends were committed: sweep now."""
        ...

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no sweep is asked for or running; False when ``timeout_s`` passed."""
        ...


class CascadeLike(Protocol):
    """What the worker needs of the cascade (spine_node.pipeline.Cascade)."""

    model_info: ModelInfo

    def analyze(self, datasets: Sequence[Dataset]) -> list[CascadeResult]:
        """Return one result per dataset; never raise for one bad image."""
        ...


#: Builds the DICOM result objects for one image: (source, result, model).
ResultBuilder = Callable[[Dataset, CascadeResult, ModelInfo], list[Dataset]]
#: After an image's result is recorded: (study instance UID as received, source dataset).
#: Sends the study-level summary (study priority) when it changed (``study_report``).
StudyReportFn = Callable[[str, Dataset], Any]


class Progress:
    """When a loop last made progress (monotonic clock), read from another thread.

    Parameters
    ----------
    clock : callable, optional
        Seconds on a monotonic clock (injected by tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._at = clock()

    def mark(self) -> None:
        """Record progress now."""
        self._at = self.clock()

    def idle_s(self) -> float:
        """Seconds since the last :meth:`mark` (or since creation)."""
        return self.clock() - self._at


@dataclass(frozen=True)
class WorkerSettings:
    """Worker knobs (from Settings)."""

    owner: str
    batch_size: int
    lease_s: float
    poll_s: float
    max_attempts: int
    retry_delay_s: float
    destinations: tuple[DestinationRef, ...]


def encode_dataset(ds: Dataset) -> bytes:
    """Encode a result object as a DICOM Part 10 file (explicit VR little endian)."""
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Worker:
    """Runs the cascade on queued jobs.

    Parameters
    ----------
    store : JobStore
        The queue.
    cascade : CascadeLike
        Loaded, warm models.
    build_results : ResultBuilder
        Makes the SR / SC / GSPS datasets for one image.
    report_study : StudyReportFn or None
        Called once per study of a batch after the batch's results are recorded (after a
        result at once outside batches), and for owed reports when idle
        (:meth:`report_owed`): keeps the study summary (priority) true.
    spool_dir, outbox_dir : pathlib.Path
        Where received images are and where result objects are written.
    settings : WorkerSettings
        Batch size, lease, attempts, destinations.
    dispatch : DispatchNotice, optional
        The dispatcher of the same process (``DispatchLoop``): woken each time the worker has
        committed sends (an image's result objects, a study summary) instead of waiting for
        its next sweep. After a batch that emptied the queue the worker lets it send the
        batch's objects (:meth:`DispatchNotice.wait_idle`, at most :data:`SUMMARY_WAIT_S`)
        before it builds the study summaries: both need the interpreter, and the objects are
        what the radiologist waits for. None when the dispatcher runs elsewhere (it polls).
    """

    def __init__(
        self,
        store: JobStore,
        cascade: CascadeLike,
        build_results: ResultBuilder,
        report_study: StudyReportFn | None,
        spool_dir: Path,
        outbox_dir: Path,
        settings: WorkerSettings,
        dispatch: DispatchNotice | None = None,
    ) -> None:
        if dispatch is not None and not (
            callable(getattr(dispatch, "wake", None)) and callable(getattr(dispatch, "wait_idle", None))
        ):
            raise TypeError(
                f"dispatch must have wake() and wait_idle(), got {type(dispatch).__name__}"
            )
        self.store = store
        self.cascade = cascade
        self.build_results = build_results
        self.report_study = report_study
        self.spool_dir = spool_dir
        self.outbox_dir = outbox_dir
        self.settings = settings
        self.dispatch = dispatch
        self._rng = random.Random()  # jitter of the owed study reports' backoff
        self.progress = Progress()

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; the batch in hand is always finished.

        :attr:`progress` is marked before each batch and after it, so that a batch that never
        returns (a hung decoder or model call) shows as a growing :meth:`Progress.idle_s`.
        """
        logger.info(
            "worker %s started (model %s %s)",
            self.settings.owner,
            self.cascade.model_info.name,
            self.cascade.model_info.version,
        )
        while not stop.is_set():
            self.progress.mark()
            try:
                done = self.run_once()
            except Exception:
                logger.exception("worker %s: unexpected error, continuing", self.settings.owner)
                done = 0
            self.progress.mark()
            if done == 0:
                stop.wait(self.settings.poll_s)
        logger.info("worker %s stopped", self.settings.owner)

    def run_once(self) -> int:
        """Claim one batch and process it; return how many jobs were claimed.

        With no job to claim, make the owed study reports instead (:meth:`report_owed`).
        """
        jobs = self.store.claim_jobs(
            self.settings.owner,
            self.settings.lease_s,
            self.settings.batch_size,
            self.settings.max_attempts,
        )
        if not jobs:
            self.report_owed()
            return 0
        ids = [job.job_id for job in jobs]
        with LeaseRenewer(self.store, self.settings.owner, ids, self.settings.lease_s) as leases:
            summaries = self._process(jobs, leases)
        if summaries and self.dispatch is not None and len(jobs) < self.settings.batch_size:
            # the queue was empty at the claim: let this batch's objects leave first
            self.dispatch.wait_idle(SUMMARY_WAIT_S)
        for job, ds in summaries.values():
            self._report(job, ds)
        return len(jobs)

    def report_owed(self) -> int:
        """Make study summary reports owed for over :data:`REPORT_OWED_AFTER_S` seconds.

        At most :data:`REPORT_OWED_PER_POLL` studies. The patient and study attributes come
        from an image of the study still in the spool, else from a result object made for
        one (outbox); a study with neither is given up with a warning (its mark cleared), so
        that no report is tried forever. A report that raises stays owed and is tried again
        after :data:`REPORT_RETRY_BACKOFF` (stored with the study, so every worker and a
        restarted one keep it); each attempt is logged with its number.

        Returns
        -------
        int
            How many owed studies were reported.
        """
        if self.report_study is None:
            return 0
        older_than = self.store.clock() - REPORT_OWED_AFTER_S
        done = 0
        for study in self.store.owed_studies(older_than, REPORT_OWED_PER_POLL):
            study_log = {"study_instance_uid": study.study_instance_uid}
            source = self._study_source(study)
            if source is None:
                logger.warning(
                    "owed study summary given up: no image of the study in the spool and no "
                    "result object in the outbox to take the patient and study from",
                    extra=study_log,
                )
                self.store.clear_study_report(study.study_instance_uid)
                continue
            attempt = study.failures + 1
            try:
                self.report_study(study.study_instance_uid, source)
            except Exception as exc:
                failures, delay = self.store.study_report_failed(
                    study.study_instance_uid, REPORT_RETRY_BACKOFF, self._rng
                )
                logger.warning(
                    "owed study summary attempt %d failed (%s: %s); next attempt in %.0f s",
                    failures,  # as stored: another worker's failures count too
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=True,
                    extra=study_log,
                )
                continue
            done += 1
            logger.info("owed study summary attempt %d made", attempt, extra=study_log)
        if done:
            self._sends_queued()
        return done

    def _sends_queued(self) -> None:
        """Tell the dispatcher (same process) that sends were committed."""
        if self.dispatch is not None:
            self.dispatch.wake()

    def _study_source(self, study: OwedStudy) -> Dataset | None:
        """A header of one of the study's images: from the spool, else rebuilt from a result
        object made for it (outbox; its patient and study attributes, the image's UIDs)."""
        for relative in study.spool_paths:
            try:
                return dcmread(self.spool_dir / relative, force=True, stop_before_pixels=True)
            except (OSError, ValueError, InvalidDicomError):
                continue
        for image in study.images:
            for uid in image.payload.get("objects", []):
                try:
                    header = dcmread(
                        self.outbox_dir / relative_name(str(uid)), stop_before_pixels=True
                    )
                except (OSError, ValueError, InvalidDicomError):
                    continue
                header.SOPInstanceUID = image.sop_instance_uid
                header.SOPClassUID = image.sop_class_uid
                header.SeriesInstanceUID = image.series_instance_uid
                return header
        return None

    def _process(
        self, jobs: Sequence[ClaimedJob], leases: LeaseRenewer
    ) -> dict[str, tuple[ClaimedJob, Dataset]]:
        """Process one claimed batch while ``leases`` keeps its leases alive.

        Returns the study summaries still to make: per study of the batch, its last image
        recorded (job and dataset); every image's result is recorded first.
        """
        readable: list[tuple[ClaimedJob, Dataset]] = []
        analysed: dict[int, str] = {}  # job id -> SHA-256 of the file read (re-send detection)
        for job in jobs:
            if job.report_reason is not None:
                self._report_exhausted(job, job.report_reason)
                leases.release(job.job_id)
                continue
            try:
                path = self.spool_dir / job.spool_path
                ds: Dataset = dcmread(path, force=True)
                with open(path, "rb") as handle:
                    analysed[job.job_id] = hashlib.file_digest(handle, "sha256").hexdigest()
                readable.append((job, ds))
            except Exception as exc:
                self._fail(job, None, f"spooled file could not be read: {exc}")
                leases.release(job.job_id)
        while readable:
            try:
                results = self.cascade.analyze([ds for _, ds in readable])
            except DecoderCrash as exc:
                # only the image that crashed the isolated decoder fails; the rest go again
                crashed = [(j, d) for j, d in readable if j.sop_instance_uid == exc.uid]
                if not crashed:
                    crashed = readable[:1]
                for job, ds in crashed:
                    self._count_decoder_crash(job)
                    self._fail(job, without_pixels(ds), str(exc))
                    leases.release(job.job_id)
                crashed_ids = {job.job_id for job, _ in crashed}
                readable = [item for item in readable if item[0].job_id not in crashed_ids]
                continue
            except Exception as exc:
                for job, ds in readable:
                    self._fail(job, ds, f"cascade error: {type(exc).__name__}: {exc}")
                return {}
            break
        else:
            return {}
        # every image's result first (each commit wakes the dispatcher); the caller then makes
        # one summary per study of the batch, from its state after the whole batch
        summaries: dict[str, tuple[ClaimedJob, Dataset]] = {}
        for (job, ds), result in zip(readable, results, strict=True):
            try:
                self._finish(job, ds, result, summaries, analysed[job.job_id])
            except LeaseLost as exc:
                logger.warning("job %d: %s; result discarded", job.job_id, exc, extra=_fields(job))
            except Exception as exc:
                logger.exception("job %d: could not record the result", job.job_id, extra=_fields(job))
                self._fail(job, ds, f"result error: {type(exc).__name__}: {exc}")
            leases.release(job.job_id)
        return summaries

    def _amend_previous(self, job: ClaimedJob, objects: Sequence[Dataset]) -> None:
        """Make the new per-image SR amend the SR of the image's previous analysis (reprocess or
        a re-send with other content): Predecessor Documents Sequence, as DICOM amends SRs."""
        previous = Monitor(self.store).superseded_objects(job.job_id)
        new_uids = {str(o.SOPInstanceUID) for o in objects}
        for uid in previous:
            if uid in new_uids:
                continue  # the same object again (same bundle, same bytes)
            try:
                old = dcmread(self.outbox_dir / relative_name(uid), stop_before_pixels=True)
            except OSError:
                logger.info("job %d: previous object %s no longer in the outbox; not amended",
                            job.job_id, uid, extra=_fields(job))
                continue
            if str(old.get("Modality", "")) != "SR":
                continue
            for sr in objects:
                if str(sr.get("Modality", "")) == "SR" and sr.get("SeriesNumber") == old.get(
                    "SeriesNumber"
                ):
                    sr.PredecessorDocumentsSequence = [_predecessor(old)]

    def _count_decoder_crash(self, job: ClaimedJob) -> None:
        """Count the crash for the metrics; a failure to count never changes the job's fate."""
        try:
            self.store.record_decoder_crash(job.job_id)
        except Exception as exc:
            logger.warning("job %d: decoder crash not counted: %s", job.job_id, exc,
                           extra=_fields(job))

    def _finish(
        self,
        job: ClaimedJob,
        ds: Dataset,
        result: CascadeResult,
        summaries: dict[str, tuple[ClaimedJob, Dataset]] | None = None,
        content_sha256: str | None = None,
    ) -> None:
        """Build, write and record the image's result objects (with ``content_sha256``, the
        hash of the file analysed: re-send detection); then update the study summary, or, with
        ``summaries``, leave that to the caller (the batch's last image of each study)."""
        model = self.cascade.model_info
        revision = Monitor(self.store).analysis_revision(job.job_id)
        if revision != 1:  # re-sent with other content: new objects, new UIDs
            model = dataclasses.replace(model, analysis_revision=revision)
        spent = dict(result.stage_seconds)
        with timed(spent, Stage.RESULTS):
            objects = self.build_results(ds, result, model)
            self._amend_previous(job, objects)
            sends: list[SendSpec] = []
            for obj in objects:
                uid = str(obj.SOPInstanceUID)
                relative = relative_name(uid)
                write_durable(self.outbox_dir, relative, encode_dataset(obj))
                sends.extend(
                    SendSpec(dest.name, dest.kind, uid, relative)
                    for dest in self.settings.destinations
                    if dest.kind is DestinationKind.DICOM  # image objects go to DICOM peers only
                )
        record = ResultRecord(
            job.study_instance_uid, result, tuple(str(o.SOPInstanceUID) for o in objects)
        )
        payload = record.to_json()
        outcome = JobOutcome(
            result.status, result.score, result.reason, payload, model.version, content_sha256
        )
        # one commit: the result, its sends, the analysed file's hash and the last-job heartbeat
        self.store.complete_job(job.job_id, self.settings.owner, outcome, sends, spent)
        if sends:
            self._sends_queued()
        logger.info(
            "job %d: %s%s score=%s findings=%d objects=%d",
            job.job_id,
            result.status.value,
            f" ({result.reason})" if result.reason else "",
            None if result.score is None else round(result.score, 4),
            len(result.findings),
            len(objects),
            extra=_fields(job),
        )
        if summaries is None:
            self._report(job, ds)
        else:
            summaries[job.study_instance_uid] = (job, ds)

    def _report(self, job: ClaimedJob, ds: Dataset) -> None:
        """Update the study summary after ``job``'s result was recorded (an error is logged:
        the summary stays owed, :meth:`report_owed`)."""
        if self.report_study is None:
            return
        try:
            self.report_study(job.study_instance_uid, ds)
        except Exception:
            logger.exception(
                "job %d: the study summary could not be updated", job.job_id, extra=_fields(job)
            )
        else:
            self._sends_queued()  # the summary's sends, when it changed

    def _threshold(self) -> float:
        """The bundle's decision threshold, stated in every report (never a library default)."""
        return float(self.cascade.model_info.parameters["threshold"])

    def _report_exhausted(self, job: ClaimedJob, reason: str) -> None:
        """End a job whose attempts are spent "not processed", without decoding its pixels.

        Its earlier attempts killed their worker (or hung past the lease), so the cascade is
        not run again: the SR is built from the header alone.
        """
        logger.error("job %d: attempts spent, reporting not processed: %s", job.job_id, reason)
        try:
            header = dcmread(self.spool_dir / job.spool_path, force=True, stop_before_pixels=True)
            result = CascadeResult(
                sop_instance_uid=job.sop_instance_uid,
                status=Status.NOT_PROCESSED,
                reason=reason[:500],
                threshold=self._threshold(),
            )
            self._finish(job, without_pixels(header), result)
        except LeaseLost as exc:
            logger.warning("job %d: %s; report discarded", job.job_id, exc)
        except Exception as exc:
            logger.error("job %d: could not report 'not processed': %s", job.job_id, exc)
            self._fail(job, None, f"{reason}; the report could not be made: {exc}")

    def _fail(self, job: ClaimedJob, ds: Dataset | None, error: str) -> None:
        logger.warning(
            "job %d attempt %d failed: %s", job.job_id, job.attempts, error, extra=_fields(job)
        )
        last = job.attempts >= self.settings.max_attempts
        if last and ds is not None:
            reason = f"processing failed after {job.attempts} attempts: {error}"
            try:
                result = CascadeResult(
                    sop_instance_uid=job.sop_instance_uid,
                    status=Status.NOT_PROCESSED,
                    reason=reason[:500],
                    threshold=self._threshold(),
                )
                self._finish(job, ds, result)
                return
            except Exception:
                logger.exception(
                    "job %d: could not even report 'not processed'", job.job_id, extra=_fields(job)
                )
        try:
            state = self.store.fail_job(
                job.job_id,
                self.settings.owner,
                error,
                self.settings.max_attempts,
                self.settings.retry_delay_s,
            )
        except LeaseLost as exc:
            logger.warning("job %d: %s", job.job_id, exc, extra=_fields(job))
            return
        if state is JobState.DEAD:
            logger.error(
                "job %d is dead after %d attempts: %s",
                job.job_id,
                job.attempts,
                error,
                extra=_fields(job),
            )


def _predecessor(old: Dataset) -> Dataset:
    """A Predecessor Documents Sequence item referencing the SR ``old``."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = old.SOPClassUID
    sop.ReferencedSOPInstanceUID = old.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = old.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    item = Dataset()
    item.StudyInstanceUID = old.StudyInstanceUID
    item.ReferencedSeriesSequence = [series]
    return item


def _fields(job: ClaimedJob) -> dict[str, Any]:
    """Structured log fields of a job line (UIDs are hashed by the formatter unless log_phi)."""
    return {
        "job_id": job.job_id,
        "study_instance_uid": job.study_instance_uid,
        "sop_instance_uid": job.sop_instance_uid,
    }

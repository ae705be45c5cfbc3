"""The dispatcher: deliver result objects to every destination, with retries and dead letters.

Each sweep claims due sends and hands each destination's batch to the sender registered for
the send's :class:`~spine_node.store.DestinationKind` (DICOM: one association per destination
for the batch, each stored Part 10 file sent by C-STORE as it is encoded, never decoded and
re-encoded, every DIMSE status checked; webhook: one HTTP POST per stored JSON document, with
the study's ``delivery`` state filled in when it is posted; HL7: one stored ORU^R01 per MLLP
connection, delivered only on an accepting ACK, ``spine_node.mllp``). A failed send waits
with exponential backoff
and jitter; after the last attempt it is ``dead`` (visible in ``spine-node status``, requeued by
``spine-node replay``). A retried send reuses the stored object, so its SOP Instance UID never
changes. A :class:`DispatchLoop` thread runs the sweeps of sends: every ``sweep_interval_s``
and, when the worker runs in the same process, at once when the worker has committed a result
whose sends are queued (:meth:`DispatchLoop.wake`). APScheduler drives the other periodic
sweeps (expired leases, spool and outbox retention).

At a DICOM destination with ``storage_commitment`` an object the peer stored is ``committing``:
on the same association the dispatcher requests Storage Commitment for the batch
(:mod:`spine_node.commitment`), keeps the association open up to ``commitment_report_wait_s``
for a report on it, and counts each object delivered when a report (on that association or on a
new one to the node's receiver) confirms it. Each sweep also asks again for objects whose
report is overdue (``commitment_timeout_s``); a failed object is sent again and asked again;
after ``commitment_retries`` it is dead with the reason.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pynetdicom
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from spine_node.audit import AuditLog, AuditRecord, Direction
from spine_node.commitment import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    Reference,
    ReportContext,
    announce_settled,
    handle_report,
    request_commitment,
)
from spine_node.config import (
    Destination,
    DicomDestination,
    Hl7Destination,
    Settings,
    WebhookDestination,
)
from spine_node.mllp import Hl7DeliveryError, send_message
from spine_node.store import (
    Backoff,
    ClaimedSend,
    Commitments,
    DeliveryState,
    DestinationKind,
    JobStore,
    Monitor,
    SendState,
)
from spine_node.tls import client_ssl_context
from spine_node.transport import low_latency_handlers

logger = logging.getLogger(__name__)

D = TypeVar("D", DicomDestination, WebhookDestination, Hl7Destination)

#: DIMSE statuses that mean the peer stored the object (success and the storage warnings).
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: Presentation contexts requested for Storage Commitment (the default syntax first).
COMMITMENT_CONTEXTS = (
    (STORAGE_COMMITMENT_PUSH_MODEL, ImplicitVRLittleEndian),
    (STORAGE_COMMITMENT_PUSH_MODEL, ExplicitVRLittleEndian),
)
#: How often the dispatcher looks whether a report arrived while it keeps an association open.
REPORT_POLL_S = 0.1


@dataclass(frozen=True)
class DispatchSettings:
    """Dispatcher knobs (from Settings)."""

    calling_ae: str
    max_attempts: int
    backoff: Backoff
    batch_size: int
    lease_s: float
    timeout_s: float


def dispatch_settings(settings: Settings) -> DispatchSettings:
    """Extract the dispatcher's settings."""
    return DispatchSettings(
        calling_ae=settings.ae_title,
        max_attempts=settings.send_max_attempts,
        backoff=Backoff(
            settings.send_backoff_base_s, settings.send_backoff_max_s, settings.send_backoff_jitter
        ),
        batch_size=settings.send_batch_size,
        lease_s=max(60.0, settings.dimse_timeout_s * 4),
        timeout_s=settings.dimse_timeout_s,
    )


#: One batch of sends to one destination of one kind: ``(destination name, sends)``.
Sender = Callable[[str, list[ClaimedSend]], None]


def send_files_as_encoded() -> None:
    """Make ``send_c_store(path)`` send a file's encoded data set as it is (no decode).

    pynetdicom's documented switch ``_config.STORE_SEND_CHUNKED_DATASET`` (2.0+): a C-STORE
    given a file path sends the data set's bytes after the File Meta Information in chunks,
    instead of decoding the file with ``dcmread`` and encoding it again. It only changes
    ``send_c_store`` calls given a path, which only the dispatcher makes.
    """
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True


def _scu_ae(
    calling_ae: str, timeout_s: float, contexts: Sequence[tuple[str, str]] = ()
) -> AE:
    """An SCU with one requested context per ``(SOP class, transfer syntax)`` pair."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    if contexts:
        for sop_class, transfer_syntax in sorted(set(contexts)):
            ae.add_requested_context(sop_class, [transfer_syntax])
    else:
        ae.requested_contexts = StoragePresentationContexts
    return ae


def echo(
    destination: DicomDestination,
    calling_ae: str,
    timeout_s: float = 10.0,
    notes: list[str] | None = None,
) -> int | None:
    """C-ECHO a destination; return the DIMSE status (None when no association was made).

    Parameters
    ----------
    destination : DicomDestination
        The peer.
    calling_ae : str
        Our AE title.
    timeout_s : float
        ACSE, DIMSE and network timeouts, seconds.
    notes : list of str, optional
        Receives why no association was made: rejected, aborted or no answer.

    Raises
    ------
    OSError
        When the host cannot be resolved or the TLS files cannot be used.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    tls = (
        (client_ssl_context(destination.tls), destination.host) if destination.tls.enabled else None
    )
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls,
        evt_handlers=low_latency_handlers(),
    )
    if not assoc.is_established:
        if notes is not None:
            if assoc.is_rejected:
                notes.append(
                    f"the peer rejected the association (is {destination.ae_title!r} its AE title, "
                    f"and does it accept calls from {calling_ae!r}?)"
                )
            else:  # pynetdicom aborts a request left unanswered too
                notes.append(
                    f"the association request was aborted or not answered within {timeout_s:g} s "
                    "(is it a DICOM port? with TLS: do both sides use it?)"
                )
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


class Dispatcher:
    """Delivers queued result objects.

    Parameters
    ----------
    store : JobStore
        The queue.
    destinations : sequence of Destination
        Configured destinations (DICOM peers, webhooks); a send names one and has its kind.
    outbox_dir : pathlib.Path
        Where result objects are stored.
    settings : DispatchSettings
        Attempts, backoff, batch size.
    rng : random.Random
        Jitter source (seeded by tests).
    audit : AuditLog, optional
        The audit trail: one record per C-STORE attempt (delivered or refused).
    """

    def __init__(
        self,
        store: JobStore,
        destinations: Sequence[Destination],
        outbox_dir: Path,
        settings: DispatchSettings,
        rng: random.Random,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.destinations = {d.name: d for d in destinations}
        self.outbox_dir = outbox_dir
        self.settings = settings
        self.rng = rng
        #: The sender of each destination kind.
        self.senders: Mapping[DestinationKind, Sender] = {
            DestinationKind.DICOM: self._send_dicom_batch,
            DestinationKind.WEBHOOK: self._post_webhooks,
            DestinationKind.HL7: self._send_hl7_batch,
        }
        send_files_as_encoded()
        self._context: dict[int, tuple[int | None, str | None]] = {}
        self.commitments = Commitments(store)
        self._leftovers_checked = False
        #: the N-EVENT-REPORT handler's context (bound to the dispatcher's associations)
        self.report_context = ReportContext(
            store,
            {
                d.name: d.commitment_max_requests
                for d in destinations
                if isinstance(d, DicomDestination) and d.storage_commitment
            },
            audit,
        )

    def run_once(self) -> int:
        """Claim due sends and try each once, then make the commitment requests due; return
        how many sends and requested objects were attempted."""
        attempted = self._run_sends()
        return attempted + self._request_due_commitments()

    def _run_sends(self) -> int:
        sends = self.store.claim_sends(self.settings.lease_s, self.settings.batch_size)
        if sends:
            self._context = Monitor(self.store).send_context([s.send_id for s in sends])
        batches: dict[tuple[DestinationKind, str], list[ClaimedSend]] = defaultdict(list)
        for send in sends:
            batches[(send.kind, send.destination)].append(send)
        for (kind, name), batch in batches.items():
            sender = self.senders.get(kind)
            if sender is None:
                for send in batch:
                    self._failed(send, f"no sender for destination kind {kind.value!r}")
                continue
            sender(name, batch)
        return len(sends)

    def _configured(self, name: str, kind: type[D], batch: list[ClaimedSend]) -> D | None:
        """The destination ``name`` if it is still configured with the send's kind."""
        dest = self.destinations.get(name)
        if isinstance(dest, kind):
            return dest
        what = "no longer configured" if dest is None else f"now of kind {dest.kind!r}"
        for send in batch:
            self._failed(send, f"{send.kind.value} destination {name!r} is {what}")
        return None

    def _send_dicom_batch(self, name: str, batch: list[ClaimedSend]) -> None:
        dest = self._configured(name, DicomDestination, batch)
        if dest is not None:
            self._send_dicom(dest, batch)

    def _post_webhooks(self, name: str, batch: list[ClaimedSend]) -> None:
        dest = self._configured(name, WebhookDestination, batch)
        if dest is not None:
            for send in batch:
                self._post_webhook(dest, send)

    def _send_hl7_batch(self, name: str, batch: list[ClaimedSend]) -> None:
        dest = self._configured(name, Hl7Destination, batch)
        if dest is not None:
            for send in batch:  # oldest first: a study's revisions reach the RIS in order
                self._send_hl7(dest, send)

    def _send_hl7(self, dest: Hl7Destination, send: ClaimedSend) -> None:
        """Send one stored HL7 message; delivered only on an accepting ACK for its control ID.

        A message for which a newer one of the same study is queued to the same destination
        is not sent (``superseded``): the newer one states the study as it is now.
        """
        newer = self.store.supersede_if_newer(send.send_id)
        if newer is not None:
            logger.info(
                "send %d%s to HL7 destination %s superseded by send %d: not sent",
                send.send_id,
                self._of_job(send),
                dest.name,
                newer,
                extra=self._fields(send),
            )
            return
        try:
            # bytes, not read_text: universal newlines would turn the segment separators (CR)
            # into line feeds; UTF-8 reads both character sets (ASCII is a subset), and
            # send_message checks the text against the message's MSH-18
            message = (self.outbox_dir / send.path).read_bytes().decode("utf-8")
            ack = send_message(dest.host, dest.port, message, dest.timeout_s)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._failed(send, f"HL7 message unreadable: {exc}")
            return
        except Hl7DeliveryError as exc:
            self._failed(send, f"HL7 to {dest.host}:{dest.port}: {exc}", exc.detail)
            return
        except Exception as exc:  # unexpected: retried like any failure, the batch goes on
            self._failed(send, f"HL7 to {dest.host}:{dest.port}: {type(exc).__name__}: {exc}")
            return
        self.store.mark_sent(send.send_id)
        logger.info(
            "send %d%s delivered to HL7 destination %s (ACK %s, control ID %s)",
            send.send_id,
            self._of_job(send),
            dest.name,
            ack.code,
            ack.control_id,
            extra=self._fields(send),
        )
        self._delivery_changed(send, "ris")

    def _delivery_changed(self, send: ClaimedSend, field: str) -> None:
        """Post the study's webhook again when its ``delivery[field]`` became done or dead.

        A webhook already posted said what stood then (e.g. the RIS message pending); the
        webhook shows the outcome too (``JobStore.queue_webhook_update``).
        """
        study = self._context.get(send.send_id, (None, None))[1]
        if study is None:
            return
        state = Monitor(self.store).study_delivery(
            [study], self.report_context.max_requests
        )[study].get(field)
        if state in (DeliveryState.DONE.value, DeliveryState.DEAD.value):
            queued = self.store.queue_webhook_update(study, f"{field}-{state}")
            if queued:
                logger.info(
                    "send %d: %s delivery of the study is %s: its webhook is posted again",
                    send.send_id,
                    field,
                    state,
                    extra=self._fields(send),
                )

    def _failed(self, send: ClaimedSend, error: str, detail: str = "") -> None:
        """Record and log a failed attempt; ``detail`` (the peer's words) is stored, not logged."""
        stored = f"{error} ({detail})" if detail else error
        state = self.store.mark_send_failed(
            send.send_id, stored, self.settings.max_attempts, self.settings.backoff, self.rng
        )
        log = logger.error if state.value == "dead" else logger.warning
        log(
            "send %d%s to %s attempt %d: %s -> %s",
            send.send_id,
            self._of_job(send),
            send.destination,
            send.attempts,
            error,
            state.value,
            extra=self._fields(send),
        )
        if state is SendState.DEAD and send.kind is DestinationKind.HL7:
            self._delivery_changed(send, "ris")
        if state is SendState.DEAD and send.destination in self.report_context.max_requests:
            self._delivery_changed(send, "commitment")

    def _of_job(self, send: ClaimedSend) -> str:
        job_id = self._context.get(send.send_id, (None, None))[0]
        return "" if job_id is None else f" of job {job_id}"

    def _fields(self, send: ClaimedSend) -> dict[str, object]:
        """Structured log fields: send, destination, job and study (hashed unless log_phi)."""
        job_id, study = self._context.get(send.send_id, (None, None))
        return {
            "send_id": send.send_id,
            "destination": send.destination,
            "job_id": job_id,
            "study_instance_uid": study,
        }

    def _associate(
        self, dest: DicomDestination, contexts: Sequence[tuple[str, str]]
    ) -> Any:
        """Request an association with ``dest`` proposing ``contexts`` (plus Storage
        Commitment, with the report handler bound, when the destination asks for it)."""
        handlers: list[Any] = list(low_latency_handlers())
        if dest.storage_commitment:
            contexts = [*contexts, *COMMITMENT_CONTEXTS]
            handlers.append((evt.EVT_N_EVENT_REPORT, handle_report, [self.report_context]))
        ae = _scu_ae(self.settings.calling_ae, self.settings.timeout_s, contexts)
        tls = (client_ssl_context(dest.tls), dest.host) if dest.tls.enabled else None
        return ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls, evt_handlers=handlers
        )

    def _send_dicom(self, dest: DicomDestination, batch: list[ClaimedSend]) -> None:
        files: list[tuple[ClaimedSend, Path, FileMetaDataset]] = []
        contexts: list[tuple[str, str]] = []
        for send in batch:
            path = self.outbox_dir / send.path
            try:
                meta = read_file_meta_info(path)  # the File Meta Information only
                contexts.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
                files.append((send, path, meta))
            except Exception as exc:
                self._failed(send, f"result object unreadable: {exc}")
        if not files:
            return
        assoc = self._associate(dest, contexts)
        if not assoc.is_established:
            for send, _, _ in files:
                self._failed(
                    send,
                    f"association with {dest.ae_title}@{dest.host}:{dest.port} "
                    "was rejected or could not be made",
                )
            return
        stored: list[tuple[ClaimedSend, Reference]] = []
        try:
            for send, path, meta in files:
                if not assoc.is_established:
                    self._failed(send, "association ended before this object was sent")
                    continue
                try:
                    rsp = assoc.send_c_store(path)  # the stored bytes, as encoded
                except Exception as exc:
                    self._failed(send, f"C-STORE error: {exc}")
                    continue
                status = int(rsp.Status) if "Status" in rsp else None
                self._audit(dest, path, meta, status)
                if status in DELIVERED_STATUSES and dest.storage_commitment:
                    self.commitments.stored(send.send_id, self.settings.lease_s)
                    stored.append((send, _reference(meta)))
                    logger.info(
                        "send %d%s stored at %s (status 0x%04X), commitment to be requested",
                        send.send_id,
                        self._of_job(send),
                        dest.name,
                        status,
                        extra=self._fields(send),
                    )
                elif status in DELIVERED_STATUSES:
                    self.store.mark_sent(send.send_id)
                    logger.info(
                        "send %d%s delivered to %s (status 0x%04X)",
                        send.send_id,
                        self._of_job(send),
                        dest.name,
                        status,
                        extra=self._fields(send),
                    )
                else:
                    text = "no response" if status is None else f"status 0x{status:04X}"
                    self._failed(send, f"C-STORE refused by {dest.ae_title}: {text}")
            if stored:
                self._request_commitment(dest, assoc, stored)
        finally:
            if assoc.is_established:
                assoc.release()

    def _request_due_commitments(self) -> int:
        """Ask again for committing objects whose report is overdue (or never requested).

        Without a commitment destination only the first sweep looks (objects left
        committing at a destination whose ``storage_commitment`` was since turned off).
        """
        if not self.report_context.max_requests:
            if self._leftovers_checked:
                return 0
            self._leftovers_checked = True
        claimed = self.commitments.claim_due(self.settings.lease_s, self.settings.batch_size)
        if not claimed:
            return 0
        self._context = Monitor(self.store).send_context([s.send_id for s in claimed])
        batches: dict[str, list[ClaimedSend]] = defaultdict(list)
        for send in claimed:
            batches[send.destination].append(send)
        for name, batch in batches.items():
            dest = self._configured(name, DicomDestination, batch)
            if dest is None:
                continue
            if not dest.storage_commitment:
                for send in batch:  # commitment was turned off: the C-STORE success counts
                    self.store.mark_sent(send.send_id)
                continue
            items: list[tuple[ClaimedSend, Reference]] = []
            for send in batch:
                try:
                    items.append((send, _reference(read_file_meta_info(self.outbox_dir / send.path))))
                except Exception as exc:
                    self._failed(send, f"result object unreadable: {exc}")
            if not items:
                continue
            assoc = self._associate(dest, [])
            try:
                self._request_commitment(dest, assoc, items)
            finally:
                if assoc.is_established:
                    assoc.release()
        return len(claimed)

    def _request_commitment(
        self, dest: DicomDestination, assoc: Any, items: list[tuple[ClaimedSend, Reference]]
    ) -> None:
        """Record and send one commitment request for ``items``; wait a while for its report.

        The Transaction UID is stored with the objects before the N-ACTION goes out, so a
        report that arrives at once (on a new association) finds them.
        """
        transaction_uid = generate_uid()
        requested, dead = self.commitments.begin(
            [send.send_id for send, _ in items],
            transaction_uid,
            dest.commitment_timeout_s,
            dest.commitment_max_requests,
        )
        for send, _ in items:
            if send.send_id in dead:
                logger.error(
                    "send %d%s to %s: no storage commitment report after %d request(s) -> dead",
                    send.send_id,
                    self._of_job(send),
                    dest.name,
                    dest.commitment_max_requests,
                    extra=self._fields(send),
                )
        if dead:
            announce_settled(
                self.store,
                self.commitments.studies_of(send_ids=dead),
                list(self.report_context.max_requests),
            )
        references = [ref for send, ref in items if send.send_id in requested]
        if not references:
            return
        if not assoc.is_established:
            why = (
                f"association with {dest.ae_title}@{dest.host}:{dest.port} "
                "was rejected or could not be made"
            )
            status = None
        else:
            status, why = request_commitment(assoc, transaction_uid, references)
        if status != 0:
            self.commitments.request_failed(
                requested,
                f"storage commitment request to {dest.ae_title}: {why}",
                self.settings.backoff,
                self.rng,
            )
            logger.warning(
                "storage commitment request %s to %s for %d object(s) failed: %s",
                transaction_uid,
                dest.name,
                len(references),
                why,
                extra={"destination": dest.name, "transaction_uid": transaction_uid},
            )
            return
        logger.info(
            "storage commitment requested from %s for %d object(s), transaction %s",
            dest.name,
            len(references),
            transaction_uid,
            extra={"destination": dest.name, "transaction_uid": transaction_uid},
        )
        # a report on this association is served by its reactor while we wait here
        deadline = time.monotonic() + dest.commitment_report_wait_s
        while (
            time.monotonic() < deadline
            and assoc.is_established
            and self.commitments.is_open(transaction_uid)
        ):
            time.sleep(REPORT_POLL_S)

    def _audit(
        self, dest: DicomDestination, path: Path, meta: FileMetaDataset, status: int | None
    ) -> None:
        """Append one C-STORE attempt to the audit trail (study UID read from the file)."""
        if self.audit is None:
            return
        try:
            study = str(
                dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).get(
                    "StudyInstanceUID", ""
                )
            )
        except Exception:  # the send itself is what matters; the UID is best effort
            study = ""
        self.audit.append(
            AuditRecord(
                time=AuditRecord.now(),
                direction=Direction.SENT,
                peer=f"{dest.host}:{dest.port}",
                calling_ae=self.settings.calling_ae,
                called_ae=dest.ae_title,
                sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
                sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")),
                study_instance_uid=study,
                outcome="sent" if status in DELIVERED_STATUSES else "failed",
                detail="no response" if status is None else f"0x{status:04X}",
            )
        )

    def _post_webhook(self, dest: WebhookDestination, send: ClaimedSend) -> None:
        try:
            body = self._with_delivery((self.outbox_dir / send.path).read_bytes())
            request = urllib.request.Request(
                dest.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=dest.timeout_s) as response:
                code = response.status
        except Exception as exc:
            self._failed(send, f"webhook POST failed: {exc}")
            return
        if 200 <= code < 300:
            self.store.mark_sent(send.send_id)
            logger.info(
                "send %d%s posted to webhook %s (HTTP %d)",
                send.send_id,
                self._of_job(send),
                dest.name,
                code,
                extra=self._fields(send),
            )
        else:
            self._failed(send, f"webhook answered HTTP {code}")


    def _with_delivery(self, body: bytes) -> bytes:
        """A study webhook body with the study's ``delivery`` state as it is now.

        The stored body is the revision's state; where each delivery of the study stands
        (``Monitor.study_delivery``: e.g. ``ris`` done / pending / dead) is read when posting.
        """
        document = json.loads(body)
        study = document.get("study_instance_uid") if isinstance(document, dict) else None
        if not isinstance(study, str):
            return body
        delivery = Monitor(self.store).study_delivery(
            [study], self.report_context.max_requests
        )[study]
        return json.dumps({**document, "delivery": delivery}, sort_keys=True).encode()


def _reference(meta: FileMetaDataset) -> Reference:
    """The commitment reference of a stored object, from its File Meta Information."""
    return Reference(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID))


def retention_sweep(store: JobStore, spool_dir: Path, retention_s: float, now: float) -> int:
    """Delete spool files of delivered instances older than the retention; return the count."""
    removed = 0
    for instance_id, relative in store.deliverable_spool(now - retention_s):
        (spool_dir / relative).unlink(missing_ok=True)
        store.mark_spool_deleted(instance_id)
        removed += 1
    if removed:
        logger.info("retention removed %d spooled images", removed)
    return removed


def outbox_retention_sweep(
    store: JobStore, outbox_dir: Path, retention_s: float, now: float
) -> int:
    """Delete outbox files delivered to every destination more than ``retention_s`` ago.

    Objects not yet delivered (pending, sending, dead) keep their files for retries and replay.
    Returns how many files were removed.
    """
    monitor = Monitor(store)
    removed = 0
    while True:
        paths = monitor.expired_outbox(now - retention_s)
        if not paths:
            break
        for relative in paths:
            (outbox_dir / relative).unlink(missing_ok=True)
        monitor.mark_outbox_removed(paths)
        removed += len(paths)
    if removed:
        logger.info("retention removed %d delivered result objects from the outbox", removed)
    return removed


def heartbeat_retention_sweep(store: JobStore, retention_s: float) -> int:
    """Forget the heartbeat rows of workers not seen for ``retention_s`` seconds.

    A worker that stops cleanly removes its own row; a crashed or killed one leaves a row that
    ``status`` shows as "NOT SEEN" until this sweep forgets it. Returns how many were removed.
    """
    owners = Monitor(store).prune_workers(retention_s)
    if owners:
        logger.info(
            "retention forgot %d worker heartbeats not seen for %g h: %s",
            len(owners),
            retention_s / 3600,
            ", ".join(owners),
        )
    return len(owners)


class DispatchLoop:
    """Runs the dispatcher's sweeps in one thread: every ``interval_s``, and at once when woken.

    A worker in the same process calls :meth:`wake` after it commits a result whose sends are
    queued, so the objects leave without waiting for the next interval; a dispatcher in a
    process of its own is never woken and sweeps every ``interval_s``. A wake that comes while
    a sweep runs is never lost: another sweep starts as soon as that one ends (it claims what
    the running one did not). A sweep that claimed a full batch (``batch_size``) is followed at
    once too. :meth:`wait_idle` waits until no woken sweep is pending or running (the worker
    lets the image objects leave before it builds study summaries: both need the
    interpreter). :meth:`stop` lets the running sweep finish, then the thread ends.

    Parameters
    ----------
    sweep : callable
        One sweep; returns how many sends it attempted (:meth:`Dispatcher.run_once`).
    interval_s : float
        Seconds between sweeps when not woken (``sweep_interval_s``).
    batch_size : int
        The most sends one sweep claims (``send_batch_size``).

    Raises
    ------
    TypeError
        When ``sweep`` is not callable.
    ValueError
        When ``interval_s`` or ``batch_size`` is not positive.
    """

    def __init__(self, sweep: Callable[[], int], interval_s: float, batch_size: int) -> None:
        if not callable(sweep):
            raise TypeError(f"sweep must be callable, got {type(sweep).__name__}")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self._sweep = sweep
        self.interval_s = float(interval_s)
        self.batch_size = batch_size
        self._state = threading.Condition()
        self._woken = False  # a wake not yet served by a sweep started after it
        self._sweeping = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Ask for a sweep now (thread-safe; a wake during a sweep makes another)."""
        with self._state:
            self._woken = True
            self._state.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no sweep is asked for or running (at most ``timeout_s`` seconds).

        Returns
        -------
        bool
            True when idle (or stopped), False when ``timeout_s`` passed first.
        """
        with self._state:
            return self._state.wait_for(
                lambda: self._stopping or not (self._woken or self._sweeping), timeout_s
            )

    def start(self) -> DispatchLoop:
        """Start the sweeping thread (the first sweep runs at once); return ``self``."""
        if self._thread is not None:
            raise RuntimeError("the dispatch loop was already started")
        with self._state:
            self._woken = True  # the first sweep: sends left by an earlier run
        self._thread = threading.Thread(target=self.run, name="dispatcher", daemon=True)
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        """True while the sweeping thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop: the sweep in progress finishes, no other starts; wait for the thread."""
        with self._state:
            self._stopping = True
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """Sweep until :meth:`stop` (called by :meth:`start`'s thread)."""
        attempted = 0
        while True:
            with self._state:
                if attempted < self.batch_size and not self._woken and not self._stopping:
                    self._state.wait(self.interval_s)  # until woken, stopped or the interval
                if self._stopping:
                    self._state.notify_all()
                    return
                # taken before the sweep claims: a wake from now on makes another sweep
                self._woken = False
                self._sweeping = True
            try:
                attempted = self._sweep()
            except Exception:
                logger.exception("dispatcher sweep failed; the next one runs as usual")
                attempted = 0
            finally:
                with self._state:
                    self._sweeping = False
                    self._state.notify_all()


def start_dispatch_loop(settings: Settings, dispatcher: Dispatcher) -> DispatchLoop:
    """Start the sweeps of sends every ``sweep_interval_s`` (and whenever woken)."""
    return DispatchLoop(
        dispatcher.run_once, settings.sweep_interval_s, settings.send_batch_size
    ).start()


def start_scheduler(settings: Settings, store: JobStore) -> BackgroundScheduler:
    """Start the periodic sweeps other than sends: expired leases and retention."""
    scheduler = BackgroundScheduler(daemon=True)
    common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
    scheduler.add_job(
        store.expire_leases,
        "interval",
        seconds=max(5.0, settings.sweep_interval_s),
        args=[settings.job_max_attempts],
        id="leases",
        **common,
    )
    scheduler.add_job(
        lambda: retention_sweep(
            store, settings.spool_dir, settings.spool_retention_h * 3600, time.time()
        )
        + outbox_retention_sweep(
            store, settings.outbox_dir, settings.outbox_retention_h * 3600, time.time()
        )
        + heartbeat_retention_sweep(store, settings.heartbeat_retention_h * 3600),
        "interval",
        seconds=300,
        id="retention",
        next_run_time=datetime.now(UTC),  # at start too: a node back after a long stop
        **common,
    )
    scheduler.start()
    return scheduler

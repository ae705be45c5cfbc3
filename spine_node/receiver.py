"""The DICOM receiver: C-ECHO and C-STORE SCP that acknowledges only what is durable.

The C-STORE handler keeps the dataset exactly as received (no decode, no re-encode): it is
streamed to a temporary file in ``spool/.incoming`` (chunked receive, see
:mod:`spine_node.transport`, so memory stays bounded whatever the object size); the handler
fsyncs that file, renames it atomically into the spool, fsyncs the directory and records the
instance (and its job, for a radiograph of the intended use) in one transaction. Only then does
it answer Success. Inference never runs here.

What gets a job is decided by SOP class and modality (:mod:`spine_node.sop_classes`): objects
that are not images (SR, presentation states, KOS, RT, documents, private classes) and images
outside the intended use are answered Success, recorded with their category and reason, and
get no job (out-of-scope images get one when ``report_out_of_scope`` is set, so that they get
a "not processed" report).

Negotiation (``docs/conformance.md``): for radiograph classes the node accepts, per
presentation context, the first transfer syntax of :func:`spine_node.codecs.image_transfer_syntaxes`
that the sender proposed (uncompressed, then lossless, then lossy; only syntaxes it can decode);
for other storage classes any syntax it can parse, in the same order. Storage classes the node
does not know (private, newer than pynetdicom's list) are accepted as storage when
``accept_unknown_sop_classes`` is on: an ``EVT_REQUESTED`` handler adds them to this
association's supported contexts and an ``EVT_SOP_COMMON`` handler maps them to the Storage
Service Class, which is what pynetdicom's process-wide ``UNRESTRICTED_STORAGE_SERVICE`` does,
but per association and with our transfer syntax preference (pynetdicom's unrestricted mode
takes the first proposed syntax, lossy or not, and would apply to every AE in the process).

When a destination asks for Storage Commitment, the receiver also accepts the Storage
Commitment Push Model in the SCU role (the peer proposes the SCP role) for the reports that
peers send on a new association; :func:`spine_node.commitment.handle_report` records them.

Refused associations (unknown calling or called AE, too many associations) and rejected
presentation contexts are logged with the peer address, both AE titles and the reason; every
object received is written to the audit trail (:mod:`spine_node.audit`).

The network guards (PDU length bound, socket timeouts, TLS handshake off the accept loop,
connection cap) live in :mod:`spine_node.transport`, the one module that touches pynetdicom
internals.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import SOPClassCommonExtendedNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from spine_node import codecs
from spine_node.audit import AuditLog, AuditRecord, Direction
from spine_node.commitment import STORAGE_COMMITMENT_PUSH_MODEL, ReportContext, handle_report
from spine_node.config import Settings
from spine_node.sop_classes import RADIOGRAPH_CLASSES, Category, classify, is_storage_like
from spine_node.spool import SpoolFull, fsync_dir, relative_name, target_path, write_durable
from spine_node.store import InstanceRecord, JobStore, resent_with_new_content
from spine_node.tls import client_ssl_context, server_ssl_context
from spine_node.transport import (
    INCOMING_DIR,
    GuardedAssociationServer,
    GuardedRequestHandler,
    SpoolTarget,
    check_pynetdicom,
    clear_incoming,
)

logger = logging.getLogger(__name__)

__all__ = [
    "STORAGE_SERVICE_CLASS",
    "NegotiationPolicy",
    "ReceiverContext",
    "adopt_file",
    "build_ae",
    "client_ssl_context",
    "handle_echo",
    "handle_store",
    "server_ssl_context",
    "start_receiver",
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
#: The Storage Service Class UID (PS3.4 B), used to route unknown storage classes.
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"

#: A-ASSOCIATE-RJ (result source, diagnostic) -> reason (PS3.8 9.3.4).
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "too many associations (local limit exceeded)",
}
#: Presentation context result -> reason (PS3.8 9.3.3.2).
_CONTEXT_REASONS = {
    1: "user rejection",
    2: "no reason",
    3: "abstract syntax (SOP class) not supported",
    4: "transfer syntaxes not supported (none the node can decode)",
}


@dataclass(frozen=True)
class ReceiverContext:
    """What the C-STORE handler needs, bound through ``evt_handlers``.

    Attributes
    ----------
    store : JobStore
    spool_dir : pathlib.Path
    min_free_bytes : int
        Free-space watermark of the spool.
    intended_modalities : tuple of str
        Modalities of the intended use (others are out of scope).
    report_out_of_scope : bool
        Queue out-of-scope images anyway, so that they get a "not processed" report.
    audit : AuditLog or None
        Where every received object is recorded.
    report_ignored : callable or None
        ``(study_instance_uid, stored file, reason)``, called for an object stored without
        a job: tells the RIS about a study the AI ignores (``ris.IgnoredStudyReporter``).
    """

    store: JobStore
    spool_dir: Path
    min_free_bytes: int
    intended_modalities: tuple[str, ...] = ("CR", "DX")
    report_out_of_scope: bool = False
    audit: AuditLog | None = None
    report_ignored: Callable[[str, Path, str], object] | None = None


def _peer(assoc: Any) -> tuple[str, str, str]:
    """(address:port, calling AE, called AE) of an association, for logs and audit."""
    requestor = assoc.requestor
    address = f"{requestor.address}:{requestor.port}"
    primitive = getattr(requestor, "primitive", None)
    calling = _text(getattr(primitive, "calling_ae_title", None) or requestor.ae_title)
    called = _text(getattr(primitive, "called_ae_title", None))
    return address, calling, called


def _audit(
    ctx: ReceiverContext,
    event: evt.Event,
    sop_class: str,
    sop_instance: str,
    study: str,
    outcome: str,
    detail: str,
) -> None:
    if ctx.audit is None:
        return
    address, calling, called = _peer(event.assoc)
    ctx.audit.append(
        AuditRecord(
            time=AuditRecord.now(),
            direction=Direction.RECEIVED,
            peer=address,
            calling_ae=calling,
            called_ae=called,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_instance_uid=study,
            outcome=outcome,
            detail=detail,
        )
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


# --------------------------------------------------------------------------------------------
# C-ECHO / C-STORE


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success."""
    return STATUS_SUCCESS


def adopt_file(root: Path, relative: str, source: Path, min_free_bytes: int = 0) -> Path:
    """Move a received file into ``root/relative`` atomically and durably.

    On the same filesystem the file is fsynced and renamed (no copy); otherwise it is copied
    in 1 MiB chunks to a temporary file next to the target, fsynced and renamed. In both cases
    the directory is fsynced, and no partial file is ever visible under the final name.

    Parameters
    ----------
    root : pathlib.Path
        The spool directory.
    relative : str
        Relative path from :func:`spine_node.spool.relative_name`.
    source : pathlib.Path
        The received file (it is gone from there afterwards when renamed).
    min_free_bytes : int
        Refuse (``SpoolFull``) when less than this would remain free.

    Returns
    -------
    pathlib.Path
        The final path.
    """
    target = target_path(root, relative)
    directory = target.parent
    size = source.stat().st_size
    same_fs = source.stat().st_dev == directory.stat().st_dev
    free = shutil.disk_usage(directory).free
    if min_free_bytes and free - (0 if same_fs else size) < min_free_bytes:
        raise SpoolFull(f"only {free} bytes free in {root}, watermark {min_free_bytes}")
    if same_fs:
        with open(source, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(source, 0o600)
        os.replace(source, target)
        fsync_dir(directory)
        return target
    return write_durable(root, relative, source)  # another filesystem: copy, fsync, rename


def _received(event: evt.Event) -> tuple[Path | None, bytes | None]:
    """The received dataset: a file (chunked receive) or bytes (in-memory receive)."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    if path is not None:
        return Path(path), None
    return None, event.encoded_dataset(include_meta=True)


@dataclass(frozen=True)
class _Stored:
    """What one C-STORE ended in (for the answer, the log and the audit trail)."""

    status: int
    outcome: str
    detail: str
    study_instance_uid: str = ""


def handle_store(event: evt.Event, ctx: ReceiverContext) -> int:
    """Store one instance durably, record it, then acknowledge it.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE request event.
    ctx : ReceiverContext
        Store, spool directory, free-space watermark, intended use, audit trail.

    Returns
    -------
    int
        DIMSE status: 0x0000, 0xA700, 0xA900 or 0xC210.
    """
    request = cast(C_STORE, event.request)
    cmd_class = _text(request.AffectedSOPClassUID)
    cmd_instance = _text(request.AffectedSOPInstanceUID)
    stored = _store(event, ctx, cmd_class, cmd_instance)
    _audit(
        ctx,
        event,
        cmd_class,
        cmd_instance,
        stored.study_instance_uid,
        stored.outcome,
        f"0x{stored.status:04X} {stored.detail}".strip(),
    )
    return stored.status


def _store(event: evt.Event, ctx: ReceiverContext, cmd_class: str, cmd_instance: str) -> _Stored:
    calling_ae = _text(event.assoc.requestor.ae_title)
    path, raw = None, None
    try:
        path, raw = _received(event)
        if path is not None and (not path.is_file() or path.stat().st_size == 0):
            # Out of resources: the dataset could not be written while it arrived
            logger.error("C-STORE from %s refused: the dataset could not be stored", calling_ae)
            return _Stored(STATUS_OUT_OF_RESOURCES, "refused", "dataset could not be stored")
        source: Any = path if path is not None else BytesIO(cast(bytes, raw))
        # Large values are not read: only the UIDs are needed here
        header = dcmread(source, stop_before_pixels=True, force=True, defer_size=1024)
        size = path.stat().st_size if path is not None else len(cast(bytes, raw))
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        # Cannot understand: the dataset does not parse
        logger.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, type(exc).__name__)
        return _Stored(STATUS_CANNOT_UNDERSTAND, "refused", "unreadable dataset")
    except Exception as exc:  # pydicom raises assorted errors on corrupt input
        logger.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, exc)
        return _Stored(STATUS_CANNOT_UNDERSTAND, "refused", "unreadable dataset")

    try:
        ds_class = _text(header.get("SOPClassUID"))
        ds_instance = _text(header.get("SOPInstanceUID"))
        study_uid = _text(header.get("StudyInstanceUID"))
        series_uid = _text(header.get("SeriesInstanceUID"))
        modality = _text(header.get("Modality"))
    except Exception as exc:
        # Cannot understand: the identifying attributes do not parse
        logger.warning("C-STORE from %s: unreadable UIDs (%s)", calling_ae, type(exc).__name__)
        return _Stored(STATUS_CANNOT_UNDERSTAND, "refused", "unreadable UIDs")
    if (ds_class and ds_class != cmd_class) or (ds_instance and ds_instance != cmd_instance):
        # Dataset does not match SOP class (or instance) of the command
        logger.warning("C-STORE from %s: dataset UIDs do not match the command", calling_ae)
        return _Stored(STATUS_DATASET_MISMATCH, "refused", "dataset UIDs do not match", study_uid)
    if not cmd_instance:
        return _Stored(STATUS_CANNOT_UNDERSTAND, "refused", "no SOP Instance UID")
    kind = classify(ds_class or cmd_class, modality, ctx.intended_modalities)

    # The file is made durable first and the database asked once afterwards (duplicates and
    # our own objects are rare; one transaction less per image on the hot path).
    try:
        relative = relative_name(cmd_instance)
        if path is not None:
            adopt_file(ctx.spool_dir, relative, path, ctx.min_free_bytes)
        else:
            write_durable(ctx.spool_dir, relative, cast(bytes, raw), ctx.min_free_bytes)
    except SpoolFull as exc:
        # Out of resources: disk below the free-space watermark; nothing was written
        logger.error("C-STORE from %s refused: %s", calling_ae, exc)
        return _Stored(STATUS_OUT_OF_RESOURCES, "refused", "spool full", study_uid)
    except OSError as exc:
        # Out of resources: the spool cannot be written; the partial file was removed
        logger.error("C-STORE from %s refused: spool write failed: %s", calling_ae, exc)
        return _Stored(STATUS_OUT_OF_RESOURCES, "refused", "spool write failed", study_uid)
    except Exception as exc:
        logger.error("C-STORE from %s refused: %s", calling_ae, exc)
        return _Stored(STATUS_OUT_OF_RESOURCES, "refused", "spool write failed", study_uid)

    queue_job = kind.category is Category.IMAGE or (
        kind.category is Category.OUT_OF_SCOPE and ctx.report_out_of_scope
    )
    record = InstanceRecord(
        sop_instance_uid=cmd_instance,
        sop_class_uid=cmd_class,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=_text(event.context.transfer_syntax),
        calling_ae=calling_ae[:16],
        spool_path=relative,
        size_bytes=size,
        category=kind.category.value,
        category_reason=kind.reason,
        queue_job=queue_job,
    )
    try:
        outcome, job_id = ctx.store.receive(record)
    except Exception as exc:
        # Out of resources: the queue could not be written; the sender must retry
        logger.error("C-STORE from %s refused: queue write failed: %s", calling_ae, exc)
        return _Stored(STATUS_OUT_OF_RESOURCES, "refused", "queue write failed", study_uid)
    # structured fields on every outcome line (UIDs hashed by the formatter unless log_phi)
    fields = {"study_instance_uid": study_uid, "sop_instance_uid": cmd_instance}
    if outcome == "new":
        logger.info(
            "job %s queued: stored file=%s bytes=%d from=%s%s",
            job_id,
            relative,
            size,
            calling_ae,
            "" if kind.reason is None else f" ({kind.category.label}: {kind.reason})",
            extra={**fields, "job_id": job_id},
        )
        return _Stored(STATUS_SUCCESS, "stored", f"queued as job {job_id}", study_uid)
    if outcome == "recorded":
        logger.info(
            "C-STORE from %s: stored, no job (%s: %s)", calling_ae, kind.category.label,
            kind.reason, extra=fields,
        )
        if ctx.report_ignored is not None:
            try:
                ctx.report_ignored(study_uid, ctx.spool_dir / relative,
                                   f"{kind.category.label}: {kind.reason}")
            except Exception as exc:  # the object is stored; the RIS message is best effort
                logger.warning("study ignored, but its HL7 message was not queued: %s", exc,
                               extra=fields)
        return _Stored(STATUS_SUCCESS, "stored", f"{kind.category.label}: {kind.reason}", study_uid)
    if outcome == "own":
        (ctx.spool_dir / relative).unlink(missing_ok=True)
        logger.info("C-STORE from %s: our own result object, accepted, not queued", calling_ae,
                    extra=fields)
        return _Stored(STATUS_SUCCESS, "own_object", "our own result object", study_uid)
    if outcome == "duplicate_removed":
        (ctx.spool_dir / relative).unlink(missing_ok=True)  # retention already removed it
    elif (again := resent_with_new_content(ctx.store, cmd_instance, ctx.spool_dir / relative)):
        logger.info("job %d queued again: instance re-sent by %s with different content", again,
                    calling_ae, extra={**fields, "job_id": again})
        return _Stored(STATUS_SUCCESS, "stored", f"different content: job {again} again", study_uid)
    logger.info("C-STORE from %s: instance already received, not queued again", calling_ae,
                extra=fields)
    return _Stored(STATUS_SUCCESS, "duplicate", "already received", study_uid)


def _ignored_reporter(settings: Settings, store: JobStore) -> Callable[[str, Path, str], object] | None:
    """The RIS "ignored" report when HL7 destinations are configured (imported only then)."""
    if not any(d.kind == "hl7" for d in settings.destinations):
        return None
    from spine_node.oru import hl7_headers
    from spine_node.ris import IgnoredStudyReporter

    return IgnoredStudyReporter(store, settings.outbox_dir, hl7_headers(settings.destinations)).report


# --------------------------------------------------------------------------------------------
# Negotiation and association events


@dataclass(frozen=True)
class NegotiationPolicy:
    """What the receiver accepts at association negotiation.

    Attributes
    ----------
    image_syntaxes : tuple of str
        Transfer syntaxes for radiograph classes, best first (decodable only).
    storage_syntaxes : tuple of str
        Transfer syntaxes for every other storage class, best first.
    accept_unknown : bool
        Accept storage classes the node does not know (private, newer than pynetdicom).
    """

    image_syntaxes: tuple[str, ...]
    storage_syntaxes: tuple[str, ...]
    accept_unknown: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> NegotiationPolicy:
        """The policy of a node: decoders of this process, ``accept_unknown_sop_classes``."""
        return cls(
            image_syntaxes=codecs.image_transfer_syntaxes(),
            storage_syntaxes=codecs.storage_transfer_syntaxes(),
            accept_unknown=settings.accept_unknown_sop_classes,
        )


def _proposed_unknown(assoc: Any, known: Collection[str]) -> list[str]:
    """Abstract syntaxes proposed by the peer that look like storage and are not supported."""
    primitive = assoc.requestor.primitive
    proposed = primitive.presentation_context_definition_list if primitive else []
    out: list[str] = []
    for cx in proposed:
        uid = _text(cx.abstract_syntax)
        if uid and uid not in known and uid not in out and is_storage_like(uid):
            out.append(uid)
    return out


def handle_requested(event: evt.Event, policy: NegotiationPolicy) -> None:
    """EVT_REQUESTED: support the unknown storage classes this peer proposes (if allowed)."""
    if not policy.accept_unknown:
        return
    acceptor = event.assoc.acceptor
    supported = list(acceptor.supported_contexts)
    known = {str(cx.abstract_syntax) for cx in supported}
    unknown = _proposed_unknown(event.assoc, known)
    for uid in unknown:
        context = PresentationContext()
        context.abstract_syntax = uid
        context.transfer_syntax = list(policy.storage_syntaxes)
        supported.append(context)
    if unknown:
        acceptor.supported_contexts = supported
        logger.info(
            "association from %s: accepting %d unknown storage SOP class(es) as storage: %s",
            _peer(event.assoc)[0],
            len(unknown),
            ", ".join(unknown),
        )


def handle_sop_common(event: evt.Event, policy: NegotiationPolicy) -> dict[str, Any]:
    """EVT_SOP_COMMON: route the unknown storage classes of this association to Storage.

    pynetdicom serves a DIMSE request with the service class of its SOP class, looked up
    first in the accepted SOP Class Common Extended Negotiation items; for the classes that
    :func:`handle_requested` added, this returns items naming the Storage Service Class.
    """
    if not policy.accept_unknown:
        return {}
    items: dict[str, Any] = {}
    standard = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    standard.update((str(Verification), STORAGE_COMMITMENT_PUSH_MODEL))
    for cx in event.assoc.acceptor.supported_contexts:
        uid = str(cx.abstract_syntax)
        if uid not in standard:
            item = SOPClassCommonExtendedNegotiation()
            item.sop_class_uid = uid
            item.service_class_uid = STORAGE_SERVICE_CLASS
            items[uid] = item
    return items


def handle_rejected(event: evt.Event) -> None:
    """EVT_REJECTED: log the refused association with peer, AE titles and reason."""
    address, calling, called = _peer(event.assoc)
    primitive = event.assoc.acceptor.primitive
    key = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
    reason = _REJECT_REASONS.get(cast(tuple[int, int], key), f"source/diagnostic {key}")
    logger.warning(
        "association refused: peer %s calling AE %r called AE %r, reason: %s",
        address,
        calling,
        called,
        reason,
    )


def handle_accepted(event: evt.Event) -> None:
    """EVT_ACCEPTED: log each rejected presentation context with its reason."""
    rejected = event.assoc.rejected_contexts
    if not rejected:
        return
    address, calling, called = _peer(event.assoc)
    for cx in rejected:
        logger.warning(
            "presentation context refused: peer %s calling AE %r called AE %r, "
            "SOP class %s, proposed %s, reason: %s",
            address,
            calling,
            called,
            cx.abstract_syntax,
            ", ".join(str(ts) for ts in cx.transfer_syntax),
            _CONTEXT_REASONS.get(int(cx.result or 0), f"result {cx.result}"),
        )


# --------------------------------------------------------------------------------------------
# Assembly


def build_ae(settings: Settings, policy: NegotiationPolicy | None = None) -> AE:
    """Create the receiving AE: every storage SOP class, transfer syntaxes by preference.

    Parameters
    ----------
    settings : Settings
    policy : NegotiationPolicy, optional
        Default :meth:`NegotiationPolicy.from_settings`.
    """
    policy = policy or NegotiationPolicy.from_settings(settings)
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_length
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.require_called_aet = settings.require_called_ae
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    for context in AllStoragePresentationContexts:
        uid = str(context.abstract_syntax)
        syntaxes = policy.image_syntaxes if uid in RADIOGRAPH_CLASSES else policy.storage_syntaxes
        ae.add_supported_context(uid, list(syntaxes))
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if settings.commitment_destinations:
        # the reports of Storage Commitment: the peer is the SCP, the node the SCU
        ae.add_supported_context(
            STORAGE_COMMITMENT_PUSH_MODEL,
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
            scu_role=False,
            scp_role=True,
        )
    return ae


def start_receiver(
    settings: Settings, store: JobStore, *, audit: AuditLog | None = None
) -> ThreadedAssociationServer:
    """Start the C-STORE SCP in the background and return its server (``.shutdown()`` stops it).

    Parameters
    ----------
    settings : Settings
        Node settings (AE title, port, limits, TLS, intended use).
    store : JobStore
        The queue.
    audit : AuditLog, optional
        The audit trail (default: ``settings.audit_path``).

    Raises
    ------
    spine_node.transport.IncompatiblePynetdicom
        When the installed pynetdicom is not the release the transport guard was written for.
    """
    check_pynetdicom()
    settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    incoming = settings.spool_dir / INCOMING_DIR
    incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
    removed = clear_incoming(incoming)
    if removed:
        logger.info("removed %d partially received datasets", removed)
    ctx = ReceiverContext(
        store,
        settings.spool_dir,
        settings.min_free_bytes,
        intended_modalities=settings.intended_modalities,
        report_out_of_scope=settings.report_out_of_scope,
        audit=audit or AuditLog(settings.audit_path),
        report_ignored=_ignored_reporter(settings, store),
    )
    policy = NegotiationPolicy.from_settings(settings)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_SOP_COMMON, handle_sop_common, [policy]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_ACCEPTED, handle_accepted),
    ]
    if settings.commitment_destinations:
        report_ctx = ReportContext(store, settings.commitment_destinations, ctx.audit)
        handlers.append((evt.EVT_N_EVENT_REPORT, handle_report, [report_ctx]))
        allowed = set(settings.allowed_calling_aes)
        for dest in settings.dicom_destinations:
            if dest.storage_commitment and allowed and dest.ae_title not in allowed:
                logger.warning(
                    "destination %s asks for Storage Commitment but its AE title %r is not in "
                    "allowed_calling_aes: its reports on a new association are refused unless "
                    "it calls with an allowed AE title",
                    dest.name,
                    dest.ae_title,
                )
    ae = build_ae(settings, policy)
    ssl_context = server_ssl_context(settings.tls) if settings.tls.enabled else None
    server = ae.make_server(
        (settings.bind_address, settings.port),
        ssl_context=ssl_context,
        evt_handlers=handlers,  # type: ignore[arg-type]
        server_class=GuardedAssociationServer,
        request_handler=GuardedRequestHandler,
        connection_limit=2 * settings.max_associations,
        spool=SpoolTarget(incoming, settings.min_free_bytes),
    )
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{settings.port}", daemon=True
    )
    thread.start()
    # AssociationServer.shutdown() removes itself from this list (as AE.start_server does)
    ae._servers.append(server)
    logger.info(
        "receiver listening on %s:%d as %s%s; image transfer syntaxes: %s",
        settings.bind_address,
        settings.port,
        settings.ae_title,
        " (TLS)" if ssl_context is not None else "",
        ", ".join(policy.image_syntaxes),
    )
    return server

"""The DICOM receiver: C-ECHO and C-STORE SCP that acknowledges only what is durable.

The C-STORE handler writes the dataset exactly as received (no decode, no re-encode) to the
spool, fsyncs it, renames it atomically, fsyncs the directory and commits the instance and its
job in one transaction. Only then does it answer Success. Inference never runs here.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from spine_node.config import Settings, TLSSettings
from spine_node.spool import SpoolFull, relative_name, write_durable
from spine_node.store import InstanceRecord, JobStore

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class ReceiverContext:
    """What the C-STORE handler needs, bound through ``evt_handlers``."""

    store: JobStore
    spool_dir: Path
    min_free_bytes: int


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success."""
    return STATUS_SUCCESS


def handle_store(event: evt.Event, ctx: ReceiverContext) -> int:
    """Store one instance durably, then acknowledge it.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE request event.
    ctx : ReceiverContext
        Store, spool directory and free-space watermark.

    Returns
    -------
    int
        DIMSE status: 0x0000, 0xA700, 0xA900 or 0xC210.
    """
    calling_ae = _text(event.assoc.requestor.ae_title)
    cmd_class = _text(event.request.AffectedSOPClassUID)
    cmd_instance = _text(event.request.AffectedSOPInstanceUID)
    try:
        raw = event.encoded_dataset(include_meta=True)
        header = dcmread(BytesIO(raw), stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        # Cannot understand: the dataset does not parse
        logger.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND
    except Exception as exc:  # pydicom raises assorted errors on corrupt input
        logger.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, exc)
        return STATUS_CANNOT_UNDERSTAND

    ds_class = _text(header.get("SOPClassUID"))
    ds_instance = _text(header.get("SOPInstanceUID"))
    if (ds_class and ds_class != cmd_class) or (ds_instance and ds_instance != cmd_instance):
        # Dataset does not match SOP class (or instance) of the command
        logger.warning("C-STORE from %s: dataset UIDs do not match the command", calling_ae)
        return STATUS_DATASET_MISMATCH
    if not cmd_instance:
        return STATUS_CANNOT_UNDERSTAND

    try:
        if ctx.store.is_own_object(cmd_instance):
            logger.info("C-STORE from %s: our own result object, accepted, not queued", calling_ae)
            return STATUS_SUCCESS
        if ctx.store.has_instance(cmd_instance):
            logger.info("C-STORE from %s: instance already received, not queued again", calling_ae)
            return STATUS_SUCCESS
        relative = relative_name(cmd_instance)
        write_durable(ctx.spool_dir, relative, raw, ctx.min_free_bytes)
    except SpoolFull as exc:
        # Out of resources: disk below the free-space watermark; nothing was written
        logger.error("C-STORE from %s refused: %s", calling_ae, exc)
        return STATUS_OUT_OF_RESOURCES
    except OSError as exc:
        # Out of resources: the spool cannot be written; the partial file was removed
        logger.error("C-STORE from %s refused: spool write failed: %s", calling_ae, exc)
        return STATUS_OUT_OF_RESOURCES
    except Exception as exc:
        logger.error("C-STORE from %s refused: %s", calling_ae, exc)
        return STATUS_OUT_OF_RESOURCES

    record = InstanceRecord(
        sop_instance_uid=cmd_instance,
        sop_class_uid=cmd_class,
        study_instance_uid=_text(header.get("StudyInstanceUID")),
        series_instance_uid=_text(header.get("SeriesInstanceUID")),
        transfer_syntax_uid=_text(event.context.transfer_syntax),
        calling_ae=calling_ae[:16],
        spool_path=relative,
        size_bytes=len(raw),
    )
    try:
        new = ctx.store.record_instance(record)
    except Exception as exc:
        # Out of resources: the queue could not be written; the sender must retry
        logger.error("C-STORE from %s refused: queue write failed: %s", calling_ae, exc)
        return STATUS_OUT_OF_RESOURCES
    logger.info(
        "stored instance file=%s bytes=%d from=%s new=%s", relative, len(raw), calling_ae, new
    )
    return STATUS_SUCCESS


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build the receiver's TLS context (TLS 1.2 or newer, BCP 195 ciphers).

    Raises
    ------
    ValueError
        When TLS is enabled without a certificate and key.
    """
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("tls.certificate and tls.private_key are required when tls is enabled")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM")
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build a destination's TLS context (verifies the server against ``ca_file``)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


def build_ae(settings: Settings) -> AE:
    """Create the receiving AE with every storage SOP class and transfer syntax."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_length
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.require_called_aet = settings.require_called_ae
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    return ae


def start_receiver(settings: Settings, store: JobStore) -> ThreadedAssociationServer:
    """Start the C-STORE SCP in the background and return its server (``.shutdown()`` stops it).

    Parameters
    ----------
    settings : Settings
        Node settings (AE title, port, limits, TLS).
    store : JobStore
        The queue.
    """
    settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ctx = ReceiverContext(store, settings.spool_dir, settings.min_free_bytes)
    handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [ctx])]
    ae = build_ae(settings)
    ssl_context = server_ssl_context(settings.tls) if settings.tls.enabled else None
    server = ae.start_server(
        (settings.bind_address, settings.port),
        block=False,
        evt_handlers=handlers,  # type: ignore[arg-type]
        ssl_context=ssl_context,
    )
    logger.info(
        "receiver listening on %s:%d as %s", settings.bind_address, settings.port, settings.ae_title
    )
    return server  # type: ignore[return-value]

"""The DICOM receiver: C-ECHO and C-STORE SCP that acknowledges only what is durable.

The C-STORE handler keeps the dataset exactly as received (no decode, no re-encode): pynetdicom
streams it to a temporary file in ``spool/.incoming`` (chunked receive, so memory stays bounded
whatever the object size); the handler fsyncs that file, renames it atomically into the spool,
fsyncs the directory and commits the instance and its job in one transaction. Only then does it
answer Success. Inference never runs here.

The network edge is guarded against hostile peers (see ``docs/security.md``):

* a PDU whose length field exceeds what we accept (our maximum PDU length for P-DATA-TF,
  :data:`MAX_ASSOCIATE_PDU_LENGTH` for A-ASSOCIATE, 4 bytes for the fixed-size PDUs) is refused
  from its 6-byte header, before anything is allocated: A-ABORT and close;
* every accepted socket has a timeout (``network_timeout_s``), so a peer that stalls in the
  middle of a PDU or a TLS handshake cannot pin a thread; the TLS handshake runs in the
  connection's own thread, never in the accept loop;
* connections beyond twice ``max_associations`` are closed at accept (the first
  ``max_associations`` are served, the next ones get a proper A-ASSOCIATE-RJ).

Process-wide pynetdicom settings (``pynetdicom._config`` is module state, not per AE) are set
once by :func:`configure_pynetdicom`, which :func:`start_receiver` calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pynetdicom
import pynetdicom.dimse_messages
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from spine_node.config import Settings
from spine_node.spool import SpoolFull, fsync_dir, relative_name, target_path, write_durable
from spine_node.store import InstanceRecord, JobStore
from spine_node.tls import client_ssl_context, server_ssl_context

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_ASSOCIATE_PDU_LENGTH",
    "BoundedDUL",
    "GuardedAssociationServer",
    "ReceiverContext",
    "build_ae",
    "client_ssl_context",
    "configure_pynetdicom",
    "handle_echo",
    "handle_store",
    "pdu_length_limit",
    "server_ssl_context",
    "start_receiver",
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Largest A-ASSOCIATE-RQ/AC PDU accepted. It arrives before any maximum length is negotiated;
#: 128 presentation contexts with 20 transfer syntaxes each stay well below 256 KiB.
MAX_ASSOCIATE_PDU_LENGTH = 256 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a fixed 4-byte variable field (PS3.8 9.3).
FIXED_PDU_LENGTH = 4
#: Name of the directory (inside the spool) where pynetdicom streams incoming datasets.
INCOMING_DIR = ".incoming"
#: How often (bytes received) a chunked receive re-checks the free-space watermark.
FREE_CHECK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReceiverContext:
    """What the C-STORE handler needs, bound through ``evt_handlers``."""

    store: JobStore
    spool_dir: Path
    min_free_bytes: int


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


# --------------------------------------------------------------------------------------------
# PDU length guard


def pdu_length_limit(pdu_type: int, max_pdu_length: int) -> int | None:
    """Return the largest PDU length field accepted for a PDU type (None: unknown type).

    Parameters
    ----------
    pdu_type : int
        First byte of the PDU header.
    max_pdu_length : int
        Our Maximum Length Received (the P-DATA-TF variable field limit, PS3.8 D.1);
        0 means unlimited in DICOM, which this node never offers.

    Returns
    -------
    int or None
        The limit in bytes, or None when ``pdu_type`` is not a DICOM PDU type.
    """
    if pdu_type in (0x01, 0x02):
        return MAX_ASSOCIATE_PDU_LENGTH
    if pdu_type == 0x04:
        return max_pdu_length if max_pdu_length > 0 else 2**32 - 1
    if pdu_type in (0x03, 0x05, 0x06, 0x07):
        return FIXED_PDU_LENGTH
    return None


class BoundedDUL(DULServiceProvider):
    """pynetdicom's DUL provider that refuses oversized PDUs from their header.

    pynetdicom 3.0 reads a PDU's 4-byte length and then receives that many bytes into one
    buffer, so a peer claiming 2 GiB makes the receiver buffer up to 2 GiB. This subclass
    re-implements ``_read_pdu_data`` (pynetdicom 3.0.4, same events and logging) with a check
    between the header and the body: an oversized PDU is answered as an invalid PDU (Evt19:
    A-ABORT to the peer, A-P-ABORT to the user) and the connection is then closed without
    reading the body. When its thread ends (every way an association ends), it removes a
    dataset file that was still arriving. Installed on each accepted association by :class:`GuardedRequestHandler`.
    """

    _refused: bool = False

    def _max_pdu_length(self) -> int:
        own = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
        return int(own.maximum_length or 0)

    def _read_pdu_data(self) -> None:
        sock = self.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return
        if self._refused:
            # After refusing a PDU, read nothing more from this peer: close (Evt17)
            sock.close()
            return
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            logger.info("connection closed or timed out before a PDU header: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        limit = pdu_length_limit(pdu_type, self._max_pdu_length())
        if limit is None:
            logger.warning("unknown PDU type 0x%02X from peer: aborting", pdu_type)
            self.event_queue.put("Evt19")
            return
        if pdu_length > limit:
            logger.warning(
                "PDU type 0x%02X claims %d bytes, more than the %d accepted: aborting",
                pdu_type,
                pdu_length,
                limit,
            )
            self._refused = True
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            logger.info("connection closed or timed out in the middle of a PDU: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            logger.info("PDU shorter than announced (%d of %d bytes)", len(body), pdu_length)
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception as exc:
            logger.warning("undecodable PDU type 0x%02X from peer: %s", pdu_type, exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def run(self) -> None:
        """Run the DUL thread as pynetdicom does; then discard a dataset left half received."""
        try:
            super().run()
        finally:
            _discard_partial(self.assoc)


def _discard_partial(assoc: Any) -> None:
    """Remove the temporary file of a C-STORE that was still arriving when the link ended."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    try:
        handle.close()
        os.unlink(handle.name)
        logger.info("discarded a partially received dataset")
    except OSError:
        pass


class GuardedRequestHandler(RequestHandler):
    """Per-connection handler: TLS handshake in this thread, then a :class:`BoundedDUL`."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        """Finish the TLS handshake (bounded by the socket timeout), then run the association."""
        try:
            sock = self.request
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    logger.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                    self.server.shutdown_request(sock)
                    return
            super().handle()
        finally:
            self.server.connection_done()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # Same object, same state (the DUL thread has not started): only _read_pdu_data and
        # run change (both looked up at call time; Thread.start calls self.run). The socket already queued Evt5 on this DUL's event queue.
        assoc.dul.__class__ = BoundedDUL
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with socket timeouts, deferred TLS and a connection cap.

    Parameters
    ----------
    *args, **kwargs
        As :class:`pynetdicom.transport.ThreadedAssociationServer`.
    connection_limit : int
        Connections (in TLS handshake or association) served at once; more are closed at
        accept. Keep it above ``ae.maximum_associations`` so that the associations just over
        the limit still get a proper A-ASSOCIATE-RJ (transient, local limit exceeded).
    """

    def __init__(self, *args: Any, connection_limit: int, **kwargs: Any) -> None:
        if not isinstance(connection_limit, int) or connection_limit < 1:
            raise ValueError(f"connection_limit must be a positive int, got {connection_limit!r}")
        self.connection_limit = connection_limit
        self._lock = threading.Lock()
        self._in_handler = 0
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; give it a timeout; wrap TLS without handshaking here."""
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse (close) the connection when the connection cap is reached."""
        with self._lock:
            busy = self._in_handler + len(self.active_associations)
            if busy >= self.connection_limit:
                logger.warning(
                    "connection from %s closed: %d connections open (limit %d)",
                    client_address[0],
                    busy,
                    self.connection_limit,
                )
                return False
            self._in_handler += 1
        return True

    def connection_done(self) -> None:
        """Called when a handler thread has handed its connection to an association."""
        with self._lock:
            self._in_handler = max(0, self._in_handler - 1)


# --------------------------------------------------------------------------------------------
# Chunked receive


#: Start asynchronous writeback of a received dataset every this many bytes.
WRITEBACK_BYTES = 2 * 1024 * 1024


def _libc_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()  # immutable handle, looked up once
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk, without waiting.

    Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op where it is unavailable. This
    gives no durability by itself: the handler still fsyncs before acknowledging.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class IncomingFile:
    """The file pynetdicom streams a C-STORE dataset into (chunked receive).

    pynetdicom writes each fragment as it arrives and would let a write error (disk full)
    escape from its network thread, which kills the association instead of answering. This
    file never raises: when it cannot be created (the name then does not exist), on a write
    error, or when free space would fall below the
    watermark (checked every :data:`FREE_CHECK_BYTES`), it truncates itself to zero bytes and
    ignores the rest of the dataset. The C-STORE handler then sees a missing or empty file,
    which no received dataset can be (the preamble alone is 128 bytes), and answers 0xA700.

    Parameters
    ----------
    directory : pathlib.Path
        Where the file is created (mode 0600).
    min_free_bytes : int
        Free-space watermark of the spool.
    **_ : Any
        ``NamedTemporaryFile`` arguments pynetdicom passes (``delete``, ``mode``), ignored.
    """

    def __init__(self, directory: Path, min_free_bytes: int = 0, **_: Any) -> None:
        self._min_free = min_free_bytes
        self._since_check = 0
        self._unflushed = 0
        self._flushed_to = 0
        self.failed = False
        self._fd: int | None = None
        try:
            try:
                self._fd, self.name = tempfile.mkstemp(dir=directory, prefix="rx-", suffix=".dcm")
            except FileNotFoundError:
                # The directory of a receiver that has since stopped (several in one process)
                self._fd, self.name = tempfile.mkstemp(prefix="rx-", suffix=".dcm")
        except OSError as exc:
            # A name that does not exist: the handler answers 0xA700 for it
            self.name = os.path.join(directory, f"rx-unwritable-{uuid.uuid4().hex}.dcm")
            self._fail(f"cannot create a file in {directory}: {exc.strerror or exc}")

    @property
    def file(self) -> IncomingFile:
        """pynetdicom calls ``.file.flush()``: this object (writes are unbuffered)."""
        return self

    def _fail(self, reason: str) -> None:
        self.failed = True
        logger.error("incoming dataset dropped: %s", reason)
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass

    def write(self, data: bytes) -> int:
        """Append ``data`` (all of it), or drop the dataset on a write error."""
        if self.failed or self._fd is None:
            return len(data)
        self._since_check += len(data)
        if self._min_free and self._since_check >= FREE_CHECK_BYTES:
            self._since_check = 0
            free = shutil.disk_usage(os.path.dirname(self.name)).free
            if free - FREE_CHECK_BYTES < self._min_free:
                self._fail(f"free space {free} below watermark {self._min_free}")
                return len(data)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self._fail(f"write failed: {exc.strerror or exc}")
            return len(data)
        self._unflushed += len(data)
        if self._unflushed >= WRITEBACK_BYTES:
            # start writing back what arrived so far while the rest is still on the wire, so
            # the fsync before the acknowledgement only waits for the tail
            start_writeback(self._fd, self._flushed_to, self._unflushed)
            self._flushed_to += self._unflushed
            self._unflushed = 0
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """Close the descriptor (the file stays until adopted or unlinked)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
    request = cast(C_STORE, event.request)
    cmd_class = _text(request.AffectedSOPClassUID)
    cmd_instance = _text(request.AffectedSOPInstanceUID)
    path, raw = None, None
    try:
        path, raw = _received(event)
        if path is not None and (not path.is_file() or path.stat().st_size == 0):
            # Out of resources: the dataset could not be written while it arrived
            logger.error("C-STORE from %s refused: the dataset could not be stored", calling_ae)
            return STATUS_OUT_OF_RESOURCES
        source: Any = path if path is not None else BytesIO(cast(bytes, raw))
        # Large values are not read: only the UIDs are needed here
        header = dcmread(source, stop_before_pixels=True, force=True, defer_size=1024)
        size = path.stat().st_size if path is not None else len(cast(bytes, raw))
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        # Cannot understand: the dataset does not parse
        logger.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND
    except Exception as exc:  # pydicom raises assorted errors on corrupt input
        logger.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, exc)
        return STATUS_CANNOT_UNDERSTAND

    try:
        ds_class = _text(header.get("SOPClassUID"))
        ds_instance = _text(header.get("SOPInstanceUID"))
        study_uid = _text(header.get("StudyInstanceUID"))
        series_uid = _text(header.get("SeriesInstanceUID"))
    except Exception as exc:
        # Cannot understand: the identifying attributes do not parse
        logger.warning("C-STORE from %s: unreadable UIDs (%s)", calling_ae, type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND
    if (ds_class and ds_class != cmd_class) or (ds_instance and ds_instance != cmd_instance):
        # Dataset does not match SOP class (or instance) of the command
        logger.warning("C-STORE from %s: dataset UIDs do not match the command", calling_ae)
        return STATUS_DATASET_MISMATCH
    if not cmd_instance:
        return STATUS_CANNOT_UNDERSTAND

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
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=_text(event.context.transfer_syntax),
        calling_ae=calling_ae[:16],
        spool_path=relative,
        size_bytes=size,
    )
    try:
        outcome, job_id = ctx.store.receive(record)
    except Exception as exc:
        # Out of resources: the queue could not be written; the sender must retry
        logger.error("C-STORE from %s refused: queue write failed: %s", calling_ae, exc)
        return STATUS_OUT_OF_RESOURCES
    if outcome == "new":
        logger.info(
            "job %s queued: stored file=%s bytes=%d from=%s", job_id, relative, size, calling_ae
        )
    elif outcome == "own":
        (ctx.spool_dir / relative).unlink(missing_ok=True)
        logger.info("C-STORE from %s: our own result object, accepted, not queued", calling_ae)
    else:
        if outcome == "duplicate_removed":
            (ctx.spool_dir / relative).unlink(missing_ok=True)  # retention already removed it
        logger.info("C-STORE from %s: instance already received, not queued again", calling_ae)
    return STATUS_SUCCESS


# --------------------------------------------------------------------------------------------
# Assembly


def configure_pynetdicom(incoming_dir: Path, min_free_bytes: int = 0) -> None:
    """Set pynetdicom's process-wide receive options (call once per process).

    ``pynetdicom._config`` is module state shared by every AE in the process, so this is the
    one place that changes it: C-STORE datasets are streamed to a file
    (``STORE_RECV_CHUNKED_DATASET``) and that file is created in ``incoming_dir`` (inside the
    spool, so adopting it is a rename on the same filesystem). pynetdicom has no setting for
    the file; its ``NamedTemporaryFile`` name in ``pynetdicom.dimse_messages`` is replaced by
    :class:`IncomingFile` (same call, same use: ``write``, ``file.flush``, ``name``,
    ``close``). When several receivers
    share a process (tests), the last call wins and :func:`adopt_file` copies across
    filesystems when it must.

    Parameters
    ----------
    incoming_dir : pathlib.Path
        Directory for partially received datasets (created 0700).
    min_free_bytes : int
        Free-space watermark enforced while a dataset streams in (see :class:`IncomingFile`).
    """
    incoming_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
    factory = functools.partial(IncomingFile, incoming_dir, min_free_bytes)
    if hasattr(pynetdicom.dimse_messages, "NamedTemporaryFile"):
        pynetdicom.dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]
    else:  # a pynetdicom that no longer imports it there: files go to the system temp dir
        logger.warning("cannot direct pynetdicom's temporary files to %s", incoming_dir)


def clear_incoming(incoming_dir: Path) -> int:
    """Delete datasets left half received by a crash; return how many were removed."""
    if not incoming_dir.is_dir():
        return 0
    count = 0
    for leftover in incoming_dir.iterdir():
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            count += 1
    return count


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
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
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
    incoming = settings.spool_dir / INCOMING_DIR
    removed = clear_incoming(incoming)
    if removed:
        logger.info("removed %d partially received datasets", removed)
    configure_pynetdicom(incoming, settings.min_free_bytes)
    ctx = ReceiverContext(store, settings.spool_dir, settings.min_free_bytes)
    handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [ctx])]
    ae = build_ae(settings)
    ssl_context = server_ssl_context(settings.tls) if settings.tls.enabled else None
    server = ae.make_server(
        (settings.bind_address, settings.port),
        ssl_context=ssl_context,
        evt_handlers=handlers,  # type: ignore[arg-type]
        server_class=GuardedAssociationServer,
        request_handler=GuardedRequestHandler,
        connection_limit=2 * settings.max_associations,
    )
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{settings.port}", daemon=True
    )
    thread.start()
    # AssociationServer.shutdown() removes itself from this list (as AE.start_server does)
    ae._servers.append(server)
    logger.info(
        "receiver listening on %s:%d as %s%s",
        settings.bind_address,
        settings.port,
        settings.ae_title,
        " (TLS)" if ssl_context is not None else "",
    )
    return server

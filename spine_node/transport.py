"""The node's DICOM transport: the only module that touches pynetdicom internals.

pynetdicom has no public settings for what this module does, so it changes the behaviour of
the node's own associations only, by swapping the class of two per-association objects
(the DUL provider and the DIMSE provider) when :class:`GuardedRequestHandler` creates an
association. Nothing here changes module state of pynetdicom: another AE in the same process
(a PACS stand-in in the demo or the tests) keeps pynetdicom's behaviour and never streams into
the node's spool.

* **PDU length bound** (:class:`BoundedDUL`): a PDU whose length field exceeds what we accept
  (our maximum PDU length for P-DATA-TF, :data:`MAX_ASSOCIATE_PDU_LENGTH` for A-ASSOCIATE,
  4 bytes for the fixed-size PDUs) is refused from its 6-byte header, before anything is
  allocated: A-ABORT and close.
* **Chunked receive to disk** (:class:`SpoolingDIMSE`): a C-STORE dataset is written, as it
  arrives, to an :class:`IncomingFile` in ``spool/.incoming`` (what pynetdicom does for every
  AE of the process when ``_config.STORE_RECV_CHUNKED_DATASET`` is set, here per
  association), so memory stays bounded whatever the object size; the C-STORE handler reads
  ``event.dataset_path`` as usual.
* **Socket timeouts, deferred TLS handshake, connection cap**
  (:class:`GuardedAssociationServer`).
* **No waiting on delayed acknowledgements** (:func:`low_latency_handlers`, for the node's
  outgoing associations): pynetdicom leaves Nagle's algorithm on, and a peer that writes one
  PDU in two pieces with Nagle on too (DCMTK's default: a DIMSE response as a 12-byte header
  and its body) holds the second piece until our side acknowledges the first, which Linux
  delays by 40 ms or more; each C-STORE then took 45-90 ms whatever its size. The handler
  sets ``TCP_NODELAY`` when the connection opens and makes the association read through an
  :class:`AcknowledgingSocket`, which acknowledges at once (``TCP_QUICKACK``) whenever a PDU
  has arrived only in part. (Setting ``TCP_QUICKACK`` after each PDU sent, as before, was not
  enough: Linux spends its quick acknowledgements on a large send, so the answer to a 5 MB
  object still waited 40 ms about one time in ten.)

The internals used were read in pynetdicom :data:`TESTED_PYNETDICOM` (``pyproject.toml`` pins
that minor release). :func:`check_pynetdicom` runs when the receiver starts and stops the node
with a clear message when the installed pynetdicom is another release or lacks one of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
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
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

logger = logging.getLogger(__name__)

__all__ = [
    "INCOMING_DIR",
    "MAX_ASSOCIATE_PDU_LENGTH",
    "TESTED_PYNETDICOM",
    "AcknowledgingSocket",
    "BoundedDUL",
    "GuardedAssociationServer",
    "GuardedRequestHandler",
    "IncomingFile",
    "IncompatiblePynetdicom",
    "SpoolTarget",
    "SpoolingDIMSE",
    "check_pynetdicom",
    "clear_incoming",
    "low_latency_handlers",
    "pdu_length_limit",
]

#: The pynetdicom minor release whose internals this module was written against.
TESTED_PYNETDICOM = "3.0"
#: Largest A-ASSOCIATE-RQ/AC PDU accepted. It arrives before any maximum length is negotiated;
#: 128 presentation contexts with 20 transfer syntaxes each stay well below 256 KiB.
MAX_ASSOCIATE_PDU_LENGTH = 256 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a fixed 4-byte variable field (PS3.8 9.3).
FIXED_PDU_LENGTH = 4
#: Name of the directory (inside the spool) where incoming datasets are streamed.
INCOMING_DIR = ".incoming"
#: How often (bytes received) a chunked receive re-checks the free-space watermark.
FREE_CHECK_BYTES = 4 * 1024 * 1024
#: DIMSE command field of a C-STORE request (PS3.7 E.1).
_C_STORE_RQ = 0x0001


class IncompatiblePynetdicom(RuntimeError):
    """The installed pynetdicom is not the release whose internals this module uses."""


def check_pynetdicom() -> None:
    """Stop the node when pynetdicom's internals used here are not as expected.

    Raises
    ------
    IncompatiblePynetdicom
        With a message naming the installed release and what differs.
    """
    version = str(getattr(pynetdicom, "__version__", "unknown"))
    problems = []
    if version.split(".")[:2] != TESTED_PYNETDICOM.split("."):
        problems.append(f"release {version} is not {TESTED_PYNETDICOM}.x")
    for owner, name in (
        (AssociationSocket, "recv"),
        (DULServiceProvider, "_read_pdu_data"),
        (DULServiceProvider, "_decode_pdu"),
        (DULServiceProvider, "run"),
        (DIMSEServiceProvider, "receive_primitive"),
        (DIMSEMessage, "decode_msg"),
        (RequestHandler, "_create_association"),
    ):
        if not callable(getattr(owner, name, None)):
            problems.append(f"{owner.__name__}.{name} is missing")
    try:
        decode_src = inspect.getsource(DIMSEMessage.decode_msg)
        receive_src = inspect.getsource(DIMSEServiceProvider.receive_primitive)
        read_src = inspect.getsource(DULServiceProvider._read_pdu_data)
    except (OSError, TypeError):
        decode_src = receive_src = read_src = ""
    if "self.socket.recv(" not in read_src:
        problems.append("DULServiceProvider._read_pdu_data no longer reads through its socket")
    if "self.data_set).write(" not in decode_src or "self._data_set_file.write(" not in decode_src:
        problems.append("DIMSEMessage.decode_msg no longer writes datasets as expected")
    if "self.message = DIMSEMessage()" not in receive_src:
        problems.append("DIMSEServiceProvider.receive_primitive no longer creates messages")
    if problems:
        raise IncompatiblePynetdicom(
            f"pynetdicom {version} is not supported by spine_node.transport "
            f"({'; '.join(problems)}); install pynetdicom {TESTED_PYNETDICOM}.x "
            "(see pyproject.toml)"
        )


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
    """Per-connection handler: TLS handshake in this thread, then an association with a
    :class:`BoundedDUL` and, when the server has a :class:`SpoolTarget`, a
    :class:`SpoolingDIMSE`."""

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
        # Same objects, same state (no thread has started): only _read_pdu_data and run of the
        # DUL and receive_primitive of the DIMSE provider change (looked up at call time;
        # Thread.start calls self.run). The socket already queued Evt5 on this DUL's queue.
        assoc.dul.__class__ = BoundedDUL
        if self.server.spool is not None:
            assoc.dimse.__class__ = SpoolingDIMSE
            cast(SpoolingDIMSE, assoc.dimse).spool = self.server.spool
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
    spool : SpoolTarget or None
        Where C-STORE datasets of this server's associations are streamed (None: in memory,
        as pynetdicom does by default).
    """

    def __init__(
        self,
        *args: Any,
        connection_limit: int,
        spool: SpoolTarget | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(connection_limit, int) or connection_limit < 1:
            raise ValueError(f"connection_limit must be a positive int, got {connection_limit!r}")
        if spool is not None and not isinstance(spool, SpoolTarget):
            raise TypeError(f"spool must be a SpoolTarget or None, got {type(spool).__name__}")
        self.connection_limit = connection_limit
        self.spool = spool
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
                    "association refused: peer %s (calling/called AE not yet known), reason: "
                    "%d connections open (limit %d); connection closed",
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
# Outgoing associations: acknowledge at once


#: Linux's TCP_QUICKACK (absent elsewhere: the handler then only sets TCP_NODELAY).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
#: Largest single ``socket.recv`` of :class:`AcknowledgingSocket` (pynetdicom reads 4096).
_RECV_CHUNK = 64 * 1024


def _raw_socket(event: Any) -> socket.socket | None:
    """The TCP socket of the event's association (None once it is closed)."""
    transport = getattr(getattr(event.assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


class AcknowledgingSocket(AssociationSocket):
    """pynetdicom's association socket that acknowledges a PDU's first piece at once.

    :meth:`recv` reads as pynetdicom 3.0's ``AssociationSocket.recv`` does (until ``nr_bytes``
    have come or the peer closed) and, each time only part of what is wanted has arrived,
    sets Linux's ``TCP_QUICKACK``: the acknowledgement Linux has scheduled for those bytes goes
    out now, not after its delayed-ACK timer (40 ms or more), so a peer holding the rest of the
    PDU under Nagle's algorithm sends it at once. Installed by :func:`low_latency_handlers` on
    the node's outgoing associations; elsewhere (no ``TCP_QUICKACK``) it only reads.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` from the socket (fewer only when the peer closed it).

        Parameters
        ----------
        nr_bytes : int
            Bytes to read.

        Returns
        -------
        bytearray
            What was read.
        """
        sock = cast(socket.socket, self.socket)
        data = bytearray()
        while len(data) < nr_bytes:
            chunk = sock.recv(min(_RECV_CHUNK, nr_bytes - len(data)))
            if not chunk:  # the connection was broken: what came so far
                return data
            data += chunk
            if len(data) < nr_bytes and _TCP_QUICKACK is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                except OSError as exc:  # closed under us: the next recv says so
                    logger.debug("TCP_QUICKACK not set: %s", exc)
        return data


def _on_connection_open(event: Any) -> None:
    """EVT_CONN_OPEN: send each PDU as soon as it is written (no Nagle) and read through an
    :class:`AcknowledgingSocket`."""
    transport = getattr(getattr(event.assoc, "dul", None), "socket", None)
    if type(transport) is AssociationSocket:
        transport.__class__ = AcknowledgingSocket
    sock = _raw_socket(event)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # a closed socket: nothing to tune
        logger.debug("TCP_NODELAY not set: %s", exc)


def low_latency_handlers() -> list[EventHandlerType]:
    """pynetdicom event handlers for an outgoing association: no Nagle, no delayed ACK.

    Pass them in ``evt_handlers`` of ``AE.associate``. Against a peer that writes a PDU in
    pieces with Nagle's algorithm on (DCMTK 3.6 by default), every DIMSE exchange otherwise
    waits for our delayed acknowledgement (40 ms or more on Linux); see the module docstring.

    Returns
    -------
    list of (pynetdicom.events.EventType, callable)
        ``EVT_CONN_OPEN``: ``TCP_NODELAY``, and the association reads through an
        :class:`AcknowledgingSocket` (``TCP_QUICKACK`` on a partly arrived PDU).
    """
    return [(evt.EVT_CONN_OPEN, _on_connection_open)]


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
    """The file a C-STORE dataset is streamed into (chunked receive, see :class:`DatasetSink`).

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
    """

    def __init__(self, directory: Path, min_free_bytes: int = 0) -> None:
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


@dataclass(frozen=True)
class SpoolTarget:
    """Where the node's associations stream C-STORE datasets.

    Attributes
    ----------
    directory : pathlib.Path
        The incoming directory (inside the spool, so adopting a file is a rename).
    min_free_bytes : int
        Free-space watermark enforced while a dataset streams in (see :class:`IncomingFile`).
    """

    directory: Path
    min_free_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.directory, Path):
            raise TypeError(f"directory must be a Path, got {type(self.directory).__name__}")
        if self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {self.min_free_bytes!r}")


class DatasetSink:
    """Takes the place of ``DIMSEMessage.data_set`` until the message's command is known.

    pynetdicom writes a message's dataset fragments to ``data_set`` (a ``BytesIO``) unless
    ``_data_set_file`` is set, which it checks for every fragment. At the first dataset
    fragment the command set is complete: for a C-STORE request this sink opens an
    :class:`IncomingFile`, writes the preamble and File Meta Information (as pynetdicom's
    chunked mode does) and the fragment, and sets ``_data_set_file`` / ``_data_set_path``, so
    pynetdicom writes every further fragment to the file itself. For any other message it puts
    a plain ``BytesIO`` back and steps aside.
    """

    def __init__(self, message: DIMSEMessage, assoc: Any, spool: SpoolTarget) -> None:
        self._message = message
        self._assoc = assoc
        self._spool = spool

    def getvalue(self) -> bytes:
        """No dataset bytes were written yet (pynetdicom's debug handlers ask)."""
        return b""

    def write(self, data: bytes) -> int:
        """Route the first dataset fragment (and so the rest) to its destination."""
        message = self._message
        command = message.command_set
        if int(getattr(command, "CommandField", 0) or 0) != _C_STORE_RQ:
            message.data_set = BytesIO()
            return message.data_set.write(data)
        context_id = message.context_id
        syntax = next(
            cx.transfer_syntax[0]
            for cx in self._assoc.accepted_contexts
            if cx.context_id == context_id
        )
        meta = DicomBytesIO()
        write_file_meta_info(
            meta,
            create_file_meta(
                sop_class_uid=command.AffectedSOPClassUID,
                sop_instance_uid=command.AffectedSOPInstanceUID,
                transfer_syntax=syntax,
            ),
        )
        incoming = IncomingFile(self._spool.directory, self._spool.min_free_bytes)
        incoming.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        incoming.write(data)
        message.data_set = BytesIO()
        message._data_set_file = incoming  # type: ignore[assignment]
        message._data_set_path = Path(incoming.name)
        return len(data)


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider that streams this association's C-STORE datasets to disk.

    Installed on each of the node's associations by :class:`GuardedRequestHandler` (with
    ``spool`` set); every new incoming message gets a :class:`DatasetSink` as its
    ``data_set``. Messages are otherwise decoded by pynetdicom unchanged.
    """

    spool: SpoolTarget

    def receive_primitive(self, primitive: Any) -> None:
        """Start each new message with a :class:`DatasetSink`, then decode as pynetdicom does."""
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = DatasetSink(  # type: ignore[assignment]
                self.message, self.assoc, self.spool
            )
        super().receive_primitive(primitive)


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

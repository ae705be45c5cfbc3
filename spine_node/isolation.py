"""Pixel decoding in a separate process, so a decoder that crashes or hangs cannot take the
worker (and its warm models) down with it.

:class:`IsolatedPreparer` keeps one child process (``spawn``: no inherited threads or CUDA
state) and sends it one dataset at a time. A child that dies or does not answer within the
timeout is killed and replaced, and the call raises :class:`DecoderCrash`; the worker counts it
as a failed attempt of that job only, so the job is retried a bounded number of times and then
reported "not processed".

Transport. Images are big (a 2500 x 2000 16-bit dataset is 10 MB; its
:class:`~spine_node.imaging.PreparedImage` 42 MB, two full-size float32 arrays) and pickling
them through a :func:`multiprocessing.Pipe` cost more than decoding them, so they travel
through a shared memory area instead and the pipe carries only small messages. The parent
writes the request's pickle into the area (the child unpickles it, copying, before it decodes);
the child pickles the result with protocol 5 and writes its array buffers (out of band) into
the area, and sends the small pickle and the buffers' places; the parent copies them out, so
the area is free for the next image. The area is an anonymous ``memfd``
(:func:`os.memfd_create`) created by the parent and handed to the child over the pipe's
socket (:func:`socket.send_fds`): it has no name in any file system, so nothing is left
behind whatever happens to either process (the kernel frees it when the last of them closes
it), and :mod:`multiprocessing.shared_memory` with its resource tracker (which on
Python < 3.13 also registers the segments a child attaches to) is not used. Its pages are
allocated as they are first written, so it holds the largest image seen so far, up to
``area_bytes``. A request or result larger than the area goes through the pipe whole, as does
everything where :func:`os.memfd_create` does not exist (not Linux).
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom import Dataset

from spine_node.imaging import ImageError, PreparedImage, PrepParams, prepare

log = logging.getLogger(__name__)

PrepareFn = Callable[[Dataset, PrepParams], PreparedImage]

#: Default size of the shared area: results up to this size skip the pipe (bytes; 256 MiB
#: holds a 32-megapixel image's two float32 arrays and its model inputs).
DEFAULT_AREA_BYTES = 256 * 1024 * 1024
#: Alignment of each buffer in the area (bytes; a cache line).
_ALIGN = 64


class DecoderCrash(RuntimeError):
    """The isolated decoder died or hung on one image.

    Parameters
    ----------
    message : str
        What happened (exit code or timeout).
    uid : str
        SOP Instance UID of the image, when known.
    """

    def __init__(self, message: str, uid: str = "") -> None:
        super().__init__(message)
        self.uid = uid


def _send_fd(conn: multiprocessing.connection.Connection, fd: int | None) -> None:
    """Send one byte, and ``fd`` when given, over the pipe's Unix socket."""
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        socket.send_fds(sock, [b"A" if fd is not None else b"N"], [] if fd is None else [fd])


def _recv_fd(conn: multiprocessing.connection.Connection) -> int | None:
    """Receive what :func:`_send_fd` sent: the descriptor, or None (no area).

    Raises
    ------
    EOFError
        The parent closed the pipe first.
    """
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    if not msg:
        raise EOFError("parent closed the pipe")
    return fds[0] if fds else None


def _put_result(result: object, area: mmap.mmap | None) -> tuple[Any, ...]:
    """The message that carries ``result``: its buffers in ``area`` when they fit.

    Returns ``("ok_area", pickle, spans)`` with ``spans`` the ``(offset, length)`` of each
    out-of-band buffer in the area, or ``("ok", result, needed_bytes)`` (in the pipe).
    """
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    spans: list[tuple[int, int]] = []
    end = 0
    for raw in raws:
        offset = -(-end // _ALIGN) * _ALIGN
        spans.append((offset, raw.nbytes))
        end = offset + raw.nbytes
    if area is None or end > len(area):
        return ("ok", result, end)
    with memoryview(area) as view:
        for raw, (offset, length) in zip(raws, spans, strict=True):
            view[offset : offset + length] = raw
    return ("ok_area", data, spans)


def _take_result(data: bytes, spans: list[tuple[int, int]], area: mmap.mmap) -> Any:
    """Unpickle a result whose buffers lie in ``area``, copying them out (writable arrays)."""
    with memoryview(area) as view:
        buffers = [np.frombuffer(view, np.uint8, length, offset).copy() for offset, length in spans]
    return pickle.loads(data, buffers=buffers)


def _put_request(request: object, area: mmap.mmap | None) -> tuple[Any, ...]:
    """The message that carries ``request``: its pickle in ``area`` when it fits.

    Returns ``("area", length)`` (the pickle is ``area[:length]``) or ``("pipe", request)``.
    """
    if area is None:
        return ("pipe", request)
    data = pickle.dumps(request, protocol=5)
    if len(data) > len(area):
        return ("pipe", request)
    area[: len(data)] = data
    return ("area", len(data))


def _take_request(message: tuple[Any, ...], area: mmap.mmap | None) -> Any:
    """The request :func:`_put_request` sent (unpickled before the area is written again)."""
    kind, value = message
    if kind == "pipe":
        return value
    if area is None:
        raise RuntimeError("request sent through a shared area this process does not have")
    with memoryview(area) as view:
        return pickle.loads(view[:value])


def _child(conn: multiprocessing.connection.Connection, fn: PrepareFn) -> None:
    try:
        fd = _recv_fd(conn)
    except (EOFError, OSError):
        return
    area = mmap.mmap(fd, 0) if fd is not None else None
    conn.send(("ready", None, None))  # imports done: from now on only decoding is timed
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        try:
            ds, params = _take_request(message, area)
            conn.send(_put_result(fn(ds, params), area))
        except ImageError as exc:
            conn.send(("image_error", exc.reason, None))
        except Exception as exc:  # any decoder error travels back as text
            conn.send(("error", f"{type(exc).__name__}: {exc}", None))


class IsolatedPreparer:
    """Callable ``(dataset, params) -> PreparedImage`` that decodes in a child process.

    Parameters
    ----------
    fn : callable
        The preparation function run in the child (module-level, picklable); default
        :func:`spine_node.imaging.prepare`.
    timeout_s : float
        How long one image may take before the child is killed (seconds; the child's
        start-up is not counted).
    start_timeout_s : float
        How long a new child may take to start (spawn and imports: slow on a busy host).
    area_bytes : int
        Size of the shared memory area that carries the dataset to the child and the
        prepared arrays back (bytes; 0: none, everything is pickled through the pipe). Memory
        is used only as far as the largest image reaches; a request or result larger than the
        area goes through the pipe.

    Raises
    ------
    TypeError
        For an ``area_bytes`` that is not an int.
    ValueError
        For a timeout <= 0 or a negative ``area_bytes``.
    """

    def __init__(
        self,
        fn: PrepareFn = prepare,
        timeout_s: float = 120.0,
        start_timeout_s: float = 300.0,
        area_bytes: int = DEFAULT_AREA_BYTES,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s!r}")
        if isinstance(area_bytes, bool) or not isinstance(area_bytes, int):
            raise TypeError(f"area_bytes must be an int, got {area_bytes!r}")
        if area_bytes < 0:
            raise ValueError(f"area_bytes must be >= 0, got {area_bytes!r}")
        self.fn = fn
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.area_bytes = area_bytes if hasattr(os, "memfd_create") else 0
        #: requests and results that did not fit the area and went through the pipe
        self.requests_in_pipe = 0
        self.results_in_pipe = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._area: mmap.mmap | None = None

    def _share_area(self, conn: multiprocessing.connection.Connection) -> None:
        """Create the shared area, map it here and send it to the child (or say there is none)."""
        if self.area_bytes == 0:
            _send_fd(conn, None)
            return
        fd = os.memfd_create("spine-node-decoder", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.area_bytes)  # sparse: pages come as they are written
            self._area = mmap.mmap(fd, self.area_bytes)  # the mapping holds its own descriptor
            _send_fd(conn, fd)  # the child gets its own too
        finally:
            os.close(fd)

    def _start(self) -> multiprocessing.connection.Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        self._kill()  # a dead child's pipe and area
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, self.fn), daemon=True,
                                       name="spine-node-decoder")
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            self._share_area(parent)
            ready = parent.poll(self.start_timeout_s) and parent.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = self._kill()
            raise DecoderCrash(
                f"decoder process did not start within {self.start_timeout_s:g} s "
                f"(exit code {code})"
            )
        return parent

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._area is not None:
            self._area.close()
            self._area = None
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
        return int(proc.exitcode) if proc.exitcode is not None else None

    def __call__(self, ds: Dataset, params: PrepParams) -> PreparedImage:
        """Prepare one image in the child.

        Raises
        ------
        ImageError
            The image cannot be prepared (a normal, reported outcome).
        DecoderCrash
            The child died or hung; it has been replaced.
        """
        conn = self._start()
        try:
            request = _put_request((ds, params), self._area)
            if request[0] == "pipe":
                self.requests_in_pipe += 1
            conn.send(request)
            if not conn.poll(self.timeout_s):
                self._kill()
                raise DecoderCrash(f"decoder did not finish within {self.timeout_s:g} s")
            status, value, extra = conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self._kill()
            raise DecoderCrash(f"decoder process crashed (exit code {code})") from None
        if status == "ok_area":
            if self._area is None:  # the child only writes into an area it was given
                raise RuntimeError("decoder answered through a shared area it does not have")
            return _take_result(value, extra, self._area)  # type: ignore[no-any-return]
        if status == "ok":
            self.results_in_pipe += 1
            log.info("decoder result of %d bytes came through the pipe (shared area: %d bytes)",
                     extra, self.area_bytes)
            return value  # type: ignore[no-any-return]
        if status == "image_error":
            raise ImageError(str(value))
        raise ImageError(f"decoder error: {value}")

    def close(self) -> None:
        """Stop the child process and free the shared area."""
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._kill()

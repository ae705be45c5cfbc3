"""Pixel decoding in a separate process, so a decoder that crashes or hangs cannot take the
worker (and its warm models) down with it.

:class:`IsolatedPreparer` keeps one child process (``spawn``: no inherited threads or CUDA
state) and sends it one dataset at a time. A child that dies or does not answer within the
timeout is killed and replaced, and the call raises :class:`DecoderCrash`; the worker counts it
as a failed attempt of that job only, so the job is retried a bounded number of times and then
reported "not processed".
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Callable
from typing import Any

from pydicom import Dataset

from spine_node.imaging import ImageError, PreparedImage, PrepParams, prepare

log = logging.getLogger(__name__)

PrepareFn = Callable[[Dataset, PrepParams], PreparedImage]


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


def _child(conn: multiprocessing.connection.Connection, fn: PrepareFn) -> None:
    conn.send(("ready", None))  # imports done: from now on only decoding is timed
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        ds, params = message
        try:
            conn.send(("ok", fn(ds, params)))
        except ImageError as exc:
            conn.send(("image_error", exc.reason))
        except Exception as exc:  # any decoder error travels back as text
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


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
    """

    def __init__(
        self, fn: PrepareFn = prepare, timeout_s: float = 120.0, start_timeout_s: float = 300.0
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s!r}")
        self.fn = fn
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None

    def _start(self) -> multiprocessing.connection.Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, self.fn), daemon=True,
                                       name="spine-node-decoder")
        self._proc.start()
        child.close()
        self._conn = parent
        try:
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
            conn.send((ds, params))
            if not conn.poll(self.timeout_s):
                self._kill()
                raise DecoderCrash(f"decoder did not finish within {self.timeout_s:g} s")
            status, value = conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self._kill()
            raise DecoderCrash(f"decoder process crashed (exit code {code})") from None
        if status == "ok":
            return value  # type: ignore[no-any-return]
        if status == "image_error":
            raise ImageError(str(value))
        raise ImageError(f"decoder error: {value}")

    def close(self) -> None:
        """Stop the child process."""
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._kill()

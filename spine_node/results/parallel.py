"""Build an image's result objects in two processes at once: the SR in a helper process, the
images (overlay, heatmap, GSPS) in the worker.

Building and encoding the SR (TID 1500, highdicom) is pure Python: 36-70 ms per positive
image on this project's reference CPU, most of the time the node spends outside the models
after the detector (``benchmarks/latency.py``). The overlay needs the decoded image, which is
in the worker; the SR needs only the header and the findings. So :class:`ParallelBuilder`
sends the header (no pixel data) and the result (no display image, no heatmap) to one helper
process (:class:`concurrent.futures.ProcessPoolExecutor`, ``spawn``), which builds and encodes
the SR, while the worker builds the other objects; the worker then reads the SR's bytes back
(raw elements: 0.4 ms) and goes on as with :func:`~spine_node.results.builder.build_results`,
whose objects, order and content it returns.

The helper is a convenience, never a point of failure: when it has died, hangs past
``timeout_s`` or fails for any reason, the SR is built in the worker as before (a warning
says why); a helper that died or hangs is replaced by a new one (a hung one is left to end
on its own: the standard library's pool cannot kill it); an error the SR's build raises in
the worker too propagates as from ``build_results``. The helper is started and warmed
(imports, highdicom's tables of the standard) when the builder is made; until it is ready,
SRs are built in the worker, so no image waits for it. It ends by itself when the process
that made it is gone (a node killed with SIGKILL leaves no helper behind).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from spine_node.imaging import without_pixels
from spine_node.results.builder import (
    ResultOptions,
    build_sr_object,
    check_inputs,
    frame_number,
    image_objects,
)
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status

logger = logging.getLogger(__name__)

__all__ = ["ParallelBuilder", "encoded_sr", "helper_wanted"]

#: Niceness added to the helper: a node starting (or restarted) is not slowed by its warm-up.
HELPER_NICENESS = 5
#: How often the helper checks that the process that started it is still there (seconds).
PARENT_CHECK_S = 1.0
#: DX Image Storage - For Presentation: the warm-up source's SOP class.
_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def helper_wanted() -> bool:
    """True when this process may use more than one CPU (a helper then runs beside it)."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) > 1


def encoded_sr(
    source: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions,
    frame: int | None,
) -> bytes:
    """Build the image's SR (:func:`~spine_node.results.builder.build_sr_object`) and encode it
    as a DICOM Part 10 file (explicit VR little endian): what the helper process runs."""
    sr = build_sr_object(source, result, model, options, frame)
    buffer = DicomBytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _helper_start(parent_pid: int) -> None:
    """Helper process start: end it when the worker's process is gone.

    A node killed outright (SIGKILL, or OOM) cannot stop its helper, which would wait on its
    task queue for ever (it holds that pipe's both ends); a daemon thread watches the parent's
    pid instead and ends the helper within :data:`PARENT_CHECK_S`.
    """
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True
    ).start()
    try:
        os.nice(HELPER_NICENESS)  # its start-up yields to the node's own (receiver, models)
    except OSError:
        pass


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _warm_up() -> None:
    """Helper start: build one positive SR of a made-up source, so the first image's SR does
    not pay for the imports and highdicom's first reading of its standard tables."""
    try:
        source = Dataset()
        source.file_meta = FileMetaDataset()
        source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        source.SOPClassUID = _DX_FOR_PRESENTATION
        source.SOPInstanceUID = generate_uid()
        source.StudyInstanceUID = generate_uid()
        source.SeriesInstanceUID = generate_uid()
        source.PatientID = "WARMUP"
        source.Modality = "DX"
        source.Rows, source.Columns = 64, 64
        result = CascadeResult(
            sop_instance_uid=str(source.SOPInstanceUID),
            status=Status.POSITIVE,
            score=0.9,
            threshold=0.5,
            findings=(Finding("Osteophytes", 0.9, (8.0, 8.0, 32.0, 32.0)),),
        )
        encoded_sr(source, result, ModelInfo(name="warm-up", version="0"), ResultOptions(), None)
    except Exception:  # a warm-up that fails only leaves the first SR slower
        logger.warning("SR helper warm-up failed", exc_info=True)


class ParallelBuilder:
    """``(source, result, model) -> [SR, SC?, heatmap SC?, GSPS?]`` with the SR built in a
    helper process while this one builds the rest (see the module docstring).

    Parameters
    ----------
    options : ResultOptions
        Series numbers, descriptions and switches, as for ``build_results``.
    timeout_s : float
        Longest wait for the helper's SR (seconds, > 0) before building it here.

    Attributes
    ----------
    helper_failures : int
        SRs the helper did not deliver (each logged).
    built_here : int
        SRs built in this process: while the helper was starting (a node's first images are
        never kept waiting for it) or after it failed.
    """

    def __init__(self, options: ResultOptions, timeout_s: float = 60.0) -> None:
        if not isinstance(options, ResultOptions):
            raise TypeError(f"options must be a ResultOptions, got {type(options).__name__}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise TypeError(f"timeout_s must be a number, got {timeout_s!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.options = options
        self.timeout_s = float(timeout_s)
        self.helper_failures = 0
        self.built_here = 0
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._warm: concurrent.futures.Future[None] | None = None
        self._start()

    def _start(self) -> None:
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_helper_start,
            initargs=(os.getpid(),),
        )
        self._warm = self._executor.submit(_warm_up)  # starts the helper now

    def ready(self) -> bool:
        """True once the helper has started and warmed up (until then SRs are built here)."""
        return self._warm is not None and self._warm.done()

    def _replace(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def __call__(self, source: Dataset, result: CascadeResult, model: ModelInfo) -> list[Dataset]:
        """Build the image's result objects (as ``build_results(source, result, model, options)``).

        Raises
        ------
        TypeError, ValueError
            As ``build_results``, for bad arguments or a result object that cannot be built.
        """
        options = check_inputs(source, result, model, self.options)
        frame = frame_number(source, result.display)
        if self._executor is None:
            raise RuntimeError("the result builder is closed")
        light = dataclasses.replace(result, display=None, heatmap=None)
        pending: concurrent.futures.Future[bytes] | None = None
        if self.ready():  # a helper still starting would make this image wait for it
            try:
                pending = self._executor.submit(
                    encoded_sr, without_pixels(source), light, model, options, frame
                )
            except BrokenProcessPool as exc:
                self._helper_failed(result.sop_instance_uid, exc, restart=True)
        images = image_objects(source, result, model, options)
        sr: Dataset | None = None
        if pending is not None:
            try:
                sr = dcmread(DicomBytesIO(pending.result(timeout=self.timeout_s)))
            except (BrokenProcessPool, TimeoutError) as exc:  # the helper died or hangs
                self._helper_failed(result.sop_instance_uid, exc, restart=True)
            except Exception as exc:  # the build failed there: here it fails too, or works
                self._helper_failed(result.sop_instance_uid, exc, restart=False)
        if sr is None:
            self.built_here += 1
            sr = build_sr_object(source, result, model, options, frame)
        return [sr, *images]

    def _helper_failed(self, uid: str, exc: BaseException, *, restart: bool) -> None:
        self.helper_failures += 1
        logger.warning(
            "image %s: the SR helper process failed (%s: %s); the SR is built in the worker%s",
            uid,
            type(exc).__name__,
            exc,
            "; a new helper is started" if restart else "",
        )
        if restart:
            self._replace()

    def close(self) -> None:
        """Stop the helper process (waits for an SR it is building)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

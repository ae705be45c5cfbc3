"""Decoding in a child process: a crashing or hanging decoder fails one job, not the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

from spine_node.imaging import ImageError, PreparedImage, PrepParams, prepare
from spine_node.isolation import DecoderCrash, IsolatedPreparer
from spine_node.node import open_store, prepare_data_dir
from spine_node.pipeline import Cascade
from spine_node.results.builder import ResultOptions, build_results
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, DestinationRef, InstanceRecord
from spine_node.worker import Worker, WorkerSettings
from tests.nodekit import make_image, node_settings

pytest_plugins = ("tests.fixtures_models",)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = PrepParams(triage_size=64, detect_size=64)


def hostile_prepare(ds: Dataset, params: PrepParams):  # type: ignore[no-untyped-def]
    """A decoder that segfaults or hangs on marked images (runs in the child)."""
    marker = str(ds.get("PatientID", ""))
    if marker == "CRASH":
        os.kill(os.getpid(), signal.SIGSEGV)
    if marker == "HANG":
        time.sleep(3600)
    return prepare(ds, params)


def _ds(tmp_path: Path, marker: str, seed: int = 0) -> Dataset:
    ds = make_image(tmp_path / f"{marker}{seed}.dcm", rows=320, cols=256, seed=seed)
    ds.PatientID = marker
    return ds


def _areas() -> tuple[int, int]:
    """Shared decoder areas this process holds: (open descriptors, mappings)."""
    fds = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:spine-node-decoder")
        except OSError:  # the descriptor listdir itself used
            pass
    maps = Path("/proc/self/maps").read_text().count("/memfd:spine-node-decoder")
    return fds, maps


def _assert_same(got: PreparedImage, want: PreparedImage) -> None:
    for name in ("rows", "columns", "photometric", "frame", "notes"):
        assert getattr(got.source, name) == getattr(want.source, name), name
    assert got.letterbox == want.letterbox
    for g, w in ((got.source.pixels, want.source.pixels), (got.enhanced, want.enhanced),
                 (got.triage, want.triage), (got.detect, want.detect)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
        assert g.flags.writeable  # as prepare's own arrays: callers may draw on them


def test_big_image_travels_through_the_shared_area(tmp_path: Path) -> None:
    ds = make_image(tmp_path / "big.dcm", rows=1500, cols=1200, seed=3)
    params = PrepParams(triage_size=128, detect_size=256)
    before = _areas()
    iso = IsolatedPreparer(timeout_s=60)
    try:
        for _ in range(2):  # the area is reused for the next image
            _assert_same(iso(ds, params), prepare(ds, params))
        assert (iso.requests_in_pipe, iso.results_in_pipe) == (0, 0)
        assert _areas() == (before[0] + 1, before[1] + 1)
    finally:
        iso.close()
    assert _areas() == before


@pytest.mark.parametrize(
    ("area_bytes", "requests_in_pipe"),
    [(300_000, 0), (0, 2)],  # the request fits, the result does not; no area at all
)
def test_what_does_not_fit_the_area_goes_through_the_pipe(
    tmp_path: Path, area_bytes: int, requests_in_pipe: int
) -> None:
    ds = _ds(tmp_path, "OK")  # 320 x 256: request ~170 kB, result ~700 kB
    iso = IsolatedPreparer(hostile_prepare, timeout_s=60, area_bytes=area_bytes)
    try:
        for _ in range(2):
            _assert_same(iso(ds, PARAMS), prepare(ds, PARAMS))
        assert (iso.requests_in_pipe, iso.results_in_pipe) == (requests_in_pipe, 2)
    finally:
        iso.close()


def test_area_size_is_checked() -> None:
    with pytest.raises(ValueError, match="area_bytes must be >= 0, got -1"):
        IsolatedPreparer(area_bytes=-1)
    with pytest.raises(TypeError, match="area_bytes must be an int"):
        IsolatedPreparer(area_bytes=1.5)  # type: ignore[arg-type]


def test_isolated_result_equals_in_process(tmp_path: Path) -> None:
    ds = _ds(tmp_path, "OK")
    iso = IsolatedPreparer(hostile_prepare, timeout_s=60)
    try:
        got = iso(ds, PARAMS)
        want = prepare(ds, PARAMS)
        np.testing.assert_array_equal(got.triage, want.triage)
        np.testing.assert_array_equal(got.detect, want.detect)
    finally:
        iso.close()


def test_crash_and_hang_raise_and_the_child_is_replaced(tmp_path: Path) -> None:
    before = _areas()
    iso = IsolatedPreparer(hostile_prepare, timeout_s=5)
    try:
        with pytest.raises(DecoderCrash, match="crashed"):
            iso(_ds(tmp_path, "CRASH"), PARAMS)
        assert _areas() == before  # the dead child's area is gone with it
        t0 = time.monotonic()
        with pytest.raises(DecoderCrash, match="did not finish within 5 s"):
            iso(_ds(tmp_path, "HANG"), PARAMS)
        assert time.monotonic() - t0 < 30
        assert _areas() == before
        assert iso(_ds(tmp_path, "OK"), PARAMS).triage.shape == (64, 64)
        assert _areas() == (before[0] + 1, before[1] + 1)  # one area, the new child's
        bad = _ds(tmp_path, "OK", 1)
        del bad.PixelData
        with pytest.raises(ImageError, match="no pixel data"):
            iso(bad, PARAMS)
    finally:
        iso.close()
    assert _areas() == before


def test_worker_fails_only_the_crashing_job_then_reports_not_processed(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    settings = node_settings(tmp_path)
    prepare_data_dir(settings)
    store = open_store(settings)
    iso = IsolatedPreparer(hostile_prepare, timeout_s=30)
    cascade = Cascade.load(tiny_bundle, device="cpu", preparer=iso)
    for i, marker in enumerate(("CRASH", "OK", "OK")):
        path = tmp_path / f"src{i}.dcm"
        ds = make_image(path, rows=320, cols=256, seed=i)
        ds.PatientID = marker
        ds.save_as(path, enforce_file_format=True)
        rel = relative_name(str(ds.SOPInstanceUID))
        write_durable(settings.spool_dir, rel, path.read_bytes())
        store.record_instance(InstanceRecord(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                             str(ds.StudyInstanceUID), "1.2", "1.2.840.10008.1.2.1",
                                             "M", rel, 1))
    worker = Worker(
        store, cascade,
        lambda s, r, m: build_results(s, r, m, ResultOptions()),
        None, settings.spool_dir, settings.outbox_dir,
        WorkerSettings(owner="w", batch_size=3, lease_s=60, poll_s=0.1, max_attempts=2,
                       retry_delay_s=0.0,
                       destinations=(DestinationRef("pacs", DestinationKind.DICOM),)),
    )
    try:
        for _ in range(4):
            worker.run_once()
        status = store.status()
        assert status["jobs"]["done"] + status["jobs"]["not_processed"] == 3
        assert status["jobs"]["dead"] == 0
        assert store.dead_letters()["jobs"] == []
        rows = store.studies()
        payloads = [p for s in rows for _, p in s["results"]]
        failed = [p for p in payloads if "processing failed after 2 attempts" in (p["reason"] or "")]
        assert len(failed) == 1 and "decoder process crashed" in failed[0]["reason"]
        assert len(failed[0]["objects"]) == 1  # the SR only: pixels are never decoded again
    finally:
        iso.close()
        store.close()


def test_start_up_is_timed_apart_from_decoding(tmp_path: Path) -> None:
    # a child that cannot even start in time is reported as such, and the next call starts
    # a fresh one; the per-image timeout never includes the child's start-up
    iso = IsolatedPreparer(hostile_prepare, timeout_s=5, start_timeout_s=0.001)
    try:
        with pytest.raises(DecoderCrash, match="did not start within"):
            iso(_ds(tmp_path, "OK"), PARAMS)
        iso.start_timeout_s = 300
        assert iso(_ds(tmp_path, "OK"), PARAMS).triage.shape == (64, 64)
    finally:
        iso.close()


_SCRIPT = """
import sys, time, multiprocessing
from pydicom import dcmread
from spine_node.imaging import PrepParams
from spine_node.isolation import IsolatedPreparer

if __name__ == "__main__":
    ds, params = dcmread(sys.argv[1]), PrepParams(triage_size=64, detect_size=64)
    iso = IsolatedPreparer()
    iso(ds, params)
    iso.close()
    iso = IsolatedPreparer()
    iso(ds, params)
    print(*(p.pid for p in multiprocessing.active_children()), flush=True)
    if sys.argv[2] == "wait":
        time.sleep(3600)
"""


def test_no_resource_warnings_and_a_killed_parent_leaves_nothing(tmp_path: Path) -> None:
    image = tmp_path / "img.dcm"
    make_image(image, rows=320, cols=256).save_as(image, enforce_file_format=True)
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a normal exit (one preparer closed, one left to the interpreter's exit): nothing on stderr
    done = subprocess.run([sys.executable, "-X", "dev", str(script), str(image), "exit"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # in dev mode (warnings shown): no resource tracker "leaked shared_memory" warning, no
    # ResourceWarning for an unclosed descriptor or mapping, from the parent or its children
    for word in ("resource_tracker", "leaked", "ResourceWarning", "Traceback"):
        assert word not in done.stderr, done.stderr
    # a parent killed hard: its decoder child sees the pipe close and exits (the area, which
    # has no name anywhere, goes with the last process that held it)
    proc = subprocess.Popen([sys.executable, str(script), str(image), "wait"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        (child,) = (int(pid) for pid in proc.stdout.readline().split())
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child)
    finally:
        proc.kill()
        proc.wait(timeout=60)


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status

"""Decoding in a child process: a crashing or hanging decoder fails one job, not the worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

from spine_node.imaging import ImageError, PrepParams, prepare
from spine_node.isolation import DecoderCrash, IsolatedPreparer
from spine_node.node import open_store, prepare_data_dir
from spine_node.pipeline import Cascade
from spine_node.results.builder import ResultOptions, build_results
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, DestinationRef, InstanceRecord
from spine_node.worker import Worker, WorkerSettings
from tests.nodekit import make_image, node_settings

pytest_plugins = ("tests.fixtures_models",)

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
    iso = IsolatedPreparer(hostile_prepare, timeout_s=5)
    try:
        with pytest.raises(DecoderCrash, match="crashed"):
            iso(_ds(tmp_path, "CRASH"), PARAMS)
        t0 = time.monotonic()
        with pytest.raises(DecoderCrash, match="did not finish within 5 s"):
            iso(_ds(tmp_path, "HANG"), PARAMS)
        assert time.monotonic() - t0 < 30
        assert iso(_ds(tmp_path, "OK"), PARAMS).triage.shape == (64, 64)
        bad = _ds(tmp_path, "OK", 1)
        del bad.PixelData
        with pytest.raises(ImageError, match="no pixel data"):
            iso(bad, PARAMS)
    finally:
        iso.close()


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

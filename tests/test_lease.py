"""A slow batch keeps its leases: with a short lease, another worker never claims its jobs."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

from spine_node.lease import LeaseRenewer
from spine_node.node import build_worker, open_store, prepare_data_dir
from spine_node.results.types import CascadeResult, ResultRecord
from spine_node.spool import relative_name, write_durable
from spine_node.store import InstanceRecord, JobStore
from tests.nodekit import make_image, node_settings
from tests.orthanc_kit import POSITIVE, ScriptedCascade

LEASE_S = 2.0


class SlowCascade(ScriptedCascade):
    """A scripted cascade whose batch takes several lease lengths (a slow device)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__({}, default=POSITIVE)
        self.delay_s = delay_s
        self.started = threading.Event()  # the batch is claimed and in hand

    def analyze(self, datasets: Sequence[Dataset]) -> list[CascadeResult]:
        self.started.set()
        time.sleep(self.delay_s)
        return super().analyze(datasets)


def _receive(store: JobStore, spool: Path, source: Path) -> str:
    ds = dcmread(source)
    uid = str(ds.SOPInstanceUID)
    rel = relative_name(uid)
    write_durable(spool, rel, source.read_bytes())
    store.receive(InstanceRecord(uid, str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                                 str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1", "MODALITY1",
                                 rel, source.stat().st_size))
    return uid


def test_slow_batch_is_not_claimed_by_another_worker(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, device="cpu", lease_s=LEASE_S, worker_batch_size=2,
                             worker_poll_s=0.05)
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        uids = []
        for i in range(2):
            make_image(tmp_path / f"{i}.dcm", seed=i)
            uids.append(_receive(store, settings.spool_dir, tmp_path / f"{i}.dcm"))
        slow = SlowCascade(delay_s=3 * LEASE_S)  # the batch outlives its first lease 3 times
        other = ScriptedCascade({}, default=POSITIVE)
        first = build_worker(settings, store, slow)
        second = build_worker(settings, store, other)
        second.settings = dataclasses.replace(second.settings, owner="second-worker")

        first_done = threading.Event()
        claimed_by_second: list[int] = []

        def poll() -> None:  # the other worker keeps trying to claim while the batch runs
            slow.started.wait()
            while not first_done.is_set():
                claimed_by_second.append(second.run_once())
                first_done.wait(settings.worker_poll_s)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            assert first.run_once() == 2
        finally:
            first_done.set()
            slow.started.set()  # also when the batch failed before its analysis
            poller.join()

        assert len(claimed_by_second) > 1 and not any(claimed_by_second)  # polled, never claimed
        assert other.calls == [] and len(slow.calls) == 1
        for uid in uids:
            info = store.job_info(uid)
            assert info is not None and info[:2] == ("done", 1)  # one attempt
        records = [ResultRecord.from_json(p) for s in store.studies() for _, p in s["results"]]
        assert sorted(r.result.sop_instance_uid for r in records) == sorted(uids)  # one each
    finally:
        store.close()


def test_a_lost_lease_is_dropped_from_renewal(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, device="cpu")
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        make_image(tmp_path / "a.dcm", seed=1)
        _receive(store, settings.spool_dir, tmp_path / "a.dcm")
        (job,) = store.claim_jobs("first", -1.0, 1, 3)  # expired at once
        (again,) = store.claim_jobs("second", 60.0, 1, 3)  # taken over
        assert again.job_id == job.job_id
        renewer = LeaseRenewer(store, "first", [job.job_id], 60.0)
        assert renewer.held() == {job.job_id}
        renewer.renew_once()
        assert renewer.held() == frozenset()  # lost: no longer renewed
        store.renew_lease(job.job_id, "second", 60.0)  # the new owner's lease is untouched
    finally:
        store.close()

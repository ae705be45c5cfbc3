"""The dispatcher sweeps as soon as the worker commits sends (one process), never losing a wake."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.dispatcher import DispatchLoop
from spine_node.node import build_worker, open_store, prepare_data_dir, start_node
from spine_node.spool import relative_name, write_durable
from spine_node.store import InstanceRecord
from tests.nodekit import StoreSCP, make_image, node_settings, storescu, wait_for
from tests.orthanc_kit import POSITIVE, ScriptedCascade

pytest_plugins = ("tests.fixtures_models",)

#: So long that no sweep in these tests can come from the interval: only from wakes.
HOUR = 3600.0


class Sweeps:
    """A sweep that records each call and can be held inside a call until released."""

    def __init__(self, results: list[int] | None = None) -> None:
        self.calls = 0
        self.entered = threading.Semaphore(0)
        self.hold = threading.Event()
        self.hold.set()
        self.results = list(results or [])

    def __call__(self) -> int:
        self.calls += 1
        self.entered.release()
        self.hold.wait()
        return self.results.pop(0) if self.results else 0

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=30), "no sweep started"


def test_a_wake_during_a_sweep_makes_another_sweep_and_idle_wakes_sweep_at_once() -> None:
    sweeps = Sweeps()
    sweeps.hold.clear()  # the first sweep (at start) stays running
    loop = DispatchLoop(sweeps, HOUR, batch_size=50).start()
    try:
        sweeps.wait_entered()
        loop.wake()  # while that sweep runs: not lost
        sweeps.hold.set()
        sweeps.wait_entered()
        assert sweeps.calls == 2
        loop.wake()  # idle, an hour before the next interval: a sweep now
        sweeps.wait_entered()
        assert sweeps.calls == 3
        assert loop.is_alive()
    finally:
        loop.stop()
    assert not loop.is_alive()
    assert sweeps.calls == 3  # stopping ends the wait without another sweep


def test_a_full_sweep_is_followed_at_once_and_stop_lets_the_running_sweep_finish() -> None:
    sweeps = Sweeps(results=[10, 3])  # batch of 10: the first sweep was full
    loop = DispatchLoop(sweeps, HOUR, batch_size=10).start()
    sweeps.wait_entered()
    sweeps.wait_entered()  # no wake: the full batch alone starts the second sweep
    assert sweeps.calls == 2
    sweeps.hold.clear()
    loop.wake()
    sweeps.wait_entered()  # the third sweep is held running
    stopper = threading.Thread(target=loop.stop)
    stopper.start()
    stopper.join(timeout=0.5)
    assert stopper.is_alive()  # stop waits for the running sweep
    sweeps.hold.set()
    stopper.join(timeout=30)
    assert not stopper.is_alive() and not loop.is_alive()
    assert sweeps.calls == 3


def test_wait_idle_waits_for_the_woken_sweep_to_end() -> None:
    sweeps = Sweeps()
    loop = DispatchLoop(sweeps, HOUR, batch_size=50).start()
    try:
        sweeps.wait_entered()  # the sweep at start
        assert loop.wait_idle(30)
        sweeps.hold.clear()
        loop.wake()
        sweeps.wait_entered()
        assert not loop.wait_idle(0.2)  # the woken sweep is held running
        sweeps.hold.set()
        assert loop.wait_idle(30)
        assert sweeps.calls == 2
    finally:
        loop.stop()
    assert loop.wait_idle(0)  # a stopped loop is idle


class Notice:
    """What the worker tells the dispatcher, in order (``DispatchLoop``'s two methods)."""

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self.store = store
        self.events: list[tuple[str, int]] = []

    def _queued(self) -> int:
        return int(self.store.status()["outbound"].get("pacs", {}).get("pending", 0))

    def wake(self) -> None:
        self.events.append(("wake", self._queued()))

    def wait_idle(self, timeout_s: float) -> bool:
        self.events.append(("wait_idle", self._queued()))
        return True


def test_the_worker_wakes_per_result_and_lets_the_objects_leave_before_the_summary(
    tmp_path: Path,
) -> None:
    """A batch of two images that empties the queue: a wake after each image's result (its
    objects queued), then wait_idle, then the study summary and its wake."""
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        study = "1.2.826.0.1.3680043.8.498.78"
        for i in range(2):
            path = tmp_path / f"image{i}.dcm"
            ds = make_image(path, seed=i, study_uid=study)
            rel = relative_name(str(ds.SOPInstanceUID))
            write_durable(settings.spool_dir, rel, path.read_bytes())
            store.record_instance(InstanceRecord(
                str(ds.SOPInstanceUID), str(ds.SOPClassUID), study, str(ds.SeriesInstanceUID),
                "1.2.840.10008.1.2.1", "MODALITY1", rel, path.stat().st_size))
        notice = Notice(store)
        worker = build_worker(settings, store, ScriptedCascade({study: POSITIVE}), dispatch=notice)
        assert worker.run_once() == 2  # fewer than worker_batch_size (4): the queue is empty
        kinds = [kind for kind, _ in notice.events]
        assert kinds == ["wake", "wake", "wait_idle", "wake"]
        queued = [n for _, n in notice.events]
        assert 0 < queued[0] < queued[1] == queued[2] < queued[3]  # objects, then the summary
    finally:
        store.close()


def test_loop_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="sweep must be callable"):
        DispatchLoop(42, 1.0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval_s must be positive, got 0"):
        DispatchLoop(Sweeps(), 0, 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DispatchLoop(Sweeps(), 1.0, 0)


def test_in_one_process_results_reach_the_pacs_without_waiting_for_the_sweep_interval(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """With an hour between sweeps, every result object (the images' and the study summary's)
    still reaches DCMTK storescp: the worker woke the dispatcher after each commit."""
    pacs = StoreSCP(tmp_path / "pacs").start()
    settings = node_settings(
        tmp_path, bundle=str(tiny_bundle), device="cpu", decode_isolation=False,
        sweep_interval_s=HOUR, worker_poll_s=0.05,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    node = start_node(settings)
    try:
        study = "1.2.826.0.1.3680043.8.498.77"
        images = [tmp_path / f"image{i}.dcm" for i in range(2)]
        uids = [str(make_image(path, seed=i, study_uid=study).SOPInstanceUID)
                for i, path in enumerate(images)]
        assert storescu(settings.port, images).returncode == 0

        def delivered() -> dict[str, int] | None:
            status = node.store.status()
            jobs, sends = status["jobs"], status["outbound"].get("pacs", {})
            finished = jobs.get("done", 0) + jobs.get("not_processed", 0)
            if finished == len(uids) and sends.get("sent") and not (
                sends.get("pending") or sends.get("sending")
            ):
                return dict(sends)
            return None

        sends = wait_for(delivered, timeout=120)
        at_pacs = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in pacs.received()}
        assert len(at_pacs) == sends["sent"]
        image_objects = {o for uid in uids for o in node.store.result_objects(uid)}
        assert len(image_objects) >= len(uids) and image_objects <= at_pacs
        assert len(at_pacs - image_objects) >= 1  # the study summary SR went out too
    finally:
        node.stop()
        pacs.stop()

"""A job that kills its worker every time ends "not processed" after ``job_max_attempts``.

The worker role runs as its own process (``spine-node serve --role worker``). One image is a
poison job: its spooled file is a FIFO, so the worker that claims it blocks while reading it,
and the test SIGKILLs the worker each time it holds that job (deterministically, as an
out-of-memory kill or a crash inside a model library would), then starts a new worker. The
other images keep flowing; after the third death the job is reported "not processed" with the
reason, from its header alone (the file is readable by then: the report must still not run
the cascade), and its SR reaches the PACS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from spine_node.node import open_store, prepare_data_dir
from spine_node.spool import relative_name
from spine_node.store import InstanceRecord
from tests.nodekit import CR_IMAGE_STORAGE, CountingPACS, make_image, node_settings, write_config

pytest_plugins = ("tests.fixtures_models",)

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}


def _serve(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spine_node.cli", "serve", "--config", str(config), "--role", role],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),  # the child owns it
    )


def _record(uid: str, study: str, spool_path: str, sop_class: str = CR_IMAGE_STORAGE
            ) -> InstanceRecord:
    return InstanceRecord(uid, sop_class, study, uid + ".1", "1.2.840.10008.1.2.1",
                          "MODALITY1", spool_path, 1000)


@pytest.mark.slow
def test_worker_killed_by_one_job_three_times_reports_it_and_keeps_going(
    tmp_path: Path, tiny_bundle: Path, dx_dataset: Callable[..., Dataset]
) -> None:
    max_attempts = 3
    pacs = CountingPACS().start()
    settings = node_settings(
        tmp_path,
        bundle=str(tiny_bundle),
        device="cpu",
        decode_isolation=False,
        worker_batch_size=1,
        lease_s=2.0,
        job_max_attempts=max_attempts,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    config = write_config(tmp_path / "node.toml", settings)
    prepare_data_dir(settings)
    store = open_store(settings)
    # the poison job first (claimed first), then three ordinary images of another study
    poison = "1.2.826.0.1.3680043.10.1.1"
    others = [f"1.2.826.0.1.3680043.10.1.{i}" for i in (2, 3, 4)]
    poison_file = settings.spool_dir / relative_name(poison)
    poison_file.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(poison_file)  # reading it blocks: the worker holds the job until it is killed
    store.receive(_record(poison, "1.2.826.0.1.3680043.10.2.1", relative_name(poison)))
    for i, uid in enumerate(others):
        path = settings.spool_dir / relative_name(uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = dx_dataset(seed=i, SOPInstanceUID=uid, StudyInstanceUID="1.2.826.0.1.3680043.10.2.2")
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(path, enforce_file_format=True)  # spine-like: the cascade processes it
        store.receive(_record(uid, "1.2.826.0.1.3680043.10.2.2", relative_name(uid),
                              str(ds.SOPClassUID)))

    logs = tmp_path / "worker.log"
    dispatcher = _serve(config, "dispatcher", tmp_path / "dispatcher.log")
    worker = _serve(config, "worker", logs)
    kills = 0
    deadline = time.monotonic() + 240
    try:
        while True:
            assert time.monotonic() < deadline, (kills, store.job_info(poison), store.status())
            state, attempts, _ = store.job_info(poison)  # type: ignore[misc]
            if state == "running" and attempts == kills + 1 and attempts <= max_attempts:
                worker.kill()  # SIGKILL while it holds the poison job
                worker.wait()
                kills += 1
                if kills == max_attempts:
                    # the file is readable now; the job must end all the same, unprocessed
                    poison_file.unlink()
                    make_image(poison_file, sop_uid=poison,
                               study_uid="1.2.826.0.1.3680043.10.2.1", rows=96, cols=80)
                worker = _serve(config, "worker", logs)
            others_done = all(store.job_state(u) in ("done", "not_processed") for u in others)
            sends = store.status()["outbound"].get("pacs", {})
            if (state in ("not_processed", "dead") and others_done
                    and sends.get("pending", 1) == 0 and sends.get("sending", 1) == 0):
                break
            time.sleep(0.05)
        assert worker.poll() is None  # the restarted worker is still serving
        state, attempts, error = store.job_info(poison)  # type: ignore[misc]
        assert kills == max_attempts
        assert (state, attempts) == ("not_processed", max_attempts + 1)  # + the report claim
        assert error == f"worker died during processing {max_attempts} times"
        assert all(store.job_state(u) == "done" for u in others)
        status = store.status()
        assert status["results"].get("not_processed") == 1  # the others were processed
        assert sum(status["results"].values()) == 4
        ((_, payload),) = store.study_results("1.2.826.0.1.3680043.10.2.1")
    finally:
        for proc in (worker, dispatcher):
            proc.terminate()
            proc.wait(timeout=120)
        store.close()
        pacs.stop()
    assert payload["status"] == "not_processed"
    assert payload["reason"] == f"worker died during processing {max_attempts} times"
    sr_uid = payload["objects"][0]
    sr = dcmread(settings.outbox_dir / relative_name(sr_uid))
    assert sr.SOPClassUID in SR_CLASSES
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any(payload["reason"] in t for t in texts), texts  # the radiologist reads why
    assert sr_uid in pacs.received  # and it reached the PACS
    text = logs.read_text()
    assert "attempts spent, reporting not processed" in text
    assert "Traceback" not in text

"""``spine-node status`` and ``replay`` as an administrator's monitoring sees them: live workers
with their bundle, and documented non-zero exit codes when something needs attention."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spine_node.cli import STATUS_DEAD, STATUS_NO_WORKER, STATUS_OK, STATUS_STALE_QUEUE
from spine_node.node import open_store
from spine_node.results.types import Status
from spine_node.store import InstanceRecord, JobOutcome, JobStore, Monitor, WorkerIdentity
from tests.nodekit import node_settings, write_config

CLI = [sys.executable, "-m", "spine_node.cli"]
WORKER = WorkerIdentity("gpu-box:4242", "gpu-box", 4242, "spine-dernet", "2.1.0", "ab" * 32)


def _status(config: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    out = subprocess.run([*CLI, "status", "--config", str(config), "--json"],
                         capture_output=True, text=True, timeout=60, check=False)
    return out.returncode, json.loads(out.stdout)


def _table(config: Path) -> tuple[int, str]:
    out = subprocess.run([*CLI, "status", "--config", str(config)], capture_output=True,
                         text=True, timeout=60, check=False)
    return out.returncode, out.stdout


def _receive(store: JobStore, uid: str) -> int:
    kind, job_id = store.receive(InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.1", "1.2.3",
                                                "1.2.3.4", "1.2.840.10008.1.2.1", "MOD",
                                                f"x/{uid}.dcm", 10))
    assert kind == "new" and job_id is not None
    return job_id


def test_status_codes_follow_the_queue(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, status_max_queue_age_s=60.0, heartbeat_s=10.0)
    config = write_config(tmp_path / "node.toml", settings)
    code, report = _status(config)
    assert code == STATUS_OK and report["problems"] == [] and report["workers"] == []
    code, table = _table(config)
    assert code == STATUS_OK and table.rstrip().endswith("OK")

    # an image waits and no worker has ever beaten
    store = JobStore.open(settings.db_url)
    job_id = _receive(store, "1.2.9.1")
    code, report = _status(config)
    assert code == STATUS_NO_WORKER
    assert [p["code"] for p in report["problems"]] == [STATUS_NO_WORKER]

    # a live worker: its heartbeat, bundle and last job are shown
    monitor = Monitor(store)
    monitor.beat(WORKER, started_at=time.time())
    (claimed,) = store.claim_jobs(WORKER.owner, 60.0, 1, 3)  # the worker's one commit per job
    outcome = JobOutcome(Status.NEGATIVE, 0.1, None, {}, "2.1.0", "0f" * 32)
    store.complete_job(claimed.job_id, WORKER.owner, outcome, [])
    _receive(store, "1.2.9.4")  # and the next image waits for it
    code, report = _status(config)
    assert code == STATUS_OK, report["problems"]
    (worker,) = report["workers"]
    assert worker["live"] and worker["pid"] == 4242 and worker["last_job_id"] == job_id
    assert worker["bundle"] == {"name": "spine-dernet", "version": "2.1.0", "sha256": "ab" * 32}
    code, table = _table(config)
    assert code == STATUS_OK
    assert "gpu-box:4242" in table and "spine-dernet 2.1.0" in table and "live" in table
    assert f"last job {job_id}" in table
    store.close()

    # the worker's last beat is older than three heartbeats (30 s): not live any more
    store = JobStore.open(settings.db_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE worker_heartbeats SET last_seen_at = last_seen_at - 31")
    store.close()
    code, report = _status(config)
    assert code == STATUS_NO_WORKER and not report["workers"][0]["live"]
    assert "NOT SEEN" in _table(config)[1]

    # the same queue seen two minutes later: the oldest queued image is too old
    stale = JobStore.open(settings.db_url, clock=lambda: time.time() - 120.0)
    _receive(stale, "1.2.9.2")
    stale.close()
    store = JobStore.open(settings.db_url)
    Monitor(store).beat(WORKER, started_at=time.time())
    store.close()
    code, report = _status(config)
    assert code == STATUS_STALE_QUEUE
    assert [p["code"] for p in report["problems"]] == [STATUS_STALE_QUEUE]
    assert report["oldest_queued_age_s"] > 60.0


def test_dead_items_exit_non_zero_and_replay_checks_ids(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    config = write_config(tmp_path / "node.toml", settings)
    store = open_store(settings)
    job_id = _receive(store, "1.2.9.3")
    (claimed,) = store.claim_jobs("w", 60.0, 1, max_attempts=1)
    store.fail_job(claimed.job_id, "w", "decoder crashed", max_attempts=1, retry_delay_s=0)
    store.close()
    code, report = _status(config)
    assert code == STATUS_DEAD
    assert report["dead"]["jobs"][0]["job_id"] == job_id
    code, table = _table(config)
    assert code == STATUS_DEAD and f"dead job {job_id}: decoder crashed" in table

    for what in ("sends", "jobs"):
        out = subprocess.run([*CLI, "replay", what, "--id", "999", "--config", str(config)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 1
        assert f"no {what[:-1]} with id 999" in out.stderr and f"requeued 0 {what}" in out.stdout
    out = subprocess.run([*CLI, "replay", "jobs", "--id", str(job_id), "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "requeued 1 jobs" in out.stdout
    out = subprocess.run([*CLI, "replay", "jobs", "--id", str(job_id), "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and f"job {job_id} is queued" in out.stderr
    code, _report = _status(config)
    assert code == STATUS_NO_WORKER  # requeued, and nobody to process it


def test_workers_not_seen_for_the_retention_are_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The retention job (run at start, then every 5 minutes) forgets a worker not seen for
    ``heartbeat_retention_h``; one not seen for less stays listed as NOT SEEN."""
    from spine_node.dispatcher import start_scheduler
    from spine_node.node import prepare_data_dir
    from tests.nodekit import wait_for

    settings = node_settings(tmp_path, heartbeat_retention_h=1.0)
    config = write_config(tmp_path / "node.toml", settings)
    prepare_data_dir(settings)
    store = open_store(settings)
    monitor = Monitor(store)
    crashed = WorkerIdentity("old-box:7", "old-box", 7, "spine-dernet", "2.0.0", "cd" * 32)
    monitor.beat(crashed, started_at=time.time())
    monitor.beat(WORKER, started_at=time.time())
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE worker_heartbeats SET last_seen_at = last_seen_at - "
                             "CASE owner WHEN 'old-box:7' THEN 3601 ELSE 3500 END")
    assert "old-box:7" in _table(config)[1]
    with pytest.raises(ValueError, match="older_than_s"):
        monitor.prune_workers(0)
    caplog.set_level(logging.INFO, logger="spine_node.dispatcher")
    scheduler = start_scheduler(settings, store)
    try:
        wait_for(lambda: [w["owner"] for w in monitor.workers()] == [WORKER.owner], timeout=60)
    finally:
        scheduler.shutdown(wait=True)
        store.close()
    assert "retention forgot 1 worker heartbeats not seen for 1 h: old-box:7" in caplog.text
    table = _table(config)[1]
    assert "old-box" not in table
    assert any("gpu-box:4242" in line and "NOT SEEN" in line for line in table.splitlines())

"""SIGKILL the node in the middle of a burst: every acknowledged image survives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from spine_node.spool import relative_name
from spine_node.store import JobStore
from tests.nodekit import make_image, node_settings, write_config


def _start(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spine_node.cli", "serve", "--config", str(config), "--role", role],
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )


def _sender(port: int, files: list[Path], acked: list[str], stop: threading.Event) -> None:
    """Send files one by one, reconnecting after failures; record acknowledged UIDs."""
    pynetdicom_ae = AE(ae_title="MODALITY1")
    pynetdicom_ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
    pynetdicom_ae.acse_timeout = pynetdicom_ae.network_timeout = pynetdicom_ae.dimse_timeout = 5
    queue = list(files)
    while queue and not stop.is_set():
        assoc = pynetdicom_ae.associate("127.0.0.1", port, ae_title="SPINENODE")
        if not assoc.is_established:
            time.sleep(0.05)
            continue
        try:
            while queue and assoc.is_established:
                ds = dcmread(queue[0])
                rsp = assoc.send_c_store(ds)
                if "Status" in rsp and int(rsp.Status) == 0:
                    acked.append(str(ds.SOPInstanceUID))
                    queue.pop(0)
                else:
                    break
        finally:
            if assoc.is_established:
                assoc.release()


def test_sigkill_during_bursts_loses_no_acknowledged_image(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    config = write_config(tmp_path / "node.toml", settings)
    log = tmp_path / "node.log"
    n_senders, per_sender, cycles = 3, 30, 5
    files = [[make_image(tmp_path / f"s{s}_{i}.dcm", rows=32, cols=32, seed=i) and
              tmp_path / f"s{s}_{i}.dcm" for i in range(per_sender)] for s in range(n_senders)]
    acked: list[list[str]] = [[] for _ in range(n_senders)]
    rng = random.Random(7)
    stop = threading.Event()
    threads = [threading.Thread(target=_sender, args=(settings.port, files[s], acked[s], stop))
               for s in range(n_senders)]
    proc = _start(config, "receiver", log)
    for t in threads:
        t.start()
    for _ in range(cycles):
        time.sleep(rng.uniform(0.3, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = _start(config, "receiver", log)
    for t in threads:
        t.join(timeout=120)
    stop.set()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    all_acked = [uid for a in acked for uid in a]
    assert len(all_acked) == n_senders * per_sender  # the senders finished after the restarts
    store = JobStore.open(settings.db_url)
    try:
        status = store.status()
        assert status["instances"] == len(set(all_acked))
        assert status["jobs"]["queued"] == len(set(all_acked))
        for uid in all_acked:
            path = settings.spool_dir / relative_name(uid)
            assert str(dcmread(path).SOPInstanceUID) == uid
    finally:
        store.close()
    assert not list(settings.spool_dir.rglob("*.part"))
    assert "SECRET" not in log.read_text() and "Test^Secret" not in log.read_text()
    assert os.stat(settings.data_dir).st_mode & 0o777 == 0o700

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

import pytest
from pydicom import dcmread
from pynetdicom import AE

from spine_node.spool import relative_name
from spine_node.store import JobStore
from tests.nodekit import CountingPACS, make_image, node_settings, wait_for, write_config

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop

pytest_plugins = ("tests.fixtures_models",)


def _start(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spine_node.cli", "serve", "--config", str(config), "--role", role],
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )


def _sender(port: int, files: list[Path], acked: list[str], stop: threading.Event,
            pause: float = 0.0) -> None:
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
                    time.sleep(pause)
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


def test_sigkill_whole_node_20_cycles_each_image_processed_once(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Bursts from 3 concurrent senders; the whole node (all roles) SIGKILLed 20 times."""
    pacs = CountingPACS().start()
    settings = node_settings(
        tmp_path, bundle=str(tiny_bundle), device="cpu", lease_s=3.0,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    config = write_config(tmp_path / "node.toml", settings)
    log = tmp_path / "node.log"
    n_senders, per_sender, cycles = 3, 10, 20
    files = [[tmp_path / f"s{s}_{i}.dcm" for i in range(per_sender)] for s in range(n_senders)]
    for s, group in enumerate(files):
        for i, f in enumerate(group):
            make_image(f, rows=320, cols=256, seed=100 * s + i)
    acked: list[list[str]] = [[] for _ in range(n_senders)]
    stop = threading.Event()
    threads = [threading.Thread(target=_sender, args=(settings.port, files[s], acked[s], stop,
                                                      0.3))
               for s in range(n_senders)]
    proc = _start(config, "all", log)
    for t in threads:
        t.start()
    rng = random.Random(11)
    try:
        for _ in range(cycles):
            time.sleep(rng.uniform(0.5, 3.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = _start(config, "all", log)
        for t in threads:
            t.join(timeout=300)
        stop.set()
        all_acked = {uid for a in acked for uid in a}
        assert len(all_acked) == n_senders * per_sender

        def settled() -> dict | None:  # type: ignore[type-arg]
            store = JobStore.open(settings.db_url)
            try:
                s = store.status()
            finally:
                store.close()
            sends = s["outbound"].get("pacs", {})
            terminal = s["jobs"]["done"] + s["jobs"]["not_processed"] + s["jobs"]["dead"]
            if terminal == len(all_acked) and sends.get("pending", 1) == 0 and \
                    sends.get("sending", 1) == 0 and s["summaries_owed"] == 0:
                return s
            return None

        status = wait_for(settled, timeout=600, interval=0.5)
        assert status["instances"] == len(all_acked)
        assert sum(status["results"].values()) == len(all_acked)  # exactly one result per image
        assert status["jobs"]["dead"] == 0
        # every result object reached the PACS; a send cut off by SIGKILL after the PACS
        # stored it is sent again with the same SOP Instance UID, so the PACS holds it once
        assert len(set(pacs.received)) == status["outbound"]["pacs"]["sent"]
        assert pacs.classes.count("1.2.840.10008.5.1.4.1.1.88.33") >= len(all_acked)
        print(f"deliveries {len(pacs.received)} for {len(set(pacs.received))} objects")
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        pacs.stop()
    text = log.read_text()
    assert "SECRET-ID-42" not in text and "Test^Secret" not in text

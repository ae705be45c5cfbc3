"""A locked database is waited for, not a traceback; the queue files are private.

Another process holding SQLite's write lock (``BEGIN IMMEDIATE``) longer than the busy
timeout: the receiver answers 0xA700 for what it cannot commit (the sender retries), the
worker and dispatcher wait (also when they start while the lock is held) and resume, and
after the release every acknowledged image reaches a final state.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from spine_node.node import start_node
from spine_node.store import JobStore
from tests.nodekit import (
    CR_IMAGE_STORAGE,
    CountingPACS,
    make_image,
    node_settings,
    storescu,
    wait_for,
    write_config,
)

pytest_plugins = ("tests.fixtures_models",)

STATUS_OUT_OF_RESOURCES = 0xA700


def test_store_waits_for_a_locked_database(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    node = start_node(settings, ("receiver",))
    try:
        db = Path(settings.db_url.removeprefix("sqlite:///"))
        assert os.stat(db).st_mode & 0o777 == 0o600
        assert os.stat(settings.spool_dir).st_mode & 0o777 == 0o700
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        released = threading.Event()

        def release() -> None:
            time.sleep(2.0)
            blocker.execute("COMMIT")
            released.set()

        threading.Thread(target=release).start()
        src = tmp_path / "a.dcm"
        make_image(src)
        t0 = time.monotonic()
        out = storescu(settings.port, [src])
        assert out.returncode == 0, out.stdout + out.stderr
        assert released.is_set() and time.monotonic() - t0 >= 1.5  # it waited, then succeeded
        assert node.store.status()["instances"] == 1
        blocker.close()
    finally:
        node.stop()


def _serve(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spine_node.cli", "serve", "--config", str(config), "--role", role],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),  # the child owns it
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _c_store(port: int, path: Path) -> int:
    """Send one file with pynetdicom; return the DIMSE status."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(CR_IMAGE_STORAGE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(dcmread(path))
        return int(rsp.Status)
    finally:
        assoc.release()


@pytest.mark.slow
def test_write_lock_longer_than_busy_timeout_is_waited_for_by_every_role(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    pacs = CountingPACS().start()
    settings = node_settings(
        tmp_path,
        bundle=str(tiny_bundle),
        device="cpu",
        decode_isolation=False,
        db_busy_timeout_s=0.5,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    config = write_config(tmp_path / "node.toml", settings)
    logs = {role: tmp_path / f"{role}.log" for role in ("receiver", "worker", "dispatcher")}
    files = [tmp_path / f"img{i}.dcm" for i in range(4)]
    for i, path in enumerate(files):
        make_image(path, rows=96, cols=80, seed=i)
    procs = {"receiver": _serve(config, "receiver", logs["receiver"])}
    holder: sqlite3.Connection | None = None
    try:
        wait_for(lambda: _listening(settings.port), timeout=60)
        assert [_c_store(settings.port, f) for f in files[:2]] == [0, 0]

        db = settings.data_dir / "spine-node.db"
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        locked_at = time.monotonic()
        # worker and dispatcher start while the lock is held: they wait, they do not exit
        for role in ("worker", "dispatcher"):
            procs[role] = _serve(config, role, logs[role])
        # what the receiver cannot commit within the busy timeout is refused, not acknowledged
        assert [_c_store(settings.port, f) for f in files[2:]] == [STATUS_OUT_OF_RESOURCES] * 2
        for role in ("worker", "dispatcher"):
            wait_for(lambda r=role: "locked by another connection; waiting" in logs[r].read_text(),
                     timeout=120)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - locked_at)))  # > 4 busy timeouts
        assert all(p.poll() is None for p in procs.values()), {r: p.poll() for r, p in procs.items()}
        holder.execute("COMMIT")
        holder.close()
        holder = None

        # the sender retries what was refused; now everything is acknowledged
        assert [_c_store(settings.port, f) for f in files[2:]] == [0, 0]
        uids = [str(dcmread(f).SOPInstanceUID) for f in files]
        store = JobStore.open(settings.db_url)
        try:

            def all_final() -> bool:
                states = [store.job_state(uid) for uid in uids]
                sends = store.status()["outbound"].get("pacs", {})
                return all(s in ("done", "not_processed") for s in states) and sends.get(
                    "sent", 0
                ) >= len(uids) and sends.get("pending", 1) == 0 and sends.get("sending", 1) == 0

            wait_for(all_final, timeout=300, interval=0.5)
            status = store.status()
        finally:
            store.close()
        assert status["instances"] == 4
        assert sum(status["results"].values()) == 4
        assert pacs.classes.count("1.2.840.10008.5.1.4.1.1.88.33") >= 4  # one SR per image
        assert all(p.poll() is None for p in procs.values())
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=120)
        pacs.stop()
    text = {role: log.read_text() for role, log in logs.items()}
    for role, lines in text.items():
        assert "Traceback" not in lines, f"{role} logged a traceback:\n{lines}"
    assert "queue write failed" in text["receiver"]  # the 0xA700 answers, one line each
    for role in ("worker", "dispatcher"):
        assert "database lock was released" in text[role]

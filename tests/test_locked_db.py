"""A locked database is waited for and retried, not fatal; the queue files are private."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from spine_node.node import start_node
from tests.nodekit import make_image, node_settings, storescu


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

"""Load: 4 concurrent DCMTK senders, 2,000 images, no failure status, bounded memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from spine_node.store import JobStore
from tests.nodekit import make_image, node_settings, wait_for, write_config

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_four_senders_two_thousand_images(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, max_associations=8)
    config = write_config(tmp_path / "node.toml", settings)
    senders, per_sender = 4, 500
    dirs = []
    for s in range(senders):
        d = tmp_path / f"sender{s}"
        d.mkdir()
        for i in range(per_sender):
            make_image(d / f"{i:04d}.dcm", rows=64, cols=64, seed=s * per_sender + i)
        dirs.append(d)
    log = tmp_path / "node.log"
    proc = subprocess.Popen([sys.executable, "-m", "spine_node.cli", "serve", "--config",
                             str(config), "--role", "receiver"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "SPINENODE", "127.0.0.1",
                                         str(settings.port)], capture_output=True).returncode == 0)
        rss_start = _vm(proc.pid, "VmRSS")
        t0 = time.monotonic()
        runs = [subprocess.Popen(["storescu", "-aet", "MODALITY1", "-aec", "SPINENODE", "+sd",
                                  "127.0.0.1", str(settings.port), str(d)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for d in dirs]
        outputs = [r.communicate(timeout=600)[0] for r in runs]
        elapsed = time.monotonic() - t0
        for r, out in zip(runs, outputs, strict=True):
            assert r.returncode == 0, out[-2000:]
            assert "Store Failed" not in out and "Error" not in out, out[-2000:]
        peak = _vm(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    store = JobStore.open(settings.db_url)
    try:
        status = store.status()
    finally:
        store.close()
    assert status["instances"] == senders * per_sender
    assert status["jobs"]["queued"] == senders * per_sender
    assert peak - rss_start < 200 * 1024**2, f"receiver grew by {(peak - rss_start) / 2**20:.0f} MiB"
    print(f"\nload: {senders * per_sender} images from {senders} senders in {elapsed:.1f} s "
          f"({senders * per_sender / elapsed:.0f} images/s); receiver RSS {rss_start / 2**20:.0f} "
          f"MiB at start, peak {peak / 2**20:.0f} MiB")

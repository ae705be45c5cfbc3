"""Shared fixtures. Outbound network is blocked by pytest-socket (see pyproject addopts)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / ".cache" / "ultralytics"))
os.environ.setdefault("YOLO_VERBOSE", "False")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed (apt-get install postgresql; .ci/run does it)"
        )
    return found[-1]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A throw-away PostgreSQL server on loopback (or $SPINE_NODE_TEST_PG_URL)."""
    env = os.environ.get("SPINE_NODE_TEST_PG_URL")
    if env:
        yield env
        return
    from tests.nodekit import free_port

    base = Path(tempfile.mkdtemp(prefix="spine-pg-"))
    data = base / "data"
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "spine"],
                   check=True, capture_output=True)
    log = base / "log"
    subprocess.run(
        [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
         f"-p {port} -k {base} -h 127.0.0.1 -F", "start"],
        check=True, capture_output=True,
    )
    try:
        subprocess.run([*as_user, _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "spine", "spinetest"], check=True, capture_output=True)
        yield f"postgresql+psycopg://spine@127.0.0.1:{port}/spinetest"
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

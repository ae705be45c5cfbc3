"""Every role started exactly as its systemd unit starts it, and seen to become ready.

The unit's ``Environment=`` lines and ``ExecStart=`` are parsed from ``systemd/``; only the
install prefix (``/opt/spine-node/.venv`` -> this test's venv), the configuration path
(``/etc/spine-node/spine-node.toml`` -> a temporary file) and the state directory
(``/var/lib/spine-node`` -> a temporary folder) are mapped. The receiver must answer DCMTK
``echoscu``, the worker must claim the image DCMTK ``storescu`` sent, and the dispatcher must
deliver the result objects to a DCMTK ``storescp``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.config import CONFIG_PATH_ENV
from spine_node.logs import uid_hash
from spine_node.store import JobStore, Monitor
from tests.nodekit import StoreSCP, make_image, node_settings, storescu, wait_for, write_config
from tests.test_systemd import parse_unit

pytest_plugins = ("tests.fixtures_models",)

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
PREFIX = "/opt/spine-node/.venv"
CONFIG = "/etc/spine-node/spine-node.toml"
STATE = "/var/lib/spine-node"


def unit_invocation(
    unit: Path, instance: str, *, venv: Path, config: Path, state: Path
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment systemd would use for ``unit`` (paths mapped)."""
    keys = parse_unit(unit)

    def mapped(text: str) -> str:
        text = text.replace("%i", instance)
        return text.replace(PREFIX, str(venv)).replace(CONFIG, str(config)).replace(
            STATE, str(state)
        )

    env: dict[str, str] = {}
    for line in keys.get("Service.Environment", []):
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            env[name] = mapped(value)
    (exec_start,) = keys["Service.ExecStart"]
    return shlex.split(mapped(exec_start)), env


def _json_lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _base_env() -> dict[str, str]:
    """A clean environment as systemd gives (no SPINE_NODE_* leaking in from the test run)."""
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH")
    return {k: os.environ[k] for k in keep if k in os.environ}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


def test_units_name_the_config_file_through_the_documented_variable() -> None:
    for unit in sorted(SYSTEMD.glob("*.service")):
        cmd, env = unit_invocation(unit, "0", venv=Path("/v"), config=Path("/c.toml"),
                                   state=Path("/s"))
        assert env.get(CONFIG_PATH_ENV) == "/c.toml", unit.name
        assert cmd[0] == "/v/bin/spine-node" and cmd[1] == "serve", unit.name


class NotifySocket:
    """The service manager's end of sd_notify: an AF_UNIX datagram socket with an abstract
    name, read all the time by a thread (as systemd reads it: the kernel queues only a few
    datagrams), each sender's pid received with its message (SO_PASSCRED)."""

    def __init__(self) -> None:
        self.name = f"@spine-node-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[int, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        creds = struct.calcsize("3i")
        while not self.closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except (TimeoutError, OSError):
                continue
            pid = next(struct.unpack("3i", d[:creds])[0] for level, kind, d in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self.lock:
                self.messages.append((pid, fields))

    def drain(self) -> list[tuple[int, dict[str, str]]]:
        """Every (pid, {KEY: VALUE}) received so far."""
        with self.lock:
            return list(self.messages)

    def of(self, pid: int, key: str) -> list[str]:
        return [fields[key] for p, fields in self.drain() if p == pid and key in fields]

    def close(self) -> None:
        self.closed.set()
        self.reader.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("worker_unit", ["spine-node-worker.service", "spine-node-worker@.service"])
def test_units_start_and_become_ready(tmp_path: Path, tiny_bundle: Path, pacs: StoreSCP,
                                      worker_unit: str) -> None:
    state = tmp_path / "state"
    settings = node_settings(
        tmp_path, data_dir=str(state), bundle=str(tiny_bundle), device="cpu", log_json=True,
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                       "port": pacs.port}],
    )
    config = write_config(tmp_path / "spine-node.toml", settings)
    venv = Path(sys.prefix)
    assert (venv / "bin" / "spine-node").is_file(), "the test's venv has no spine-node script"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    notify = NotifySocket()
    try:
        for name in ("spine-node-receiver.service", worker_unit, "spine-node-dispatcher.service"):
            cmd, env = unit_invocation(SYSTEMD / name, "0", venv=venv, config=config, state=state)
            keys = parse_unit(SYSTEMD / name)
            assert keys["Service.Type"] == ["notify"] and keys["Service.NotifyAccess"] == ["main"]
            assert keys["Service.WatchdogSec"]
            # what systemd adds for Type=notify with WatchdogSec= (a short watchdog here)
            env |= {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "2000000"}
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen(cmd, env={**_base_env(), **env},
                                               stdout=subprocess.DEVNULL, stderr=log)

        def alive() -> None:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited: {logs[name].read_text()}"

        def echo_ok() -> bool:
            alive()
            out = subprocess.run(["echoscu", "-aec", settings.ae_title, "127.0.0.1",
                                  str(settings.port)], capture_output=True, timeout=30)
            return out.returncode == 0

        wait_for(echo_ok, timeout=90, interval=0.3)  # receiver ready
        # each role said READY=1 once (with a STATUS= line naming it), then pings the watchdog
        for name, role in (("spine-node-receiver.service", "receiver"), (worker_unit, "worker"),
                           ("spine-node-dispatcher.service", "dispatcher")):
            pid = procs[name].pid
            wait_for(lambda pid=pid: len(notify.of(pid, "WATCHDOG")) >= 2 or alive(),
                     timeout=120, interval=0.3)
            assert notify.of(pid, "READY") == ["1"], (name, notify.drain())
            assert any(role in status for status in notify.of(pid, "STATUS")), name
            assert set(notify.of(pid, "WATCHDOG")) == {"1"}
            first = [i for i, (p, f) in enumerate(notify.drain()) if p == pid]
            assert "READY" in notify.drain()[first[0]][1]  # no ping before READY=1
        image = tmp_path / "image.dcm"
        make_image(image, rows=320, cols=256)
        assert storescu(settings.port, [image]).returncode == 0

        store = JobStore.open(settings.db_url)
        try:
            def finished() -> dict | None:  # type: ignore[type-arg]
                alive()
                status = store.status()
                return status if sum(status["results"].values()) == 1 else None

            wait_for(finished, timeout=180, interval=0.3)  # the worker claimed and processed it
            worker_pid = procs[worker_unit].pid
            beats = Monitor(store).live_workers(max_age_s=600)
            assert any(b["pid"] == worker_pid for b in beats), beats
        finally:
            store.close()
        # the dispatcher delivered the result objects to DCMTK's storescp
        wait_for(lambda: len(pacs.received()) >= 2 or alive(), timeout=90, interval=0.3)
        assert len(pacs.received()) >= 2
        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)  # the units' KillSignal
            assert proc.wait(timeout=120) == 0, f"{name}: {logs[name].read_text()}"
            wait_for(lambda pid=proc.pid: notify.of(pid, "STOPPING"), timeout=10)
            assert notify.of(proc.pid, "STOPPING") == ["1"], name
        # JSON log lines name the job and the (hashed) study as fields, in both roles
        study = uid_hash(str(dcmread(image).StudyInstanceUID))
        worker_lines = _json_lines(logs[worker_unit])
        (outcome,) = [e for e in worker_lines if e.get("job_id") and "score=" in e["message"]]
        assert outcome["study_instance_uid"] == study
        if "not_processed" in outcome["message"]:
            assert "(" in outcome["message"]  # the reason is on the outcome line
        delivered = [e for e in _json_lines(logs["spine-node-dispatcher.service"])
                     if "delivered" in e["message"]]
        assert all(e["send_id"] and e["destination"] == "pacs" for e in delivered)
        per_image = [e for e in delivered if "job_id" in e]  # the image's SR and overlay
        assert len(per_image) >= 2
        assert all(e["job_id"] == outcome["job_id"] and e["study_instance_uid"] == study
                   and f"of job {outcome['job_id']}" in e["message"] for e in per_image)
    finally:
        notify.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

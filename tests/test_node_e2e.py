"""The whole node as a process: receive, run a tiny bundle, deliver; status, worklist, replay."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.store import JobStore
from tests.nodekit import CountingPACS, make_image, node_settings, storescu, wait_for, write_config

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop

CLI = [sys.executable, "-m", "spine_node.cli"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import make_tiny_bundle

    path = tmp_path_factory.mktemp("bundle") / "tiny"
    make_tiny_bundle(path, seed=0, onnx=False)
    return path


@pytest.fixture
def pacs() -> Iterator[CountingPACS]:
    p = CountingPACS().start()
    yield p
    p.stop()


def _serve(config: Path, log: Path, role: str = "all") -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "serve", "--config", str(config), "--role", role],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def _settings(tmp_path: Path, bundle: Path, pacs: CountingPACS, **kw: object):  # type: ignore[no-untyped-def]
    return node_settings(
        tmp_path, bundle=str(bundle), device="cpu",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        **kw,
    )


def _status(config: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([*CLI, "status", "--config", str(config), "--json"], capture_output=True,
                         text=True, timeout=60, check=False)
    report = json.loads(out.stdout)
    assert out.returncode == report["exit_code"]  # non-zero while work waits for a worker
    return report


def _settled(config: Path, n: int) -> dict | None:  # type: ignore[type-arg]
    s = _status(config)
    jobs, sends = s["jobs"], s["outbound"].get("pacs", {})
    done = jobs["done"] + jobs["not_processed"] + jobs["dead"]
    if done == n and sends and sends["pending"] == 0 and sends["sending"] == 0 \
            and s["summaries_owed"] == 0:
        return s
    return None


def test_node_end_to_end_with_status_worklist_and_replay(tmp_path: Path, tiny_bundle: Path,
                                                         pacs: CountingPACS) -> None:
    settings = _settings(tmp_path, tiny_bundle, pacs)
    config = write_config(tmp_path / "node.toml", settings)
    log = tmp_path / "node.log"
    proc = _serve(config, log)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "SPINENODE", "127.0.0.1",
                                         str(settings.port)], capture_output=True).returncode == 0)
        study = "1.2.826.0.1.3680043.8.498.1"
        files = [tmp_path / f"i{i}.dcm" for i in range(3)]
        for i, f in enumerate(files):
            make_image(f, rows=320, cols=256, seed=i, study_uid=study)
        ct = tmp_path / "ct.dcm"
        make_image(ct, rows=320, cols=256, modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2")
        assert storescu(settings.port, [*files, ct]).returncode == 0
        status = wait_for(lambda: _settled(config, 3), timeout=180)
        assert status["instances"] == 4
        assert sum(status["results"].values()) == 3  # the misrouted CT gets no job
        assert status["categories"] == {"image": 3, "not_image": 0, "out_of_scope": 1}
        # every image has an SR (and an overlay when its pixels decode) at the PACS, once
        counts = Counter(pacs.received)
        assert all(n == 1 for n in counts.values())
        # Comprehensive SRs: one per image, plus the study summaries (one per study and
        # priority change, series 9900)
        study_docs = {
            str(d.SOPInstanceUID)
            for d in (dcmread(p) for p in settings.outbox_dir.rglob("*.dcm"))
            if d.get("SeriesNumber") == 9900
        }
        assert len(study_docs) >= 1
        assert pacs.classes.count("1.2.840.10008.5.1.4.1.1.88.33") == 3 + len(study_docs)
        assert status["outbound"]["pacs"]["sent"] == len(pacs.received)
        # the misrouted CT is outside the intended use: recorded, no job, nothing sent
        store = JobStore.open(settings.db_url)
        try:
            ct_uid = str(dcmread(ct).SOPInstanceUID)
            assert store.job_state(ct_uid) is None
        finally:
            store.close()
        # the worklist lists the study with results
        out = subprocess.run([*CLI, "worklist", "--config", str(config), "--json"],
                             capture_output=True, text=True, timeout=60, check=True)
        rows = json.loads(out.stdout)
        assert [r["rank"] for r in rows] == [1, 2]  # the study, then the misrouted CT's
        assert [r["study_instance_uid"] for r in rows] == [study, str(dcmread(ct).StudyInstanceUID)]
        assert [r["outcome"] for r in rows] == ["analysed", "ignored"]
        assert rows[1]["reason"].startswith("out of scope: modality CT")
        assert next(r for r in rows if r["study_instance_uid"] == study)["n_images"] == 3
        table = subprocess.run([*CLI, "status", "--config", str(config)], capture_output=True,
                               text=True, timeout=60, check=True).stdout
        assert "instances received" in table and "pacs:" in table
        # research export is de-identified by default and keeps references consistent
        export_dir = tmp_path / "export"
        subprocess.run([*CLI, "export", "--config", str(config), "--out", str(export_dir),
                        "--salt", "s"], capture_output=True, text=True, timeout=120, check=True)
        exported = [dcmread(p) for p in export_dir.glob("*.dcm")]
        assert len(exported) >= 6  # 3 sources + at least 3 SRs
        assert all(str(d.get("PatientID", "")) == "" for d in exported)
        assert all(d.PatientIdentityRemoved == "YES" for d in exported)
        assert not {str(d.SOPInstanceUID) for d in exported} & set(pacs.received)
        # our own result objects, forwarded back to us, are accepted and not queued
        own = sorted(settings.outbox_dir.rglob("*.dcm"))[:2]
        assert len(own) == 2
        assert storescu(settings.port, own, extra=("-R",)).returncode == 0
        assert _status(config)["instances"] == 4
        # sending the same images again adds nothing
        assert storescu(settings.port, files).returncode == 0
        time.sleep(1.0)
        assert _status(config)["instances"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert "SECRET-ID-42" not in text and "Secret" not in text
    assert "job " in text


def test_echo_and_replay_commands(tmp_path: Path, tiny_bundle: Path, pacs: CountingPACS) -> None:
    settings = _settings(tmp_path, tiny_bundle, pacs)
    config = write_config(tmp_path / "node.toml", settings)
    out = subprocess.run([*CLI, "echo", "pacs", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "success" in out.stdout
    pacs.stop()
    out = subprocess.run([*CLI, "echo", "pacs", "--config", str(config), "--timeout", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "failed" in out.stdout
    out = subprocess.run([*CLI, "echo", "nope", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no destination named 'nope'" in out.stderr
    out = subprocess.run([*CLI, "replay", "sends", "--config", str(config)], capture_output=True,
                         text=True, timeout=60, check=True)
    assert "requeued 0 sends" in out.stdout


def test_worker_without_bundle_says_so_and_does_not_start(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    config = write_config(tmp_path / "node.toml", settings)
    out = subprocess.run([*CLI, "serve", "--config", str(config), "--role", "worker"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no model bundle is configured" in out.stderr


def test_sigterm_finishes_the_current_batch_then_exits(tmp_path: Path, tiny_bundle: Path,
                                                       pacs: CountingPACS) -> None:
    settings = _settings(tmp_path, tiny_bundle, pacs, worker_batch_size=2)
    config = write_config(tmp_path / "node.toml", settings)
    log = tmp_path / "node.log"
    files = [tmp_path / f"i{i}.dcm" for i in range(12)]
    for i, f in enumerate(files):
        make_image(f, rows=320, cols=256, seed=i)
    proc = _serve(config, log)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "SPINENODE", "127.0.0.1",
                                         str(settings.port)], capture_output=True).returncode == 0)
        assert storescu(settings.port, files).returncode == 0
        wait_for(lambda: sum(_status(config)["results"].values()) >= 1, timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    status = _status(config)
    assert status["jobs"]["running"] == 0  # nothing left half-done
    assert status["jobs"]["queued"] + sum(status["results"].values()) == len(files)
    assert "finishing current work" in log.read_text()
    proc = _serve(config, log)  # the rest is processed after a restart
    try:
        wait_for(lambda: _settled(config, len(files)), timeout=180)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def test_echo_of_hl7_and_webhook_destinations(tmp_path: Path, tiny_bundle: Path,
                                              pacs: CountingPACS) -> None:
    """HL7 and webhook destinations have no C-ECHO: echo checks that they accept a connection."""
    import socket

    from spine_node.config import Hl7Destination, WebhookDestination

    listener = socket.create_server(("127.0.0.1", 0))
    open_port = listener.getsockname()[1]
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    settings = _settings(tmp_path, tiny_bundle, pacs)
    settings = settings.model_copy(update={"destinations": (
        *settings.destinations,
        Hl7Destination(kind="hl7", name="ris", host="127.0.0.1", port=open_port),
        Hl7Destination(kind="hl7", name="ris-down", host="127.0.0.1", port=closed_port),
        WebhookDestination(kind="webhook", name="hook", url=f"http://127.0.0.1:{open_port}/ai"),
    )})
    config = write_config(tmp_path / "node.toml", settings)
    try:
        def echo(name: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, "echo", name, "--config", str(config), "--timeout", "5"],
                                  capture_output=True, text=True, timeout=60)

        ris, down, hook = echo("ris"), echo("ris-down"), echo("hook")
    finally:
        listener.close()
    assert ris.returncode == 0, ris.stdout + ris.stderr
    assert f"ris (hl7 127.0.0.1:{open_port}): MLLP TCP connection accepted" in ris.stdout
    assert down.returncode == 1 and "not reachable" in down.stdout, down.stdout + down.stderr
    assert hook.returncode == 0 and "TCP connection accepted" in hook.stdout, hook.stdout


def test_echo_says_why_a_dicom_destination_fails(tmp_path: Path, tiny_bundle: Path) -> None:
    """One line naming the cause, never a traceback: DNS, refused port, non-DICOM port, TLS file."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks DICOM
    silent_port = listener.getsockname()[1]
    refused = socket.create_server(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()
    settings = node_settings(tmp_path, bundle=str(tiny_bundle), destinations=[
        {"name": "dns", "ae_title": "PACS", "host": "no-such-host.invalid", "port": 104},
        {"name": "down", "ae_title": "PACS", "host": "127.0.0.1", "port": refused_port},
        {"name": "silent", "ae_title": "PACS", "host": "127.0.0.1", "port": silent_port},
        {"name": "tls", "ae_title": "PACS", "host": "127.0.0.1", "port": silent_port,
         "tls": {"enabled": True, "ca_file": str(tmp_path / "no-ca.pem")}},
    ])
    config = write_config(tmp_path / "node.toml", settings)

    def echo(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "echo", name, "--config", str(config), "--timeout", "2"],
                              capture_output=True, text=True, timeout=60)

    try:
        dns, down, silent, tls = echo("dns"), echo("down"), echo("silent"), echo("tls")
    finally:
        listener.close()
    for out in (dns, down, silent, tls):
        assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert dns.returncode == 1 and "C-ECHO failed: not reachable" in dns.stdout, dns.stdout
    assert down.returncode == 1 and "not reachable" in down.stdout, down.stdout
    assert silent.returncode == 1, silent.stdout
    assert "no association: the association request was aborted or not answered within 2 s" \
        in silent.stdout
    assert tls.returncode == 2 and "destinations.tls.tls.ca_file" in tls.stderr, tls.stderr
    assert "cannot be read" in tls.stderr

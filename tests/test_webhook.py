"""Study priority pushed as JSON to a webhook (retried after a failure), and the ranked worklist.

A small ``http.server`` on loopback plays the RIS / worklist: it answers the first POST with
HTTP 500 and accepts the rest. The node runs in-process with a scripted cascade so that one
study is abnormal, two are normal and one could not be processed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from spine_node.node import start_node
from spine_node.results.types import Status
from spine_node.store import JobStore
from tests.nodekit import (
    StoreSCP,
    free_port,
    make_image,
    node_settings,
    storescu,
    wait_for,
    write_config,
)
from tests.orthanc_kit import NOT_PROCESSED, POSITIVE, Scripted, ScriptedCascade

CLI = [sys.executable, "-m", "spine_node.cli"]


@dataclass(frozen=True)
class Hook:
    """One request the webhook server received."""

    path: str
    content_type: str
    body: bytes
    answered: int

    def json(self) -> Any:
        return json.loads(self.body)


class HookServer:
    """HTTP server on loopback that fails the first ``fail_first`` POSTs with 500, then says 204."""

    def __init__(self, fail_first: int = 1) -> None:
        self.fail_first = fail_first
        self.hooks: list[Hook] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with server._lock:
                    code = 500 if len(server.hooks) < server.fail_first else 204
                    server.hooks.append(
                        Hook(self.path, self.headers.get("Content-Type", ""), body, code)
                    )
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> HookServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def received(self) -> list[Hook]:
        with self._lock:
            return list(self.hooks)


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer(fail_first=1).start()
    yield server
    server.stop()


def _webhooks_settled(store: JobStore, n: int) -> bool:
    status = store.status()
    jobs = status["jobs"]
    sends = status["outbound"].get("webhook", {})
    return bool(
        jobs["done"] + jobs["not_processed"] == n
        and sends
        and sends["sent"] == n
        and not sends["pending"]
        and not sends["sending"]
    )


def test_webhook_retried_and_worklist_ranked(tmp_path: Path, hooks: HookServer) -> None:
    # studies in order of arrival: normal (0.1), normal (0.3), not processed, abnormal (2 images)
    studies = {name: f"1.2.826.0.1.3680043.8.498.80{i}" for i, name in enumerate("BDCA", 1)}
    files: list[Path] = []
    for name, n in (("B", 1), ("D", 1), ("C", 1), ("A", 2)):
        for i in range(n):
            path = tmp_path / f"{name}{i}.dcm"
            make_image(path, rows=320, cols=256, seed=len(files), study_uid=studies[name])
            files.append(path)
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    cascade = ScriptedCascade(
        {
            studies["B"]: Scripted(Status.NEGATIVE, 0.1),
            studies["D"]: Scripted(Status.NEGATIVE, 0.3),
            studies["C"]: NOT_PROCESSED,
            uids[3]: Scripted(Status.NEGATIVE, 0.2),  # A, first image
            uids[4]: POSITIVE,  # A, second image: 0.9 with findings
        }
    )
    # one image per worker batch: the test counts one study summary (one POST) per result,
    # and a batch holding both of study A's images makes one summary for the two
    settings = node_settings(
        tmp_path, webhook_url=f"http://127.0.0.1:{hooks.port}/spine/priority", device="cpu",
        worker_batch_size=1,
    )
    config = write_config(tmp_path / "node.toml", settings)
    node = start_node(settings, cascade=cascade)
    try:
        for f in files:  # one association each: arrival order is the order above
            assert storescu(settings.port, [f]).returncode == 0
        wait_for(lambda: _webhooks_settled(node.store, len(files)), timeout=40)
        status = node.store.status()
        assert status["outbound"]["webhook"]["dead"] == 0
        assert status["outbound"]["webhook"]["sent"] == len(files)  # one POST per result

        received = hooks.received()
        assert len(received) == len(files) + 1  # one retry
        assert [h.answered for h in received].count(500) == 1
        failed = received[0]
        assert failed.answered == 500
        retried = [h for h in received[1:] if h.body == failed.body]
        assert len(retried) == 1 and retried[0].answered == 204  # the same body, delivered
        accepted = [h for h in received if h.answered == 204]
        assert all(h.path == "/spine/priority" for h in received)
        assert all(h.content_type == "application/json" for h in received)

        bodies = [h.json() for h in accepted]
        assert sorted(img["sop_instance_uid"] for b in bodies for img in b["images"][-1:]) == (
            sorted(uids)
        )
        latest: dict[str, dict[str, Any]] = {}
        for body in bodies:
            assert set(body) >= {"study_instance_uid", "priority", "images", "model"}
            assert body["model"]["name"] == cascade.model_info.name
            study = body["study_instance_uid"]
            if study not in latest or len(body["images"]) > len(latest[study]["images"]):
                latest[study] = body
        assert set(latest) == set(studies.values())
        expected = {
            "A": ("positive", 0.9, 2),
            "B": ("negative", 0.1, 1),
            "C": ("not_processed", None, 1),
            "D": ("negative", 0.3, 1),
        }
        for name, (level, score, n_images) in expected.items():
            body = latest[studies[name]]
            assert body["priority"]["level"] == level, name
            assert body["priority"]["max_score"] == score, name
            assert body["priority"]["n_images"] == n_images == len(body["images"]), name
        a_images = {img["sop_instance_uid"]: img for img in latest[studies["A"]]["images"]}
        assert a_images[uids[4]]["status"] == "positive"
        assert [f["label"] for f in a_images[uids[4]]["findings"]] == [
            f.label for f in POSITIVE.findings
        ]
        assert a_images[uids[3]]["status"] == "negative"
        c_image = latest[studies["C"]]["images"][0]
        assert c_image["status"] == "not_processed" and c_image["reason"] == NOT_PROCESSED.reason
    finally:
        node.stop()

    out = subprocess.run(
        [*CLI, "worklist", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(out.stdout)
    order = {uid: name for name, uid in studies.items()}
    assert [order[r["study_instance_uid"]] for r in rows] == ["A", "C", "B", "D"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert [r["priority"] for r in rows] == ["positive", "not_processed", "negative", "negative"]
    assert rows[0]["max_score"] == 0.9 and rows[0]["n_images"] == 2 and rows[0]["n_positive"] == 1
    assert rows[2]["arrival"] < rows[3]["arrival"]  # the tie between normals goes by arrival
    assert rows[3]["max_score"] > rows[2]["max_score"]  # ...not by score


def test_each_object_goes_by_its_destination_kind_never_by_name(tmp_path: Path) -> None:
    """Two webhook destinations and a DICOM peer named "webhook" (once a magic name)."""
    first, second = HookServer(fail_first=0).start(), HookServer(fail_first=0).start()
    pacs = StoreSCP(tmp_path / "pacs", port=free_port()).start()
    path = tmp_path / "one.dcm"
    make_image(path, rows=320, cols=256, seed=7)
    study = str(dcmread(path).StudyInstanceUID)
    settings = node_settings(
        tmp_path,
        device="cpu",
        destinations=[
            {"name": "webhook", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            {"kind": "webhook", "name": "ris", "url": f"http://127.0.0.1:{first.port}/a"},
            {"kind": "webhook", "name": "worklist", "url": f"http://127.0.0.1:{second.port}/b",
             "timeout_s": 5},
        ],
    )
    assert [d.kind for d in settings.destinations] == ["dicom", "webhook", "webhook"]
    node = start_node(settings, cascade=ScriptedCascade({}, default=POSITIVE))

    def settled() -> bool:
        status = node.store.status()
        out = status["outbound"]
        return status["summaries_owed"] == 0 and all(
            name in out and out[name]["sent"] and not out[name]["pending"]
            and not out[name]["sending"]
            for name in ("webhook", "ris", "worklist")
        )

    try:
        assert storescu(settings.port, [path]).returncode == 0
        wait_for(settled, timeout=40)
        out = node.store.status()["outbound"]
    finally:
        node.stop()
        pacs.stop()
        first.stop()
        second.stop()
    # the DICOM peer called "webhook" got DICOM objects by C-STORE, no JSON
    received = [dcmread(p) for p in pacs.received()]
    assert len(received) == out["webhook"]["sent"] >= 2
    assert {ds.Modality for ds in received} >= {"SR"}
    assert all(ds.StudyInstanceUID == study for ds in received)
    assert out["webhook"]["dead"] == 0
    # each webhook got the study state as one JSON POST at its own URL, no DICOM
    for server, url_path, name in ((first, "/a", "ris"), (second, "/b", "worklist")):
        hooks = server.received()
        assert len(hooks) == out[name]["sent"] == 1, name
        assert hooks[0].path == url_path and hooks[0].content_type == "application/json"
        assert hooks[0].json()["study_instance_uid"] == study
        assert hooks[0].json()["priority"]["n_images"] == 1

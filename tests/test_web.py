"""The web status page of a running node (in-process, demo bundle, DCMTK storescu and
storescp): what it shows, its overlay thumbnails, feedback, replay, and its security rules
(token, session, CSRF, loopback-only without a token, no file outside the data directory);
its Prometheus metrics scraped after C-STORE, health and readiness, the monitoring page.

One node for the module: every role plus the page, a PACS that receives the results, a
second destination that is down (its sends die, so there are dead letters to replay) and a RIS
(python-hl7's MLLP listener) that refuses the first HL7 message and accepts the others, so the
studies' RIS delivery is dead or done.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from spine_node.cli import main
from spine_node.node import RunningNode, StartupError, start_node
from spine_node.spool import relative_name
from spine_node.store import FeedbackLog, Monitor
from spine_node.web import create_app, start_web
from spine_node.web.auth import CSRF_FIELD, SESSION_COOKIE, Guard
from spine_node.web.files import OutsideDataDir, inside
from spine_node.worklist import build_worklist
from tests.mllp_kit import MllpListener
from tests.nodekit import (
    CTImageStorage,
    StoreSCP,
    free_port,
    make_image,
    node_settings,
    storescu,
    wait_for,
    write_config,
)

SAMPLES = Path(__file__).resolve().parents[1] / "spine_node" / "samples"
INDEX = json.loads((SAMPLES / "index.json").read_text())
TOKEN = "web-test-token-0123456789abcdef"


@dataclass
class Web:
    node: RunningNode
    base: str
    settings: Any
    config: Path
    ct_uid: str
    tmp: Path

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base + path, timeout=30, **kw)

    def bearer(self, path: str) -> httpx.Response:
        return self.get(path, headers={"Authorization": f"Bearer {TOKEN}"})

    @contextmanager
    def login(self) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            r = client.post("/login", data={"token": TOKEN, "next": "/"})
            assert r.status_code == 303 and SESSION_COOKIE in r.cookies
            yield client


def csrf_of(html: str) -> str:
    match = re.search(rf'name="{CSRF_FIELD}" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    tmp = tmp_path_factory.mktemp("web")
    pacs = StoreSCP(tmp / "pacs").start()
    ris = MllpListener(["AR"]).start()  # the first message dies (one attempt), then AA
    token_file = tmp / "web-token"
    token_file.write_text(TOKEN + "\n")
    settings = node_settings(
        tmp, bundle="demo", device="cpu", send_max_attempts=1,
        web={"port": free_port(), "token_file": str(token_file)},
        destinations=[
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port},
            {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
            {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": ris.port,
             "timeout_s": 5.0},
        ],
    )
    config = write_config(tmp / "node.toml", settings)
    node = start_node(settings, ("receiver", "worker", "dispatcher", "web"))
    try:
        ct = tmp / "ct.dcm"
        ct_uid = str(make_image(ct, sop_class=CTImageStorage, modality="CT").SOPInstanceUID)
        files = [SAMPLES / item["file"] for item in INDEX] + [ct]
        assert storescu(settings.port, files).returncode == 0

        def settled() -> bool:
            status = node.store.status()
            dead = status["outbound"].get("down", {}).get("dead", 0)
            ris_states = Monitor(node.store).study_delivery(
                [item["study_instance_uid"] for item in INDEX])
            return (sum(status["results"].values()) == len(INDEX) and dead > 0
                    and all(d["ris"] in ("done", "dead") for d in ris_states.values()))

        wait_for(settled, timeout=240, interval=0.5)
        yield Web(node, f"http://127.0.0.1:{node.web.port}", settings, config, ct_uid, tmp)
    finally:
        node.stop()
        pacs.stop()
        ris.stop()


def _deliveries(html: str, study_uid: str) -> dict[str, str]:
    """The delivery states a page shows in the row of one study (kind -> state)."""
    row = re.search(rf'<tr[^>]*data-study="{re.escape(study_uid)}">(.*?)</tr>', html, re.S)
    assert row, study_uid
    return dict(re.findall(r'class="delivery" data-kind="(\w+)" data-state="(\w+)"',
                           row.group(1)))


def test_pages_show_the_worklists_delivery_state_and_ignored_studies_with_reason(
        web: Web) -> None:
    settings = web.settings
    rows = build_worklist(web.node.store.studies(settings.commitment_destinations,
                                                 ignored_studies=True))
    ct_study = str(dcmread(web.tmp / "ct.dcm", stop_before_pixels=True).StudyInstanceUID)
    by_uid = {row["study_instance_uid"]: row for row in rows}
    assert by_uid[ct_study]["outcome"] == "ignored" and by_uid[ct_study]["reason"]
    studies_page, status_page = web.bearer("/studies").text, web.bearer("/").text
    shown = set()
    for uid, row in by_uid.items():
        expected = {kind: state or "none" for kind, state in row["delivery"].items()}
        assert set(expected) == {"ris", "commitment"}
        for html in (studies_page, status_page):
            assert _deliveries(html, uid) == expected, uid
        study = web.bearer(f"/studies/{uid}").text
        assert re.findall(r'data-kind="(\w+)" data-state="(\w+)"', study) == list(
            expected.items())
        shown |= set(expected.items())
    # the RIS refused one study's message (dead) and took the other's (done); no commitment
    assert {("ris", "dead"), ("ris", "done"), ("commitment", "none")} <= shown
    assert ("commitment", "done") not in shown
    # the ignored study (the CT is out of scope) is listed with the worklist's reason
    reason = by_uid[ct_study]["reason"]
    assert reason.startswith("out of scope")
    for html in (studies_page, status_page):
        row = re.search(rf'<tr[^>]*data-study="{re.escape(ct_study)}">(.*?)</tr>', html, re.S)
        assert row and 'data-outcome="ignored"' in row.group(1)
        assert f'<span class="reason">{reason}</span>' in row.group(1)


def test_status_page_shows_queue_destinations_dead_letters_and_bundle(web: Web) -> None:
    r = web.bearer("/")
    assert r.status_code == 200
    page = r.text
    from spine_node.models.bundle import load_manifest
    from spine_node.node import bundle_sha256, demo_bundle_path

    version = load_manifest(demo_bundle_path()).version  # the embedded bundle's, whatever it is
    assert "spine-node-demo" in page and version in page and "not for clinical use" in page

    assert bundle_sha256("demo") in page  # the manifest hash
    assert re.search(r"<td>pacs</td>", page) and re.search(r"<td>down</td>", page)
    assert 'id="queue-depth"' in page and 'id="oldest-queued"' in page
    assert "dead sends" in page  # the problem line, as `spine-node status` says it
    assert re.search(r"<td>send</td><td>\d+</td><td>down</td>", page)


def test_studies_page_shows_each_images_outcome_score_and_findings(web: Web) -> None:
    page = web.bearer("/studies").text
    stored = {uid: p for uid, p in web.node.store.study_results(INDEX[0]["study_instance_uid"])}
    stored.update(web.node.store.study_results(INDEX[1]["study_instance_uid"]))
    for item in INDEX:
        uid = item["sop_instance_uid"]
        row = re.search(rf'<tr class="image" data-sop="{re.escape(uid)}">(.*?)</tr>', page, re.S)
        assert row, uid
        status = stored[uid]["status"]
        assert f'data-outcome="{status}"' in row.group(1)
        if stored[uid]["score"] is not None:
            assert f"{stored[uid]['score']:.3f}" in row.group(1)
        for finding in stored[uid]["findings"]:
            assert finding["display_label"] in row.group(1)
    ct_row = re.search(rf'data-sop="{re.escape(web.ct_uid)}">(.*?)</tr>', page, re.S)
    assert ct_row and 'data-outcome="ignored"' in ct_row.group(1)
    assert "CT" in ct_row.group(1)  # the reason names the modality out of scope


def test_overlay_thumbnail_is_a_small_png_of_the_secondary_capture(web: Web) -> None:
    from io import BytesIO

    from PIL import Image

    uid = INDEX[1]["sop_instance_uid"]
    r = web.bearer(f"/overlay/{uid}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(BytesIO(r.content))
    assert max(image.size) <= 240 and image.mode in ("RGB", "L")
    assert web.bearer("/overlay/1.2.3.4.png").status_code == 404  # unknown image


def test_patient_names_are_hidden_unless_the_setting_shows_them(web: Web) -> None:
    names = {str(dcmread(SAMPLES / item["file"]).PatientName) for item in INDEX}
    shown = {n.replace("^", " ").strip() for n in names}
    page = web.bearer("/studies").text + web.bearer("/").text
    assert not any(n in page or n.split("^")[0] in page for n in names)
    settings = web.settings.model_copy(
        update={"web": web.settings.web.model_copy(update={"show_patient_names": True,
                                                           "port": 0})})
    server = start_web(settings, create_app(settings, web.node.store))
    try:
        page = httpx.get(f"http://127.0.0.1:{server.port}/studies", timeout=30).text
    finally:
        server.stop()
    assert any(n in page for n in shown)


def test_pages_need_the_token(web: Web) -> None:
    r = web.get("/studies?page=1")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert web.get("/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert web.get(f"/overlay/{INDEX[1]['sop_instance_uid']}.png").status_code == 303
    r = httpx.post(web.base + "/login", data={"token": "wrong", "next": "/"})
    assert r.status_code == 401 and SESSION_COOKIE not in r.cookies
    forged = "9999999999.abcd.0123"
    assert web.get("/", cookies={SESSION_COOKIE: forged}).status_code == 303
    with web.login() as client:
        assert client.get("/").status_code == 200
    # a login never redirects off the server
    r = httpx.post(web.base + "/login", data={"token": TOKEN, "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_feedback_from_the_page_needs_session_and_csrf(web: Web) -> None:
    sop = INDEX[0]["sop_instance_uid"]
    study = INDEX[0]["study_instance_uid"]
    form = {"sop_instance_uid": sop, "verdict": "disagree", "corrected_label": "abnormal",
            "lesion": "Osteophytes", "reader": "RB"}
    log = FeedbackLog(web.node.store)
    before = len(log.entries())
    assert httpx.post(web.base + "/feedback", data=form).status_code == 401
    with web.login() as client, web.login() as other:
        page = client.get(f"/studies/{study}").text
        csrf = csrf_of(page)
        assert client.post("/feedback", data=form).status_code == 403  # no CSRF token
        assert client.post("/feedback", data={**form, CSRF_FIELD: "0" * 64}).status_code == 403
        other_csrf = csrf_of(other.get(f"/studies/{study}").text)
        assert client.post("/feedback", data={**form, CSRF_FIELD: other_csrf}).status_code == 403
        r = client.post("/feedback", data={**form, CSRF_FIELD: csrf},
                        headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert len(log.entries()) == before  # nothing refused was stored
        r = client.post("/feedback", data={**form, CSRF_FIELD: csrf})
        assert r.status_code == 303 and r.headers["location"].startswith(f"/studies/{study}")
        (entry,) = log.entries()[before:]
        assert (entry.verdict.value, entry.corrected_label and entry.corrected_label.value,
                entry.lesion, entry.reader, entry.source.value) == (
            "disagree", "abnormal", "Osteophytes", "RB", "web")
        assert entry.model_status in ("positive", "negative", "not_processed")
        assert "Osteophytes" in client.get(f"/studies/{study}").text
        listed = client.get("/studies").text
        row = re.search(rf'data-sop="{re.escape(sop)}">(.*?)</tr>', listed, re.S)
        assert row and 'data-outcome="disagree"' in row.group(1) and "abnormal" in row.group(1)
        bad = client.post("/feedback", data={**form, "lesion": "Fracture", CSRF_FIELD: csrf})
        assert bad.status_code == 422 and "lesion must be one of" in bad.text
        r = client.post("/feedback", data={**form, "sop_instance_uid": "1.2.3", CSRF_FIELD: csrf})
        assert r.status_code == 404


def test_feedback_by_api_client_with_the_bearer_token(web: Web) -> None:
    sop = INDEX[2]["sop_instance_uid"]
    r = httpx.post(web.base + "/feedback", data={"sop_instance_uid": sop, "verdict": "agree"},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201 and r.json()["verdict"] == "agree"
    assert FeedbackLog(web.node.store).latest([sop])[sop].feedback_id == r.json()["feedback_id"]


def test_replay_of_a_dead_send_from_the_page(web: Web) -> None:
    dead = web.node.store.dead_letters()["sends"]
    assert dead
    send_id = dead[0]["send_id"]
    form = {"what": "sends", "id": str(send_id)}
    with web.login() as client:
        assert client.post("/replay", data=form).status_code == 403  # no CSRF token
        csrf = csrf_of(client.get("/").text)
        r = client.post("/replay", data={**form, CSRF_FIELD: csrf})
        assert r.status_code == 303
        from spine_node.store import Monitor

        assert Monitor(web.node.store).states_of("sends", (send_id,))[send_id] != "dead"
        r = client.post("/replay", data={"what": "sends", "id": "999999", CSRF_FIELD: csrf})
        assert r.status_code == 409


def test_no_endpoint_serves_a_file_outside_the_data_dir(web: Web, tmp_path: Path) -> None:
    data = web.settings.data_dir
    outbox = web.settings.outbox_dir
    with pytest.raises(OutsideDataDir):
        inside(outbox, "../../../etc/passwd", data)
    with pytest.raises(OutsideDataDir):
        inside(outbox, "/etc/passwd", data)
    assert inside(outbox, "ab/../cd.dcm", data) == (outbox / "cd.dcm").resolve()
    for path in ("/overlay/..%2F..%2F..%2Fetc%2Fpasswd.png", "/overlay/%2Fetc%2Fpasswd.png",
                 "/studies/..%2F..%2Fetc%2Fpasswd", "/../../etc/passwd",
                 "/static/../../etc/passwd", "/templates/base.html"):
        r = web.bearer(path)
        assert r.status_code == 404, path
        assert "root:" not in r.text
    # an overlay in the outbox replaced by a symlink to a file outside: refused
    uid = INDEX[2]["sop_instance_uid"]
    objects = web.node.store.result_objects(uid)
    sc = [o for o in objects if (outbox / relative_name(o)).is_file()
          and str(dcmread(outbox / relative_name(o), stop_before_pixels=True).SOPClassUID)
          == "1.2.840.10008.5.1.4.1.1.7"]
    assert sc, objects
    target = outbox / relative_name(sc[0])
    outside = tmp_path / "outside.dcm"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)
    fresh = start_web(web.settings.model_copy(
        update={"web": web.settings.web.model_copy(update={"port": 0})}),
        create_app(web.settings, web.node.store, guard=Guard(TOKEN, 60.0)))
    try:
        r = httpx.get(f"http://127.0.0.1:{fresh.port}/overlay/{uid}.png",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    finally:
        fresh.stop()
    assert r.status_code == 404


def test_feedback_cli_record_list_export(web: Web, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from training.feedback import read_feedback_csv, reference_labels

    sop = INDEX[1]["sop_instance_uid"]
    config = str(web.config)
    assert main(["feedback", "record", sop, "disagree", "--label", "normal", "--reader", "CLI",
                 "--config", config]) == 0
    assert "recorded feedback" in capsys.readouterr().out
    assert main(["feedback", "record", "1.2.3.4", "agree", "--config", config]) == 1
    assert "no image with SOP Instance UID" in capsys.readouterr().err
    assert main(["feedback", "record", sop, "agree", "--label", "normal",
                 "--config", config]) == 2  # a corrected label goes with disagree
    assert main(["feedback", "list", "--json", "--config", config]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(e["sop_instance_uid"] == sop and e["source"] == "cli" for e in listed)
    csv_path = tmp_path / "feedback.csv"
    assert main(["feedback", "export", "--csv", str(csv_path), "--config", config]) == 0
    entries = read_feedback_csv(csv_path)
    assert [e.to_json() for e in entries] == listed
    labels = {lab.sop_instance_uid: lab for lab in reference_labels(entries)}
    assert labels[sop].abnormal is False  # the CLI's disagreement is the last word


def test_non_loopback_address_without_a_token_refuses_to_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = node_settings(tmp_path, web={"bind_address": "0.0.0.0", "port": free_port()})
    with pytest.raises(StartupError, match="no authentication is configured"):
        start_node(settings, ("web",))
    config = write_config(tmp_path / "node.toml", settings)
    assert main(["serve", "--role", "web", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "web.bind_address = '0.0.0.0'" in err and "web.token_file" in err
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    for token_file, reason in ((tmp_path / "missing", "cannot be read"), (short, "at least 16")):
        settings = node_settings(tmp_path, web={"bind_address": "0.0.0.0", "port": free_port(),
                                                "token_file": str(token_file)})
        with pytest.raises(StartupError, match=reason):
            start_node(settings, ("web",))


def test_web_unit_serves_the_page_as_systemd_starts_it(web: Web, tmp_path: Path) -> None:
    """``spine-node-web.service``'s command line and environment (paths mapped) serve the
    same database's page on its own port, and stop cleanly on SIGTERM."""
    import signal
    import subprocess
    import sys

    from tests.test_units_start import SYSTEMD, NotifySocket, _base_env, unit_invocation

    settings = web.settings.model_copy(
        update={"web": web.settings.web.model_copy(update={"port": free_port()})})
    config = write_config(tmp_path / "web.toml", settings)
    cmd, env = unit_invocation(SYSTEMD / "spine-node-web.service", "0", venv=Path(sys.prefix),
                               config=config, state=settings.data_dir)
    assert cmd[-2:] == ["--role", "web"]
    log = tmp_path / "web.log"
    notify = NotifySocket()  # what systemd passes to a Type=notify unit with WatchdogSec=
    env |= {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "2000000"}
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, env={**_base_env(), **env}, stdout=subprocess.DEVNULL,
                                stderr=handle)
    try:
        def page() -> httpx.Response | None:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{settings.web.port}/studies", timeout=5,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
            except httpx.TransportError:
                return None

        r = wait_for(page, timeout=60, interval=0.3)
        assert r.status_code == 200 and INDEX[0]["sop_instance_uid"] in r.text
        # READY=1 once listening (STATUS names the web port), then watchdog pings
        wait_for(lambda: notify.of(proc.pid, "WATCHDOG"), timeout=30, interval=0.2)
        assert notify.of(proc.pid, "READY") == ["1"]
        assert any(f"web on 127.0.0.1:{settings.web.port}" in line
                   for line in notify.of(proc.pid, "STATUS"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        wait_for(lambda: notify.of(proc.pid, "STOPPING"), timeout=10)
        assert notify.of(proc.pid, "STOPPING") == ["1"]
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    family = family.removesuffix("_bucket")
    (value,) = [s.value for s in families[family].samples
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    return float(value)


def test_metrics_scraped_after_c_store(web: Web) -> None:
    from spine_node.metrics import METRIC_NAMES
    from spine_node.models.bundle import load_manifest
    from spine_node.node import demo_bundle_path

    assert web.get("/metrics").status_code == 303  # a token is configured: scrapes need it
    r = web.bearer("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = _families(r.text)  # prometheus_client's own parser
    assert set(families) == {name.removesuffix("_total") for name in METRIC_NAMES}
    n = len(INDEX)
    assert _value(families, "spine_node_instances_received_total", category="image") == n
    assert _value(families, "spine_node_instances_received_total", category="out_of_scope") == 1
    outcomes = {s.labels["outcome"]: s.value for s in families["spine_node_job_outcomes"].samples}
    assert outcomes["positive"] + outcomes["negative"] + outcomes["not_processed"] == n
    assert _value(families, "spine_node_result_latency_seconds_count") == n
    assert _value(families, "spine_node_result_latency_seconds_bucket", le="+Inf") == n
    # each image's objects reached the PACS; the "down" destination failed (kept after replay)
    delivered = _value(families, "spine_node_delivery_latency_seconds_count", destination="pacs")
    assert delivered >= n
    assert _value(families, "spine_node_send_failures_total", destination="down") >= 1
    assert _value(families, "spine_node_send_failures_total", destination="pacs") == 0
    scored = outcomes["positive"] + outcomes["negative"]
    assert _value(families, "spine_node_inference_stage_seconds_count", stage="triage") >= scored
    assert _value(families, "spine_node_inference_stage_seconds_count", stage="results") == n
    assert _value(families, "spine_node_inference_stage_seconds_sum", stage="triage") > 0
    assert _value(families, "spine_node_queue_depth") == 0
    assert _value(families, "spine_node_workers_live") == 1
    assert _value(families, "spine_node_decoder_crashes_total") == 0
    manifest = load_manifest(demo_bundle_path())
    assert _value(families, "spine_node_bundle_info", name=manifest.name,
                  version=manifest.version, demo="true") == 1


def test_health_and_readiness(web: Web) -> None:
    r = web.get("/healthz")  # no token needed: no patient data
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = web.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert set(r.json()["checks"].values()) == {"ok"}
    spool = web.settings.spool_dir
    moved = spool.with_name("spool-moved")
    spool.rename(moved)
    try:
        spool.write_text("not a directory")
        r = web.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        checks = r.json()["checks"]
        assert "spool directory" in checks["spool"] and checks["database"] == "ok"
    finally:
        spool.unlink()
        moved.rename(spool)
    assert web.get("/readyz").status_code == 200


def test_monitoring_page_compares_scores_with_the_bundles_reference(web: Web,
                                                                    tmp_path: Path) -> None:
    import numpy as np

    from spine_node.config import MonitoringSettings
    from spine_node.drift import psi
    from spine_node.monitoring import window_scores
    from spine_node.node import bundle_info, demo_bundle_path
    from training.export import add_score_reference

    r = web.bearer("/monitoring")
    assert r.status_code == 200 and 'href="/monitoring"' in r.text
    assert 'id="positive-chart"' in r.text and 'id="not-processed-chart"' in r.text
    # a copy of the demo bundle with a synthetic reference (uniform validation scores), served
    # by a second app over the same database: the page and the metrics show the same PSI
    bundle = Path(shutil.copytree(demo_bundle_path(), tmp_path / "bundle"))
    reference = add_score_reference(bundle, (np.arange(200) + 0.5) / 200, "synthetic")
    assert reference.score_reference is not None
    settings = web.settings.model_copy(update={
        "bundle": str(bundle),
        "monitoring": MonitoringSettings(min_window_images=1, drift_threshold=0.25),
        "web": web.settings.web.model_copy(update={"port": free_port()}),
    })
    info = bundle_info(str(bundle))
    assert info is not None
    server = start_web(settings, create_app(settings, web.node.store,
                                            guard=Guard(token=TOKEN, max_age_s=600),
                                            bundle_info=info))
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        base = f"http://127.0.0.1:{server.port}"
        # the worker recorded its bundle's version with each result: the window holds them
        scores = window_scores(web.node.store, 0.0, info.version)
        assert len(scores) > 0
        expected = psi(reference.score_reference, scores)
        html = httpx.get(base + "/monitoring", headers=headers, timeout=30).text
        assert f"PSI {expected:.3f} over {len(scores)} images" in html
        assert f"(version {info.version}) count: {len(scores)} of the" in html
        assert html.count("<svg") == 3 and "synthetic (200 images)" in html
        assert ("Score drift:" in html) == (expected > 0.25)
        families = _families(httpx.get(base + "/metrics", headers=headers, timeout=30).text)
        assert _value(families, "spine_node_score_drift_psi") == pytest.approx(expected)
        assert _value(families, "spine_node_score_window_images") == len(scores)
        assert _value(families, "spine_node_score_window_other_bundle_images") == 0
        assert _value(families, "spine_node_score_drift_alert") == float(expected > 0.25)
    finally:
        server.stop()


def test_recent_studies_newest_first_whether_streamed_or_grouped(
        web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    import spine_node.store as store_module

    store = web.node.store
    streamed = store.recent_study_uids(10)
    last_arrival = {}
    for item in store.study_images(streamed):
        uid = item["study_instance_uid"]
        last_arrival[uid] = max(last_arrival.get(uid, 0.0), item["received_at"])
    assert len(streamed) == store.count_studies() == len(INDEX) - 1 + 1  # 2 samples + CT
    assert [last_arrival[u] for u in streamed] == sorted(last_arrival.values(), reverse=True)
    assert store.recent_study_uids(1, offset=1) == streamed[1:2]
    monkeypatch.setattr(store_module, "_STREAMED_STUDIES", 0)
    assert store.recent_study_uids(10) == streamed
    assert store.recent_study_uids(1, offset=1) == streamed[1:2]


def _interleaved_store(tmp: Path) -> Any:
    """A queue of 9 studies whose objects arrive interleaved, some at the same instant."""
    from sqlalchemy import insert

    from spine_node.store import Instance, JobStore

    settings = node_settings(tmp)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore.open(settings.db_url)
    # (study, received_at): study 3's last object comes after study 4's; studies 5 and 6 end
    # at the same instant (order by UID), study 7 has two objects at its last instant
    arrivals = [(0, 10.0), (1, 11.0), (0, 12.0), (2, 13.0), (3, 14.0), (4, 15.0), (3, 16.0),
                (5, 17.0), (6, 17.0), (7, 18.0), (7, 18.0), (8, 19.0), (2, 20.0)]
    rows = [
        {"sop_instance_uid": f"1.2.3.{study}.{n}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
         "study_instance_uid": f"1.2.3.{study}", "series_instance_uid": f"1.2.3.{study}.1",
         "transfer_syntax_uid": "1.2.840.10008.1.2.1", "calling_ae": "MODALITY1",
         "spool_path": f"{n:02x}/{n:064x}.dcm", "size_bytes": 1, "received_at": t, "category": "out_of_scope",
         "category_reason": "test"}
        for n, (study, t) in enumerate(arrivals)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(Instance), rows)
    return settings, store


def test_keyset_pages_keep_the_order_of_the_offset_pages(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import spine_node.store as store_module
    from spine_node.store import StudyCursor

    settings, store = _interleaved_store(tmp_path)
    try:
        monkeypatch.setattr(store_module, "_STREAMED_STUDIES", 0)  # grouped in SQL
        expected = store.recent_study_uids(100)
        monkeypatch.undo()
        assert expected == store.recent_study_uids(100)  # streamed: the same
        assert expected == [f"1.2.3.{n}" for n in (2, 8, 7, 5, 6, 3, 4, 0, 1)]
        whole = store.study_page(100)
        assert [c.study_instance_uid for c in whole] == expected
        assert [c.last_arrival for c in whole] == [20, 19, 18, 17, 17, 16, 15, 12, 11]
        for size in (1, 2, 4):  # page by page, older then newer, from every position
            for i, cursor in enumerate(whole):
                assert store.study_page(size, before=cursor) == whole[i + 1 : i + 1 + size]
                assert store.study_page(size, after=cursor) == whole[max(0, i - size) : i]
        assert StudyCursor.from_text(whole[3].to_text()) == whole[3]
        with pytest.raises(ValueError, match="not a study cursor"):
            StudyCursor.from_text("yesterday")
        with pytest.raises(ValueError, match="not both"):
            store.study_page(2, before=whole[0], after=whole[1])

        # the page: follow "older" to the end, then "newer" back; two studies a page
        web_settings = settings.model_copy(update={"web": settings.web.model_copy(
            update={"recent_studies": 2, "port": free_port()})})
        running = start_web(web_settings, create_app(web_settings, store))
        base = f"http://127.0.0.1:{running.port}"

        def shown(html: str) -> list[str]:
            return re.findall(r'<tr class="study" data-study="([^"]+)">', html)

        def link(html: str, rel: str) -> str | None:
            found = re.search(rf'<a rel="{rel}" href="([^"]+)">', html)
            return found.group(1).replace("&amp;", "&") if found else None

        try:
            path: str | None = "/studies"
            forward: list[list[str]] = []
            while path is not None:
                html = httpx.get(base + path, timeout=30).text
                forward.append(shown(html))
                assert f"Page {len(forward)} of 5" in html
                path = link(html, "next")
            assert [uid for page in forward for uid in page] == expected
            assert link(html, "prev") is not None
            backward = []
            path = link(html, "prev")
            while path is not None:
                html = httpx.get(base + path, timeout=30).text
                backward.append(shown(html))
                path = link(html, "prev")
            assert backward == forward[-2::-1]
            # a bookmark by page number shows the same page
            assert shown(httpx.get(base + "/studies?page=3", timeout=30).text) == forward[2]
            bad = httpx.get(base + "/studies?before=nonsense", timeout=30)
            assert bad.status_code == 422 and "not a study cursor" in bad.text
        finally:
            running.stop()
    finally:
        store.close()


def test_https_with_a_required_client_certificate(web: Web, tmp_path: Path) -> None:
    import ssl

    from spine_node.node import check_web
    from tests.test_tls import _ca, _leaf

    ca = _ca(tmp_path, "ca")
    server_cert = _leaf(tmp_path, "server", ca,
                        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client = _leaf(tmp_path, "client", ca, "extendedKeyUsage=clientAuth\n")
    rogue = _leaf(tmp_path, "rogue", _ca(tmp_path, "rogue-ca"), "extendedKeyUsage=clientAuth\n")
    https = web.settings.web.model_copy(update={
        "port": free_port(), "token_file": None, "certificate": server_cert[0],
        "private_key": server_cert[1], "ca_file": ca[0], "require_client_certificate": True})
    settings = web.settings.model_copy(update={"web": https})
    # a required client certificate is authentication: another address may be bound
    exposed = settings.model_copy(update={"web": https.model_copy(
        update={"bind_address": "0.0.0.0"})})
    assert check_web(exposed) is None
    broken = settings.model_copy(update={"web": https.model_copy(
        update={"certificate": tmp_path / "missing.crt"})})
    with pytest.raises(StartupError, match=r"web.certificate .*missing.crt.* cannot be read"):
        check_web(broken)
    running = start_web(settings, create_app(settings, web.node.store))
    url = f"https://127.0.0.1:{running.port}/studies"

    def context(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    try:
        r = httpx.get(url, verify=context(client), timeout=30)
        assert r.status_code == 200 and INDEX[0]["sop_instance_uid"] in r.text
        for refused in (None, rogue):
            with pytest.raises(httpx.TransportError):
                httpx.get(url, verify=context(refused), timeout=30)
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https:", "http:"), timeout=30)
        # no token: read-only, even for a client with a certificate
        r = httpx.post(url.replace("/studies", "/feedback"), verify=context(client), timeout=30,
                       data={"sop_instance_uid": INDEX[0]["sop_instance_uid"],
                             "verdict": "agree"})
        assert r.status_code == 403 and "web.token_file" in r.text
    finally:
        running.stop()

"""The status page in a real browser: Debian's Chromium, driven by Playwright, against a node
started as ``spine-node serve`` (every role and the page, the demo bundle) that received the
sample studies, a CT and a noise image by DCMTK ``storescu``.

The test logs in with the token, checks the studies and each image's outcome shown against the
database, gives feedback by clicking, checks it landed in the database, and keeps screenshots
(``test-artifacts/web-status.png``, ``web-studies.png``, ``web-study.png``; git-ignored).
Playwright's own browser download is never used: ``executable_path`` is the system Chromium.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spine_node.store import FeedbackLog, JobStore
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

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "spine_node" / "samples"
INDEX = json.loads((SAMPLES / "index.json").read_text())
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/peers installs it)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "browser-test-token-0123456789abcdef"


@dataclass
class Node:
    base: str
    db_url: str
    images: dict[str, str]  # SOP Instance UID -> how it was made (sample, ct, noise)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("browser")
    pacs = StoreSCP(work / "pacs").start()
    token = work / "web-token"
    token.write_text(TOKEN + "\n")
    settings = node_settings(
        work, bundle="demo", device="cpu", web={"port": free_port(), "token_file": str(token)},
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                       "port": pacs.port}],
    )
    config = write_config(work / "node.toml", settings)
    log = work / "node.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "spine_node.cli", "serve", "--config",
                                 str(config)], stdout=subprocess.DEVNULL, stderr=handle)
    try:
        wait_for(lambda: proc.poll() is not None or subprocess.run(
            ["echoscu", "-aec", settings.ae_title, "127.0.0.1", str(settings.port)],
            capture_output=True).returncode == 0, timeout=120)
        assert proc.poll() is None, log.read_text()[-3000:]
        ct, noise = work / "ct.dcm", work / "noise.dcm"
        images = {item["sop_instance_uid"]: "sample" for item in INDEX}
        images[str(make_image(ct, sop_class=CTImageStorage, modality="CT").SOPInstanceUID)] = "ct"
        images[str(make_image(noise, rows=320, cols=256).SOPInstanceUID)] = "noise"
        files = [SAMPLES / item["file"] for item in INDEX] + [ct, noise]
        assert storescu(settings.port, files).returncode == 0
        store = JobStore.open(settings.db_url)
        try:
            wait_for(lambda: sum(store.status()["results"].values()) == len(images) - 1
                     or proc.poll() is not None, timeout=300, interval=0.5)
        finally:
            store.close()
        assert proc.poll() is None, log.read_text()[-3000:]
        yield Node(f"http://127.0.0.1:{settings.web.port}", settings.db_url, images)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        pacs.stop()


def keep(shot: Path) -> Path:
    """Copy a screenshot to the stable, git-ignored ``test-artifacts/`` and say where."""
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / shot.name
    shutil.copy(shot, kept)
    print(f"screenshot: {kept} (and {shot})")
    return kept


def test_status_page_in_chromium_shows_outcomes_and_takes_feedback(
        node: Node, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is not installed (.ci/peers)"
    store = JobStore.open(node.db_url)
    try:
        results = {}
        for item in store.study_images(store.recent_study_uids(100)):
            results[item["sop_instance_uid"]] = item
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(node.base + "/")
                assert "/login" in page.url  # a token is configured: log in first
                page.fill("input[name=token]", "wrong-token-0123456789")
                page.click("button[type=submit]")
                assert page.locator(".problem").inner_text() == "wrong token"
                page.fill("input[name=token]", TOKEN)
                page.click("button[type=submit]")
                page.wait_for_url(node.base + "/")
                assert "spine-node-demo" in page.locator("#bundle").inner_text()
                assert page.locator("#destinations td", has_text="pacs").count() == 1
                shot = tmp_path / "web-status.png"
                page.screenshot(path=str(shot), full_page=True)
                keep(shot)

                page.click("nav >> text=Studies")
                page.wait_for_url(re.compile(r".*/studies$"))
                for uid, item in results.items():
                    row = page.locator(f'tr.image[data-sop="{uid}"]')
                    assert row.count() == 1, uid
                    shown = row.locator("[data-outcome]").get_attribute("data-outcome")
                    expected = item["result"]["status"] if item["result"] else "ignored"
                    assert shown == expected, (uid, node.images[uid])
                    if item["result"] and item["result"]["score"] is not None:
                        assert f"{item['result']['score']:.3f}" in row.inner_text()
                    if item["result"] and item["result"]["reason"]:
                        assert item["result"]["reason"] in row.inner_text()
                ct = next(u for u, kind in node.images.items() if kind == "ct")
                assert "CT" in page.locator(f'tr.image[data-sop="{ct}"]').inner_text()
                ct_study = page.locator("tr.study", has=page.locator(
                    f'a:text("{results[ct]["study_instance_uid"]}")'))
                assert ct_study.locator("[data-outcome]").get_attribute("data-outcome") == "ignored"
                # overlays render as images in the browser (decoded, non-zero size)
                overlays = page.locator("img.thumb")
                assert overlays.count() >= 3
                overlays.first.scroll_into_view_if_needed()
                page.wait_for_function(
                    "() => [...document.querySelectorAll('img.thumb')]"
                    ".every(i => i.complete && i.naturalWidth > 0)", timeout=30000)
                shot = tmp_path / "web-studies.png"
                page.screenshot(path=str(shot), full_page=True)
                keep(shot)

                # feedback: disagree on the normal sample, corrected to abnormal + lesion
                normal = next(i for i in INDEX if not i["abnormal"])
                page.click(f'a:text("{normal["study_instance_uid"]}")')
                row = page.locator(f'tr.image[data-sop="{normal["sop_instance_uid"]}"]')
                row.locator("select[name=corrected_label]").select_option("abnormal")
                row.locator("select[name=lesion]").select_option("Osteophytes")
                row.locator("input[name=reader]").fill("DR")
                row.locator("button[value=disagree]").click()
                page.wait_for_load_state()
                row = page.locator(f'tr.image[data-sop="{normal["sop_instance_uid"]}"]')
                assert "corrected: abnormal" in row.locator(".given").inner_text()
                study_shot = tmp_path / "web-study.png"
                page.screenshot(path=str(study_shot), full_page=True)
                keep(study_shot)
            finally:
                browser.close()
        (entry,) = FeedbackLog(store).entries(sop_instance_uids=[normal["sop_instance_uid"]])
        assert (entry.verdict.value, entry.corrected_label and entry.corrected_label.value,
                entry.lesion, entry.reader, entry.source.value) == (
            "disagree", "abnormal", "Osteophytes", "DR", "web")
        assert entry.model_status == results[normal["sop_instance_uid"]]["result"]["status"]
    finally:
        store.close()

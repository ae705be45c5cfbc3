"""Behaviour with the embedded demo bundle: phantom lesions found where they were drawn,
non-spine radiographs refused with a reason, and ``spine-node demo`` end to end."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from spine_node.demo import sample_files
from spine_node.models.bundle import load_manifest
from spine_node.node import demo_bundle_path
from spine_node.pipeline import Cascade
from spine_node.results.types import Status
from training.model_card import bundle_hash, read_evaluations
from training.phantom import write_phantom_dataset
from training.vindr import load_records

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop

CLI = [sys.executable, "-m", "spine_node.cli"]


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    return Cascade.load(demo_bundle_path(), device="cpu")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_images=24, seed=4242, balanced=True, test_fraction=0.5)
    return root


def test_manifest_is_flagged_demo_and_reports_held_out_figures() -> None:
    manifest = load_manifest(demo_bundle_path())  # verifies every sha256
    assert manifest.demo is True
    assert "not for clinical use" in manifest.intended_use
    size = sum(p.stat().st_size for p in demo_bundle_path().rglob("*") if p.is_file())
    assert size <= 30 * 1024**2
    # fitted the way it serves: the shipped fold-0 models with the served TTA views
    fitted_on = dict(manifest.metrics["ensemble_fit"]["fitted_on"])
    assert fitted_on["kind"] == "served" and fitted_on["tta_views"] == manifest.tta_views
    # its held-out test split was evaluated once, on the node's own output, and recorded
    digest = bundle_hash(demo_bundle_path())
    record, *again = [e for e in read_evaluations(demo_bundle_path()) if e.bundle_hash == digest]
    assert record.split == "test" and record.reason is None  # a first evaluation
    # the same bundle evaluated again on the same split (recorded as such) gave the same figures
    assert all(e.reason == "same bundle" and e.split_hash == record.split_hash
               and dict(e.figures) == dict(record.figures) for e in again)
    figures = dict(record.figures)
    assert figures["threshold"] == manifest.threshold
    assert figures["auroc"] >= 0.95
    assert figures["map50"] >= 0.5
    assert figures["auroc_ci95"][0] <= figures["auroc"] <= figures["auroc_ci95"][1]
    # the README beside it states exactly those figures and the command that made them
    readme = (demo_bundle_path() / "README.md").read_text()
    assert record.command in readme
    assert f"| triage AUROC | {figures['auroc']:.3f} " in readme
    assert f"mAP@0.5 (COCO, maxDets 100) | {figures['map50']:.3f} " in readme


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_phantom_lesions_are_found_where_they_were_drawn(cascade: Cascade, phantom: Path) -> None:
    records = load_records(phantom, "train") + load_records(phantom, "test")
    datasets = [dcmread(r.path) for r in records]
    results = cascade.analyze(datasets)
    labels = np.array([r.abnormal for r in records])
    scores = np.array([res.score if res.score is not None else 0.0 for res in results])
    assert all(res.status is not Status.NOT_PROCESSED for res in results), [
        res.reason for res in results if res.status is Status.NOT_PROCESSED]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, scores) >= 0.9
    drawn = found = 0
    for record, result in zip(records, results, strict=True):
        for box in record.boxes:
            drawn += 1
            gt = (box.xmin, box.ymin, box.xmax, box.ymax)
            if any(f.label == box.label and _iou(f.box, gt) >= 0.3 for f in result.findings):
                found += 1
    assert drawn > 20
    assert found / drawn >= 0.5, f"found {found} of {drawn} drawn lesions"


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KR.dcm"])
def test_real_non_spine_radiographs_are_not_processed(cascade: Cascade, name: str) -> None:
    ds = dcmread(get_testdata_file(name))
    (tagged,) = cascade.analyze([ds])
    assert tagged.status is Status.NOT_PROCESSED
    assert "not spine" in (tagged.reason or "")
    del ds.BodyPartExamined  # a film tagged wrongly (or not at all): the content check decides
    (untagged,) = cascade.analyze([ds])
    assert untagged.status is Status.NOT_PROCESSED
    assert "does not look like a spine radiograph" in (untagged.reason or "")


def test_analyze_uses_the_demo_bundle_by_default(phantom: Path) -> None:
    files = sorted((phantom / "test_images").glob("*.dicom"))[:2]
    chest = get_testdata_file("RG1_UNCR.dcm")
    out = subprocess.run([*CLI, "analyze", *map(str, files), str(chest), "--json"],
                         capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(out.stdout)
    assert [r["file"] for r in rows] == [*map(str, files), str(chest)]
    assert rows[-1]["status"] == "not_processed" and rows[-1]["reason"]
    for row in rows[:2]:
        assert row["status"] in ("positive", "negative")
        assert 0.0 <= row["score"] <= 1.0 and row["threshold"] == pytest.approx(
            float(load_manifest(demo_bundle_path()).threshold))
    # "--bundle demo" names the same embedded bundle, as the bundle setting does
    named = subprocess.run([*CLI, "analyze", str(files[0]), "--json", "--bundle", "demo"],
                           capture_output=True, text=True, timeout=600, check=True)
    assert json.loads(named.stdout)[0]["score"] == pytest.approx(rows[0]["score"])


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "demo", "--out", str(tmp_path), "--studies", "2"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DEMO BUNDLE" in out.stdout
    # the status page's URL comes before the images are sent, on loopback; it closes at the end
    lines = out.stdout.splitlines()
    url = [i for i, line in enumerate(lines)
           if re.match(r"status page: http://127\.0\.0\.1:\d+/ \(open it", line)]
    sent = [i for i, line in enumerate(lines) if line.startswith("sent ")]
    assert url and sent and url[0] < sent[0], out.stdout
    assert "closed with the demo" in lines[-1] and "--keep-open" in lines[-1]
    received = list((tmp_path / "pacs").rglob("*.dcm"))
    srs = [dcmread(p) for p in received if dcmread(p).Modality == "SR"]
    summaries = [d for d in srs if d.SeriesNumber == 9900]  # study summaries, >= 1 per study
    assert len(srs) - len(summaries) == len(sample_files(studies=2))  # one SR per image sent
    assert len({d.StudyInstanceUID for d in summaries}) == 2
    assert any(dcmread(p).Modality == "OT" or dcmread(p).SOPClassUID.endswith(".7")
               for p in received)
    # the demo writes its node's settings, so the CLI can inspect the demo's database
    config = tmp_path / "spine-node.toml"
    (printed,) = re.findall(r"inspect it: (\S+) status --config (\S+)", out.stdout)
    assert printed[1] == str(config)
    # the printed command works as printed (the venv's script: nothing needs activating)
    status = subprocess.run([printed[0], "status", "--config", printed[1], "--json"],
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["jobs"]["done"] == len(sample_files(studies=2))
    worklist = subprocess.run([*CLI, "worklist", "--config", str(config), "--json"],
                              capture_output=True, text=True, timeout=300)
    assert worklist.returncode == 0, worklist.stderr
    assert len(json.loads(worklist.stdout)) == 2
    # a reader that went away (``| head``) gets no traceback: the pipe is closed before the
    # command writes (it takes seconds to start), so its first write meets EPIPE
    proc = subprocess.Popen([*CLI, "worklist", "--config", str(config), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_demo_keeps_its_status_page_open_until_ctrl_c(tmp_path: Path) -> None:
    """``--keep-open``: after the results the page (loopback, no token) shows the studies sent
    until SIGINT, then the demo exits as it does without the option."""
    study_uid = str(dcmread(sample_files(studies=1)[0], stop_before_pixels=True)
                    .StudyInstanceUID)
    proc = subprocess.Popen([*CLI, "demo", "--out", str(tmp_path), "--studies", "1",
                             "--keep-open"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "press Ctrl-C" in line:
                break
        found = re.search(r"status page: (http://127\.0\.0\.1:\d+/) \(the node keeps", seen[-1])
        assert found, "".join(seen)
        page = httpx.get(found.group(1) + "studies", timeout=30)
        assert page.status_code == 200  # no token needed on loopback
        assert study_uid in page.text
        assert 'data-outcome="positive"' in page.text or 'data-outcome="negative"' in page.text
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(seen) + rest
    assert "DEMO BUNDLE" in "".join(seen)


def test_onnx_backend_matches_pytorch_on_the_demo_bundle(cascade: Cascade, phantom: Path) -> None:
    files = sorted((phantom / "test_images").glob("*.dicom"))[:4]
    datasets = [dcmread(f) for f in files]
    onnx = Cascade.load(demo_bundle_path(), device="cpu", backend="onnx")
    for a, b in zip(cascade.analyze(datasets), onnx.analyze(datasets), strict=True):
        assert a.status == b.status
        assert a.score == pytest.approx(b.score, abs=1e-4)
        assert [f.label for f in a.findings] == [f.label for f in b.findings]

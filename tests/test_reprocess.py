"""``spine-node reprocess``: finished images analysed again after a bundle upgrade, their new
result objects delivered; nothing matching exits 1; an image whose source was removed is
reported, not silently dropped."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.node import start_node
from spine_node.store import JobStore
from tests.nodekit import CountingPACS, make_image, node_settings, storescu, wait_for, write_config

pytest_plugins = ("tests.fixtures_models",)

CLI = [sys.executable, "-m", "spine_node.cli"]


def _reprocess(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "reprocess", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _check_amends(outbox: Path, new: set[str], first: set[str]) -> None:
    """The new per-image SR amends the first one (Predecessor Documents Sequence), validly."""
    from spine_node.spool import relative_name

    srs = [dcmread(outbox / relative_name(u)) for u in new]
    (sr,) = [d for d in srs if d.Modality == "SR" and d.SeriesNumber == 9901]
    (item,) = sr.PredecessorDocumentsSequence
    (series,) = item.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID in first and item.StudyInstanceUID == sr.StudyInstanceUID
    verify = subprocess.run(["dciodvfy", str(outbox / relative_name(str(sr.SOPInstanceUID)))],
                            capture_output=True, text=True, timeout=60, check=False)
    errors = [line for line in (verify.stdout + verify.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == [], errors


def _finished(store: JobStore, uid: str) -> bool:
    return store.job_state(uid) in ("done", "not_processed")


def test_reprocess_after_a_bundle_upgrade_sends_new_objects(tmp_path: Path,
                                                            tiny_bundle: Path) -> None:
    upgraded = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle-v2"))
    manifest = json.loads((upgraded / "manifest.json").read_text())
    manifest["version"] = manifest["version"] + "-upgraded"
    (upgraded / "manifest.json").write_text(json.dumps(manifest))
    pacs = CountingPACS().start()
    dest = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    settings = node_settings(tmp_path, bundle=str(tiny_bundle), device="cpu", destinations=dest)
    image = tmp_path / "image.dcm"
    make_image(image, rows=320, cols=256)
    uid = str(dcmread(image).SOPInstanceUID)
    study = str(dcmread(image).StudyInstanceUID)
    try:
        node = start_node(settings)
        try:
            assert storescu(settings.port, [image]).returncode == 0
            wait_for(lambda: _finished(node.store, uid) and len(pacs.received) >= 2, timeout=120)
            wait_for(lambda: node.store.status()["outbound"]["pacs"]["pending"] == 0, timeout=60)
        finally:
            node.stop()
        first = set(pacs.received)

        # the same configuration pointing at the upgraded bundle
        upgraded_settings = settings.model_copy(update={"bundle": str(upgraded)})
        config = write_config(tmp_path / "node.toml", upgraded_settings)
        out = _reprocess(config, "--instance", uid)
        assert out.returncode == 0, out.stderr
        assert "queued 1 finished images again" in out.stdout
        node = start_node(upgraded_settings)
        try:
            wait_for(lambda: set(pacs.received) - first, timeout=120)
            wait_for(lambda: _finished(node.store, uid), timeout=120)

            def sent_all() -> bool:  # every result object of the new run delivered
                sends = node.store.status()["outbound"].get("pacs", {})
                return sends.get("pending", 1) == 0 and sends.get("sending", 1) == 0

            wait_for(sent_all, timeout=120)
            new = set(pacs.received) - first
            results = node.store.study_results(study)
        finally:
            node.stop()
        assert len(new) >= 2  # the image's SR and overlay from the new bundle, new UIDs
        _check_amends(settings.outbox_dir, new, first)
        assert len(results) == 1  # one current result per image, the new bundle's
        sr_classes = [c for c in pacs.classes if c == "1.2.840.10008.5.1.4.1.1.88.33"]
        assert len(sr_classes) >= 2
        assert all(n == 1 for n in (pacs.received.count(u) for u in pacs.received))  # no dups

        # nothing matching: exit 1 with a line saying so
        out = _reprocess(config, "--study", "1.2.3.999")
        assert out.returncode == 1 and "no finished image matches study 1.2.3.999" in out.stderr
        out = _reprocess(config, "--since", "2000-01-01T00:00:00")
        assert out.returncode == 0 and "queued 1 finished images again" in out.stdout
        out = _reprocess(config, "--since", "yesterday")
        assert out.returncode == 2 and "ISO 8601" in out.stderr
    finally:
        pacs.stop()


def test_reprocess_reports_images_whose_source_was_removed(tmp_path: Path) -> None:
    from spine_node.store import InstanceRecord, JobOutcome, Monitor

    store = JobStore.open(f"sqlite:///{tmp_path / 'q.db'}")
    for uid in ("1.2.9.1", "1.2.9.2"):
        store.receive(InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.1", "1.2.9", "1.2.9.0",
                                     "1.2.840.10008.1.2.1", "MOD", f"x/{uid}.dcm", 10))
    for job in store.claim_jobs("w", 60.0, 2, max_attempts=3):
        store.complete_job(job.job_id, "w", JobOutcome("negative", 0.1, None, {}), [])
    removed_id = store.deliverable_spool(older_than=1e12)[0][0]
    store.mark_spool_deleted(removed_id)
    requeued, skipped = Monitor(store).requeue_finished(study_instance_uid="1.2.9")
    assert len(requeued) == 1 and skipped == ["1.2.9.1"]
    assert store.job_state("1.2.9.2") == "queued" and store.job_state("1.2.9.1") == "done"
    assert store.study_results("1.2.9") == [("1.2.9.1", {})]  # the requeued result is gone
    store.close()


def test_resent_image_with_other_content_is_analysed_again(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pacs = CountingPACS().start()
    dest = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    settings = node_settings(tmp_path, bundle=str(tiny_bundle), device="cpu", destinations=dest)
    image = tmp_path / "image.dcm"
    ds = make_image(image, rows=320, cols=256, seed=1)
    uid = str(ds.SOPInstanceUID)
    node = start_node(settings)
    try:
        def settled() -> bool:
            status = node.store.status()
            sends = status["outbound"].get("pacs", {})
            return _finished(node.store, uid) and sends.get("pending", 1) == 0 \
                and sends.get("sending", 1) == 0 and status["summaries_owed"] == 0

        assert storescu(settings.port, [image]).returncode == 0
        wait_for(settled, timeout=120)
        first = set(pacs.received)
        # the same bytes again: a duplicate, nothing new
        assert storescu(settings.port, [image]).returncode == 0
        assert node.store.job_state(uid) in ("done", "not_processed")
        # a corrected image: same SOP Instance UID, other pixels
        make_image(image, rows=320, cols=256, seed=2, sop_uid=uid,
                   study_uid=str(ds.StudyInstanceUID))
        with caplog.at_level(logging.INFO, logger="spine_node.receiver"):
            assert storescu(settings.port, [image]).returncode == 0
        assert any("re-sent" in r.getMessage() and "different content" in r.getMessage()
                   for r in caplog.records)
        new = wait_for(lambda: (set(pacs.received) - first) if settled() else None, timeout=120)
        assert len(new) >= 2  # the corrected image's SR and overlay, with new UIDs
        _check_amends(settings.outbox_dir, new, first)
        assert node.store.status()["instances"] == 1
        assert all(pacs.received.count(u) == 1 for u in pacs.received)  # nothing sent twice
    finally:
        node.stop()
        pacs.stop()

"""The worker against a real queue (SQLite), the tiny bundle's cascade and the real builders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pydicom
import torch
from pydicom import dcmread

from spine_node.node import build_worker, load_cascade, open_store, prepare_data_dir
from spine_node.results.types import ResultRecord, Status
from spine_node.spool import relative_name, write_durable
from spine_node.store import InstanceRecord
from tests.nodekit import make_image, node_settings

pytest_plugins = ("tests.fixtures_models",)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
THRESHOLD = 0.3125


def _receive(store, spool: Path, ds: pydicom.Dataset, source: Path) -> str:  # type: ignore[no-untyped-def]
    uid = str(ds.SOPInstanceUID)
    rel = relative_name(uid)
    write_durable(spool, rel, source.read_bytes())
    store.receive(InstanceRecord(uid, str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                                 str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1", "MODALITY1",
                                 rel, source.stat().st_size))
    return uid


def test_worker_processes_reports_and_queues_sends_in_the_real_store(
    tmp_path: Path, tiny_bundle_copy: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    torch.set_num_threads(1)
    manifest = tiny_bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["triage"]["threshold"] = THRESHOLD  # no library default has it: reports must take the bundle's
    manifest.write_text(json.dumps(data))
    settings = node_settings(
        tmp_path, bundle=str(tiny_bundle_copy), device="cpu", decode_isolation=False,
        job_max_attempts=2, worker_batch_size=2,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
        results={"heatmap": True, "heatmap_method": "layercam"},  # the optional heatmap series
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        spine = dx_dataset(seed=3)
        spine.save_as(tmp_path / "spine.dcm", enforce_file_format=True)
        ct = make_image(tmp_path / "ct.dcm", modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2")
        killer = make_image(tmp_path / "killer.dcm", seed=5)
        # the image whose attempts all killed their worker: claimed twice, never finished
        killer_uid = _receive(store, settings.spool_dir, killer, tmp_path / "killer.dcm")
        for _ in range(settings.job_max_attempts):
            (claim,) = store.claim_jobs("dead-worker", -1.0, 1, settings.job_max_attempts)
            assert claim.sop_instance_uid == killer_uid
        spine_uid = _receive(store, settings.spool_dir, spine, tmp_path / "spine.dcm")
        ct_uid = _receive(store, settings.spool_dir, ct, tmp_path / "ct.dcm")

        worker = build_worker(settings, store, load_cascade(settings))
        claimed = 0
        while (n := worker.run_once()) > 0:
            claimed += n
        assert claimed == 3

        assert store.job_state(spine_uid) == "done"
        assert store.job_state(ct_uid) == "not_processed"
        assert store.job_info(killer_uid) == (
            "not_processed", 3, "worker died during processing 2 times")
        records = {}
        for study in store.studies():
            for uid, payload in study["results"]:
                records[uid] = ResultRecord.from_json(payload)
        assert records[spine_uid].result.status in (Status.POSITIVE, Status.NEGATIVE)
        assert {r.result.threshold for r in records.values()} == {THRESHOLD}
        assert records[ct_uid].result.status is Status.NOT_PROCESSED
        assert records[ct_uid].result.reason
        assert records[killer_uid].result.reason == "worker died during processing 2 times"
        for uid, record in records.items():
            sr = dcmread(settings.outbox_dir / relative_name(record.objects[0]))
            assert sr.SOPClassUID == SR_CLASS, uid
            assert record.study_instance_uid == str(sr.StudyInstanceUID)
        objects = [uid for r in records.values() for uid in r.objects]
        assert all(store.is_own_object(uid) for uid in objects)  # each queued for the PACS
        # plus one study summary SR per study (or more when a study's priority changed)
        assert store.status()["outbound"]["pacs"]["pending"] >= len(objects) + 3
        # the killer's report was made from the header: no overlay of its pixels
        assert len(records[killer_uid].objects) == 1
        # SR, overlay and heatmap for the analysed image; no heatmap where nothing was analysed
        series = [int(dcmread(settings.outbox_dir / relative_name(u)).SeriesNumber)
                  for u in records[spine_uid].objects]
        assert series == [9901, 9902, 9904]
        assert len(records[ct_uid].objects) <= 2
    finally:
        store.close()

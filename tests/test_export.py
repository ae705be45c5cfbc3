"""``spine-node export`` names files from counters, never from a received UID."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.cli import main
from spine_node.export import export_name
from spine_node.node import open_store, prepare_data_dir
from spine_node.results.types import CascadeResult, ResultRecord, Status
from spine_node.spool import relative_name, write_durable
from spine_node.store import InstanceRecord, JobOutcome
from tests.nodekit import make_image, node_settings, write_config

HOSTILE_UID = "../../../escaped/../../x"  # a sender may put anything on the wire


def test_a_uid_with_dot_dot_slash_never_writes_outside_out(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "node")
    prepare_data_dir(settings)
    source = tmp_path / "src.dcm"
    make_image(source, sop_uid="1.2.3.4")
    ds = dcmread(source)
    ds.SOPInstanceUID = HOSTILE_UID  # as received: the export must not trust it
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    rel = relative_name(HOSTILE_UID)
    ds.save_as(settings.spool_dir / "tmp.dcm", enforce_file_format=True)
    write_durable(settings.spool_dir, rel, (settings.spool_dir / "tmp.dcm").read_bytes())
    (settings.spool_dir / "tmp.dcm").unlink()
    store = open_store(settings)
    try:
        store.receive(InstanceRecord(HOSTILE_UID, str(ds.SOPClassUID), "1.2.3", "1.2.3.9",
                                     "1.2.840.10008.1.2.1", "MODALITY1", rel, 100))
        (job,) = store.claim_jobs("w", 60, 1, 3)
        record = ResultRecord("1.2.3", CascadeResult(HOSTILE_UID, Status.NEGATIVE, score=0.1,
                                                      threshold=0.5), ())
        store.complete_job(job.job_id, "w", JobOutcome("negative", 0.1, None, record.to_json()),
                           [])
    finally:
        store.close()
    config = write_config(tmp_path / "node.toml", settings)
    out = tmp_path / "a" / "b" / "c" / "out"  # out/<HOSTILE_UID>.dcm would be tmp_path/x.dcm
    assert main(["export", "--config", str(config), "--out", str(out), "--identified"]) == 0
    written = sorted(p for p in tmp_path.rglob("*.dcm")
                     if settings.data_dir not in p.parents and p != source)
    assert written == [out / "study00001_image00001_image.dcm"]
    assert str(dcmread(written[0]).SOPInstanceUID) == HOSTILE_UID  # content exported as is
    assert not (tmp_path / "x.dcm").exists()


def test_export_names_are_counters_only() -> None:
    assert export_name(2, 3, 0) == "study00002_image00003_image.dcm"
    assert export_name(2, 3, 1) == "study00002_image00003_result1.dcm"
    with pytest.raises(ValueError, match="export numbers"):
        export_name(0, 1, 0)

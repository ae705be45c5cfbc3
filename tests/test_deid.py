"""De-identification (PS3.15 basic profile) of research exports."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

from spine_node.deid import deidentify, uid_mapper
from tests.nodekit import make_image


def test_identifying_attributes_are_removed_and_uids_remapped(tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.InstitutionName = "St Somewhere"
    ds.add_new(0x00091001, "LO", "private secret")
    ds.add_new(0x60003000, "OW", b"\x00\x01")
    original_uid = str(ds.SOPInstanceUID)
    remap = uid_mapper("salt")
    out = deidentify(ds, remap)
    assert out.PatientName == "" and out.PatientID == ""
    assert "InstitutionName" not in out and "PatientAge" not in out
    assert 0x00091001 not in out and 0x60003000 not in out
    assert out.SOPInstanceUID == remap(original_uid) != original_uid
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # well-known UIDs kept
    assert out.PatientIdentityRemoved == "YES"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert uid_mapper("salt")(original_uid) == out.SOPInstanceUID  # consistent
    assert uid_mapper("other")(original_uid) != out.SOPInstanceUID
    path = tmp_path / "d.dcm"
    out.save_as(path)
    text = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True).stdout
    assert "CompressedSamples^CT1" not in text and "St Somewhere" not in text


def test_references_inside_sequences_follow_the_mapping(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.dcm")
    sr = make_image(tmp_path / "b.dcm")
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    ref = Dataset()
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sr.CurrentRequestedProcedureEvidenceSequence = Sequence([ref])
    remap = uid_mapper("k")
    deidentify(src, remap)
    deidentify(sr, remap)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSOPInstanceUID == \
        src.SOPInstanceUID

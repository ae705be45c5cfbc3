"""The demo's sample studies: standard DICOM a newcomer can load into a PACS, shipped inside the
package (``spine_node/samples``), written out by ``spine-node demo --write-samples DIR``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian

from spine_node.demo import sample_files, samples_dir
from tests.nodekit import StoreSCP, storescu

CLI = [sys.executable, "-m", "spine_node.cli"]
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def test_samples_ship_in_the_package_and_stay_small() -> None:
    files = sample_files()
    assert samples_dir().parent.name == "spine_node"
    index = json.loads((samples_dir() / "index.json").read_text())
    assert sorted(e["file"] for e in index) == [p.name for p in files]
    assert {e["abnormal"] for e in index} == {True, False}  # an abnormal and a normal study
    assert sum(p.stat().st_size for p in files) < 1_000_000
    assert len(sample_files(studies=1)) < len(files)


def test_write_samples_gives_standard_dicom_a_pacs_accepts(tmp_path: Path) -> None:
    out_dir = tmp_path / "samples"
    out = subprocess.run([*CLI, "demo", "--write-samples", str(out_dir)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    files = sorted(out_dir.glob("*.dcm"))
    assert [p.name for p in files] == [p.name for p in sample_files()]
    studies = set()
    for path in files:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CR_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert UID(str(ds[keyword].value)).is_valid, (path.name, keyword)
        assert ds.Modality == "CR" and ds.BodyPartExamined == "LSPINE"
        assert str(ds.PatientName).startswith("PHANTOM^") and ds.PatientAge.endswith("Y")
        studies.add(str(ds.StudyInstanceUID))
        verify = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                timeout=60, check=False)
        findings = [line for line in (verify.stdout + verify.stderr).splitlines()
                    if line.startswith(("Error", "Warning"))]
        assert findings == [], (path.name, findings)
    assert len(studies) == 2
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        sent = storescu(pacs.port, files, aec=pacs.aet)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        received = pacs.received()
    finally:
        pacs.stop()
    assert len(received) == len(files)
    assert {str(dcmread(p).SOPInstanceUID) for p in received} == {
        str(dcmread(p).SOPInstanceUID) for p in files}

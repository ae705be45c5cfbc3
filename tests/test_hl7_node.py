"""HL7 to the RIS from a running node: ``spine-node serve`` (demo bundle, SQLite) receives
C-STOREs; python-hl7's MLLP server plays the RIS and answers AE, AR and silence (the send dies),
then, after ``spine-node replay sends``, a wrong control ID and AA; a second image of the study
makes a second message (a correction), accepted at once. Every message is parsed back with the
library and its fields checked against the source, the worklist and the bundle; ``status``,
the worklist and the webhook show the study's RIS state (the webhook is posted again when it
becomes dead, then done).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7  # type: ignore[import-untyped]
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from spine_node.config import Settings
from spine_node.models.bundle import load_manifest
from spine_node.node import demo_bundle_path
from tests.mllp_kit import MllpListener
from tests.nodekit import node_settings, storescu, wait_for, write_config
from tests.test_webhook import HookServer

CLI = [sys.executable, "-m", "spine_node.cli"]
SAMPLES = Path(__file__).resolve().parents[1] / "spine_node" / "samples"
PATIENT_NAME = "O|Brien&Co^Jo~hn"  # DICOM PN: family "O|Brien&Co", given "Jo~hn"
PATIENT_ID = "PID|^~&7"
ACCESSION = "ACC|^&~1"
RECEIVER = "RIS\\X|Y^Z"  # the escape character too (DICOM text cannot hold a backslash)
LEVEL_FLAGS = {"positive": ("Abnormal", "A"), "negative": ("Normal", "N"),
               "not_processed": ("Not processed", "")}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass
class Node:
    settings: Settings
    config: Path
    log: Path
    ris: MllpListener
    hooks: HookServer
    study: str

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args, "--config", str(self.config)], capture_output=True,
                              text=True, timeout=120, check=check)

    def worklist_row(self) -> dict[str, Any]:
        rows = json.loads(self.cli("worklist", "--json").stdout)
        (row,) = [r for r in rows if r["study_instance_uid"] == self.study]
        return dict(row)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json", check=False).stdout))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("hl7")
    ris = MllpListener().start()
    hooks = HookServer(fail_first=0).start()
    settings = node_settings(
        work, bundle="demo", device="cpu", send_max_attempts=3,
        destinations=[
            {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": ris.port,
             "receiving_application": RECEIVER, "receiving_facility": "RAD",
             "processing_id": "T", "message_profile": "SPINE-ORU", "timeout_s": 1.0},
            {"kind": "webhook", "name": "worklist", "url": f"http://127.0.0.1:{hooks.port}/w"},
        ],
    )
    config = write_config(work / "node.toml", settings)
    log = work / "node.log"
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
    try:
        wait_for(lambda: proc.poll() is not None or subprocess.run(
            ["echoscu", "-aec", settings.ae_title, "127.0.0.1", str(settings.port)],
            capture_output=True).returncode == 0, timeout=120)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield Node(settings, config, log, ris, hooks, generate_uid())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        ris.stop()
        hooks.stop()


def _image(node: Node, sample: str, out: Path) -> Path:
    """A demo sample as an image of the node's study, with hostile patient text."""
    ds = dcmread(SAMPLES / sample)
    ds.StudyInstanceUID = node.study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
    ds.save_as(out, enforce_file_format=True)
    return out


def _field(msg: hl7.Message, segment: str, field: int, component: int = 1, nth: int = 1) -> str:
    return str(msg.extract_field(segment, nth, field, 1, component))


def _obx(msg: hl7.Message, code: str, field: int = 5, component: int = 1) -> str:
    n = [_field(msg, "OBX", 3, nth=i) for i in range(1, len(msg.segments("OBX")) + 1)]
    return _field(msg, "OBX", field, component, nth=n.index(code) + 1)


def _check_message(text: str, node: Node, row: dict[str, Any], status: str) -> hl7.Message:
    """Parse a received message and check its fields against the source and the worklist."""
    msg = hl7.parse(text)
    manifest = load_manifest(demo_bundle_path())
    assert [str(s(0)) for s in msg][:4] == ["MSH", "PID", "ORC", "OBR"]
    assert (_field(msg, "MSH", 9), _field(msg, "MSH", 9, 2)) == ("ORU", "R01")
    assert _field(msg, "MSH", 12) == "2.5.1" and _field(msg, "MSH", 11) == "T"
    assert _field(msg, "MSH", 5) == RECEIVER and _field(msg, "MSH", 21) == "SPINE-ORU"
    assert _field(msg, "PID", 3) == PATIENT_ID
    assert (_field(msg, "PID", 5, 1), _field(msg, "PID", 5, 2)) == ("O|Brien&Co", "Jo~hn")
    assert _field(msg, "OBR", 3) == ACCESSION == _field(msg, "ORC", 3)
    assert _field(msg, "OBR", 25) == status
    assert _obx(msg, "110180") == node.study
    text_, flag = LEVEL_FLAGS[row["priority"]]
    assert (_obx(msg, "SN-102", 5, 2), _obx(msg, "SN-102", 8)) == (text_, flag)
    if row["max_score"] is None:
        assert "122157" not in [_field(msg, "OBX", 3, nth=i)
                                for i in range(1, len(msg.segments("OBX")) + 1)]
    else:
        assert float(_obx(msg, "122157")) == pytest.approx(row["max_score"], abs=5e-5)
    assert _obx(msg, "111001") == manifest.name and _obx(msg, "111003") == manifest.version
    assert "DEMO MODEL" in _obx(msg, "121106") and "NOT FOR DIAGNOSTIC USE" in _obx(
        msg, "121106")
    assert _obx(msg, "121071")  # findings in short, or "no findings"
    return msg


def test_ris_gets_each_revision_after_naks_silence_and_replay(node: Node, tmp_path: Path) -> None:
    # revision 1: AE, AR, then silence -> three attempts, dead
    node.ris.add("AE:no order for Jo Brien", "AR", "silence")
    assert storescu(node.settings.port, [_image(node, "study-normal-1.dcm",
                                                tmp_path / "1.dcm")]).returncode == 0
    wait_for(lambda: node.status()["delivery"]["ris"]["studies"]["dead"] == 1, timeout=300)
    status = node.status()
    assert status["delivery"]["ris"]["not_done"] == [
        {"study_instance_uid": node.study, "state": "dead"}]
    (dead,) = [d for d in status["dead"]["sends"] if d["destination"] == "ris"]
    assert dead["kind"] == "hl7" and dead["attempts"] == 3
    assert "no acknowledgment" in dead["error"]
    assert status["exit_code"] & 4  # dead sends wait for an operator
    assert node.ris.answers == ["AE:no order for Jo Brien", "AR", "silence"]
    first = node.ris.messages()
    assert len(first) == 3 and len(set(first)) == 1  # the same stored message each time
    row = node.worklist_row()
    assert row["delivery"] == {"ris": "dead", "commitment": None}
    _check_message(first[0], node, row, "F")
    log = node.log.read_text()
    assert "ACK AE" in log and "ACK AR" in log  # each attempt logged ...
    assert node.study not in log and PATIENT_ID not in log  # ... without the study UID or ID
    assert "Jo Brien" not in log  # nor the RIS's own words (they may name the patient)
    # the webhook said "pending" (posted after the first refusal), then is posted again: dead
    wait_for(lambda: len(node.hooks.received()) == 2, timeout=60)
    assert [h.json()["delivery"] for h in node.hooks.received()] == [
        {"ris": "pending", "commitment": None}, {"ris": "dead", "commitment": None}]

    # replay: a wrong control ID is retried, then AA delivers the same message
    node.ris.add("wrong-id", "AA")
    assert "requeued 1 sends" in node.cli("replay", "sends").stdout
    wait_for(lambda: node.worklist_row()["delivery"]["ris"] == "done", timeout=60)
    assert node.ris.answers[3:] == ["wrong-id", "AA"]
    assert node.ris.messages()[3:] == first[:2]
    assert "acknowledges control ID" in node.log.read_text()
    status = node.status()
    assert status["delivery"]["ris"]["studies"] == {"done": 1, "pending": 0, "dead": 0}
    assert not status["dead"]["sends"]
    wait_for(lambda: len(node.hooks.received()) == 3, timeout=60)
    assert node.hooks.received()[2].json()["delivery"] == {"ris": "done", "commitment": None}
    assert node.hooks.received()[2].json()["revision"] == 1

    # revision 2: a second image changes what the study states -> a correction, ACK AA at once
    assert storescu(node.settings.port, [_image(node, "study-abnormal-1.dcm",
                                                tmp_path / "2.dcm")]).returncode == 0
    wait_for(lambda: len(node.ris.messages()) == 6 and node.worklist_row()["n_images"] == 2
             and node.worklist_row()["delivery"]["ris"] == "done", timeout=300)
    row = node.worklist_row()
    second = _check_message(node.ris.messages()[5], node, row, "C")
    assert _field(second, "MSH", 10) != _field(hl7.parse(first[0]), "MSH", 10)
    wait_for(lambda: len(node.hooks.received()) == 4, timeout=60)
    body = node.hooks.received()[3].json()
    assert body["revision"] == 2 and body["delivery"] == {"ris": "done", "commitment": None}
    out = node.cli("worklist").stdout
    assert any(node.study in line and " done " in line for line in out.splitlines())


def test_ris_told_once_when_the_ai_ignores_a_study(node: Node, tmp_path: Path) -> None:
    """A CT image (outside the intended use) of a new study: one "ignored" message, not two."""
    from tests.nodekit import CTImageStorage, make_image

    study = generate_uid()
    before = len(node.ris.messages())
    done = node.status()["delivery"]["ris"]["studies"]["done"]
    paths = []
    for i in range(2):
        path = tmp_path / f"ct{i}.dcm"
        ds = make_image(path, study_uid=study, sop_class=CTImageStorage, modality="CT", seed=i)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert storescu(node.settings.port, paths[:1]).returncode == 0
    wait_for(lambda: len(node.ris.messages()) == before + 1, timeout=60)
    msg = hl7.parse(node.ris.messages()[before])
    assert _field(msg, "PID", 3) == PATIENT_ID and _field(msg, "OBR", 3) == ACCESSION
    assert (_field(msg, "PID", 5, 1), _field(msg, "PID", 5, 2)) == ("O|Brien&Co", "Jo~hn")
    assert _obx(msg, "SN-102") == "SN-103" and _obx(msg, "SN-102", 5, 2) == "Ignored: not analysed"
    assert _obx(msg, "SN-102", 8) == ""  # no abnormal flag: nothing was analysed
    assert _obx(msg, "121071").startswith("ignored: ")
    assert _obx(msg, "110180") == study
    assert "111001" not in [_field(msg, "OBX", 3, nth=i)  # no model ran
                            for i in range(1, len(msg.segments("OBX")) + 1)]
    wait_for(lambda: node.status()["delivery"]["ris"]["studies"]["done"] == done + 1, timeout=60)
    queued = sum(node.status()["outbound"]["ris"].values())
    assert storescu(node.settings.port, paths[1:]).returncode == 0  # queued, if at all, in the
    assert sum(node.status()["outbound"]["ris"].values()) == queued  # C-STORE: nothing more


def test_worklist_lists_the_studies_the_ai_ignores(node: Node, tmp_path: Path) -> None:
    """A CT image and a text SR, each of a new study, are listed "ignored" with the reason;
    an SR of a study that also has an image (a job) is not, and that study is "analysed"."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian

    from tests.nodekit import CTImageStorage, make_image

    def sr(study: str, path: Path) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BasicTextSRStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.Modality, ds.PatientID = "SR", PATIENT_ID
        ds.save_as(path, enforce_file_format=True)
        return path

    ct_study, sr_study, mixed = generate_uid(), generate_uid(), generate_uid()
    make_image(tmp_path / "ct.dcm", study_uid=ct_study, sop_class=CTImageStorage, modality="CT")
    image = dcmread(SAMPLES / "study-normal-1.dcm")
    image.StudyInstanceUID, image.SeriesInstanceUID = mixed, generate_uid()
    image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    image.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    files = [tmp_path / "ct.dcm", sr(sr_study, tmp_path / "sr.dcm"), tmp_path / "image.dcm",
             sr(mixed, tmp_path / "mixed-sr.dcm")]
    assert storescu(node.settings.port, files).returncode == 0

    def rows() -> dict[str, dict[str, Any]]:
        listed = json.loads(node.cli("worklist", "--json").stdout)
        return {r["study_instance_uid"]: r for r in listed}

    now = rows()
    assert mixed not in now or now[mixed]["outcome"] == "analysed"  # it has a job: not ignored
    ct, text = now[ct_study], now[sr_study]
    assert (ct["outcome"], ct["priority"], ct["max_score"], ct["n_images"]) == (
        "ignored", "ignored", None, 0)
    assert ct["reason"].startswith("out of scope: modality CT is outside the intended use")
    assert (ct["n_out_of_scope"], ct["n_not_image"]) == (1, 0)
    assert (text["outcome"], text["reason"]) == ("ignored", "not an image: Basic Text SR Storage")
    assert (text["n_not_image"], text["n_out_of_scope"]) == (1, 0)
    wait_for(lambda: rows()[ct_study]["delivery"]["ris"] == "done", timeout=60)  # "ignored" ORU

    final = wait_for(lambda: (r := rows()).get(mixed) and r, timeout=300)
    assert (final[mixed]["outcome"], final[mixed]["reason"]) == ("analysed", None)
    assert final[mixed]["n_not_image"] == 1 and final[mixed]["n_images"] == 1
    ranked = sorted(final.values(), key=lambda r: r["rank"])
    outcomes = [r["outcome"] for r in ranked]
    assert outcomes == sorted(outcomes)  # every analysed study before every ignored one
    out = node.cli("worklist").stdout
    line = next(x for x in out.splitlines() if sr_study in x)
    assert " ignored " in line and line.endswith("(not an image: Basic Text SR Storage)")

"""The DICOM edge: negotiation, unknown and non-image classes, intended use, audit, transport.

Real peers on loopback: a running receiver, pynetdicom and DCMTK senders, and the field-case
scripts of ``../shared/field-cases`` (F07, F10, F15) where that folder is present.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom import AE, evt

from spine_node import codecs
from spine_node.audit import AuditLog, Direction
from spine_node.config import Settings
from spine_node.imaging import ImageError, decode
from spine_node.node import RunningNode, start_node
from spine_node.sop_classes import RADIOGRAPH_CLASSES, Category, classify, is_storage_like
from spine_node.spool import relative_name
from spine_node.transport import INCOMING_DIR, IncompatiblePynetdicom, check_pynetdicom
from tests.nodekit import DX_PRESENTATION, free_port, make_image, node_settings, storescu

FIELD_CASES = Path(
    os.environ.get("SPINE_FIELD_CASES", Path(__file__).resolve().parents[2] / "shared/field-cases")
)
needs_field_cases = pytest.mark.skipif(
    not (FIELD_CASES / "_common.py").is_file(), reason=f"no field cases in {FIELD_CASES}"
)
needs_dcmdjpeg = pytest.mark.skipif(codecs.dcmdjpeg_path() is None, reason="no DCMTK dcmdjpeg")
CR = "1.2.840.10008.5.1.4.1.1.1"
PRIVATE = "1.3.46.670589.2.5.1.1"


def _start(tmp_path: Path, **overrides: object) -> tuple[Settings, RunningNode]:
    settings = node_settings(tmp_path, **overrides)
    return settings, start_node(settings, ("receiver",))


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Settings, RunningNode]]:
    settings, node = _start(tmp_path)
    yield settings, node
    node.stop()


def _propose(port: int, plan: list[tuple[str, list[str]]]) -> dict[int, str]:
    """Associate with one context per plan entry; return {index: accepted syntax or 'rejected'}."""
    ae = AE(ae_title="FIELDCASES")
    for sop, syntaxes in plan:
        ae.add_requested_context(sop, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        accepted = {cx.context_id: str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        return {i: accepted.get(2 * i + 1, "rejected") for i in range(len(plan))}
    finally:
        assoc.release()


# ------------------------------------------------------------------------- negotiation


def test_image_syntaxes_rank_uncompressed_then_lossless_then_lossy() -> None:
    ranked = codecs.image_transfer_syntaxes()
    kinds = [0 if ts in codecs.UNCOMPRESSED else 1 if ts in codecs.LOSSLESS else 2 for ts in ranked]
    assert kinds == sorted(kinds) and ranked[0] == ExplicitVRLittleEndian
    assert JPEGLosslessSV1 in ranked and JPEGBaseline8Bit in ranked
    # without dcmdjpeg, 12-bit lossy JPEG is never offered; with it, it is (last)
    assert JPEGExtended12Bit not in codecs.image_transfer_syntaxes(dcmdjpeg="")
    assert codecs.image_transfer_syntaxes(dcmdjpeg="/usr/bin/dcmdjpeg")[-1] == JPEGExtended12Bit


def test_lossless_is_chosen_over_lossy_in_one_context(
    receiver: tuple[Settings, RunningNode],
) -> None:
    settings, _ = receiver
    got = _propose(
        settings.port,
        [
            (DX_PRESENTATION, [JPEGExtended12Bit, JPEGLosslessSV1]),  # lossy offered first
            (CR, [JPEGBaseline8Bit, JPEGLosslessSV1]),
            (CR, [JPEGBaseline8Bit, ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
            (CR, ["1.2.840.10008.1.2.4.100"]),  # MPEG-2: no decoder, never accepted
        ],
    )
    assert got == {
        0: JPEGLosslessSV1,
        1: JPEGLosslessSV1,
        2: ExplicitVRLittleEndian,
        3: "rejected",
    }


@needs_dcmdjpeg
def test_jpeg_extended_accepted_with_dcmdjpeg_and_decoded(
    receiver: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, _ = receiver
    assert _propose(settings.port, [(DX_PRESENTATION, [JPEGExtended12Bit])]) == {
        0: JPEGExtended12Bit
    }
    # the accepted syntax is decodable: the image decodes as DCMTK decodes it
    src = Path(get_testdata_file("JPGExtended.dcm"))
    ds = pydicom.dcmread(src)
    image = decode(ds)
    out = tmp_path / "plain.dcm"
    subprocess.run(["dcmdjpeg", str(src), str(out)], check=True)
    reference = pydicom.dcmread(out).pixel_array
    raw = codecs.decode_jpeg_extended(ds, 0)
    assert raw.shape == reference.shape == (image.rows, image.columns)
    assert np.array_equal(raw, reference) and int(reference.max()) > 0


def test_jpeg_extended_refused_at_negotiation_without_dcmdjpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a PATH without DCMTK: the node must not accept what it could not decode
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    assert codecs.dcmdjpeg_path() is None
    settings, node = _start(tmp_path)
    try:
        got = _propose(
            settings.port,
            [
                (DX_PRESENTATION, [JPEGLosslessSV1, JPEGExtended12Bit]),
                (DX_PRESENTATION, [JPEGExtended12Bit]),
                (DX_PRESENTATION, [ExplicitVRLittleEndian]),
            ],
        )
    finally:
        node.stop()
    assert got == {0: JPEGLosslessSV1, 1: "rejected", 2: ExplicitVRLittleEndian}
    with pytest.raises(ImageError, match="dcmdjpeg is not installed"):
        decode(pydicom.dcmread(get_testdata_file("JPGExtended.dcm")))


@needs_field_cases
def test_field_case_f10_negotiation(receiver: tuple[Settings, RunningNode], tmp_path: Path) -> None:
    settings, node = receiver
    out = _field_case("F10_jpeg_extended_negotiation.py", settings, tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("ctx ")]
    assert "-> JPEG Lossless" in lines[0] and "-> JPEG Lossless" in lines[1]
    assert "-> Explicit VR Little Endian" in lines[3]
    if codecs.dcmdjpeg_path():
        assert "-> JPEG Extended" in lines[2]
        lossy = pydicom.dcmread(tmp_path / "F10" / "F10_jpeg_extended_dx.dcm")
        assert node.store.job_state(str(lossy.SOPInstanceUID)) == "queued"
        assert decode(lossy).rows == int(lossy.Rows)  # decodable, so not "not processed"
    else:
        assert "-> rejected" in lines[2]
    assert out.count("status 0x0000") == (2 if codecs.dcmdjpeg_path() else 1)


# ------------------------------------------------------------------------- classes


def test_classification_by_sop_class() -> None:
    intended = ("CR", "DX")
    not_images = [
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.11.1",  # GSPS
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        PRIVATE,
        "1.2.840.10008.5.1.4.1.1.999.1",  # a storage class newer than our lists
    ]
    for uid in not_images:
        kind = classify(uid, "DX", intended)
        assert kind.category is Category.NOT_IMAGE, uid
    for uid in RADIOGRAPH_CLASSES:
        assert classify(uid, "DX", intended).category is Category.IMAGE
        assert classify(uid, "", intended).category is Category.IMAGE  # VinDr: no Modality
        assert classify(uid, "CT", intended).category is Category.OUT_OF_SCOPE
    ct = classify("1.2.840.10008.5.1.4.1.1.2", "CT", intended)
    assert ct.category is Category.OUT_OF_SCOPE and "modality CT" in str(ct.reason)
    assert classify("1.2.840.10008.5.1.4.1.1.2", "", intended).category is Category.OUT_OF_SCOPE
    assert classify(CR, "RG", ("CR", "DX", "RG")).category is Category.IMAGE
    assert is_storage_like(PRIVATE) and is_storage_like("1.2.840.10008.5.1.4.1.1.999.1")
    assert not is_storage_like("1.2.840.10008.5.1.4.1.2.2.1")  # Q/R FIND is not storage
    assert not is_storage_like("not.a.uid")


def _private_object(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    return ds


def test_unknown_storage_classes_accepted_and_recorded_without_job(
    receiver: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, node = receiver
    image = make_image(tmp_path / "dx.dcm", sop_class=DX_PRESENTATION, modality="DX")
    ae = AE(ae_title="FIELDCASES")
    for uid in (PRIVATE, DX_PRESENTATION, "1.2.840.10008.5.1.4.1.2.2.1"):
        ae.add_requested_context(uid, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        accepted = {
            str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
        # private class: stored, so its syntax is ranked like any object's (uncompressed first)
        assert accepted == {
            PRIVATE: ExplicitVRLittleEndian,
            DX_PRESENTATION: ExplicitVRLittleEndian,
        }
        private = _private_object(PRIVATE)
        assert assoc.send_c_store(private).Status == 0x0000
        assert assoc.send_c_store(image).Status == 0x0000
    finally:
        assoc.release()
    status = node.store.status()
    assert status["categories"] == {"image": 1, "not_image": 1, "out_of_scope": 0}
    assert status["jobs"]["queued"] == 1
    assert node.store.job_state(str(private.SOPInstanceUID)) is None  # no job
    assert (settings.spool_dir / relative_name(str(private.SOPInstanceUID))).is_file()


def test_unknown_classes_rejected_when_the_setting_is_off(tmp_path: Path) -> None:
    settings, node = _start(tmp_path, accept_unknown_sop_classes=False)
    try:
        got = _propose(
            settings.port,
            [(PRIVATE, [ExplicitVRLittleEndian]), (DX_PRESENTATION, [ExplicitVRLittleEndian])],
        )
    finally:
        node.stop()
    assert got == {0: "rejected", 1: ExplicitVRLittleEndian}


@needs_field_cases
def test_field_case_f15_private_classes(
    receiver: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, node = receiver
    out = _field_case("F15_private_sop_class_in_association.py", settings, tmp_path)
    assert "REJECTED" not in out and out.count("status 0x0000") == 3, out
    status = node.store.status()
    assert status["categories"]["not_image"] == 2 and status["categories"]["image"] == 1
    assert status["jobs"]["queued"] == 1


@needs_field_cases
def test_field_case_f07_non_images_recorded_without_jobs(
    receiver: tuple[Settings, RunningNode], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, node = receiver
    files = tmp_path / "F07"
    subprocess.run(
        [sys.executable, str(FIELD_CASES / "F07_study_with_non_images.py"), str(files)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    paths = sorted(files.glob("F07_*.dcm"))
    assert len(paths) == 4
    out = storescu(settings.port, paths)
    assert out.returncode == 0, out.stdout + out.stderr
    status = node.store.status()
    assert status["categories"] == {"image": 1, "not_image": 3, "out_of_scope": 0}
    assert status["jobs"]["queued"] == 1
    image = pydicom.dcmread(files / "F07_1_dx_ap.dcm", stop_before_pixels=True)
    assert node.store.job_state(str(image.SOPInstanceUID)) == "queued"
    for name in ("F07_2_rdsr.dcm", "F07_3_gsps.dcm", "F07_4_ko.dcm"):
        other = pydicom.dcmread(files / name, stop_before_pixels=True)
        assert node.store.job_state(str(other.SOPInstanceUID)) is None, name
    # what an administrator sees
    from spine_node.cli import main
    from tests.nodekit import write_config

    config = write_config(tmp_path / "node.toml", settings)
    main(["status", "--config", str(config)])
    table = capsys.readouterr().out
    assert "ignored: not an image 3" in table and "out of scope          0" in table


def _field_case(script: str, settings: Settings, tmp_path: Path) -> str:
    out = subprocess.run(
        [
            sys.executable,
            str(FIELD_CASES / script),
            "127.0.0.1",
            str(settings.port),
            settings.ae_title,
            str(tmp_path / script[:3]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# ------------------------------------------------------------------------- intended use


def test_out_of_scope_modality_recorded_and_reported_only_on_request(tmp_path: Path) -> None:
    ct = Path(get_testdata_file("CT_small.dcm"))
    mg = make_image(tmp_path / "mg.dcm", modality="MG")
    for report in (False, True):
        settings, node = _start(tmp_path / str(report), report_out_of_scope=report)
        try:
            out = storescu(settings.port, [ct, tmp_path / "mg.dcm"])
            assert out.returncode == 0, out.stdout + out.stderr
            status = node.store.status()
        finally:
            node.stop()
        assert status["categories"]["out_of_scope"] == 2
        assert status["jobs"]["queued"] == (2 if report else 0)
    assert str(mg.Modality) == "MG"


# ------------------------------------------------------------------------- logs and audit


def test_refused_association_is_logged_with_peer_aes_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, node = _start(tmp_path, allowed_calling_aes=["MODALITY1"])
    caplog.set_level(logging.INFO, logger="spine_node.receiver")
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CR, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
        assert assoc.is_rejected
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(CR, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="OTHERNODE")
        assert assoc.is_rejected
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1", [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
        assert assoc.is_established
        assoc.release()
    finally:
        node.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    calling = [line for line in lines if "calling AE 'INTRUDER'" in line]
    assert calling and "127.0.0.1:" in calling[0]
    assert "called AE 'SPINENODE'" in calling[0] and "calling AE title not recognised" in calling[0]
    called = [line for line in lines if "called AE 'OTHERNODE'" in line]
    assert called and "called AE title not recognised" in called[0]
    context = [line for line in lines if "presentation context refused" in line]
    assert context and "1.2.840.10008.5.1.4.1.2.2.1" in context[0]
    assert "abstract syntax (SOP class) not supported" in context[0]


def test_audit_trail_records_every_object_received(
    receiver: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, _ = receiver
    image = make_image(tmp_path / "a.dcm")
    ct = Path(get_testdata_file("CT_small.dcm"))
    out = storescu(settings.port, [tmp_path / "a.dcm", tmp_path / "a.dcm", ct])
    assert out.returncode == 0, out.stdout + out.stderr
    records = AuditLog(settings.audit_path).read()
    assert [r.outcome for r in records] == ["stored", "duplicate", "stored"]
    first = records[0]
    assert first.direction is Direction.RECEIVED and first.peer.startswith("127.0.0.1:")
    assert first.sop_instance_uid == str(image.SOPInstanceUID)
    assert first.study_instance_uid == str(image.StudyInstanceUID)
    assert first.sop_class_uid == CR and first.called_ae == "SPINENODE"
    assert "out of scope" in records[2].detail
    for line in settings.audit_path.read_text().splitlines():
        assert "Test^Secret" not in line and "SECRET-ID" not in line  # no demographics
        assert json.loads(line)["time"].endswith("+00:00")


def test_receiver_outcome_lines_carry_structured_fields(
    receiver: tuple[Settings, RunningNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = receiver
    caplog.set_level(logging.INFO, logger="spine_node.receiver")
    image = make_image(tmp_path / "b.dcm")
    ct = Path(get_testdata_file("CT_small.dcm"))
    out = storescu(settings.port, [tmp_path / "b.dcm", tmp_path / "b.dcm", ct])
    assert out.returncode == 0, out.stdout + out.stderr
    by_uid: dict[str, list[logging.LogRecord]] = {}
    for record in caplog.records:
        uid = getattr(record, "sop_instance_uid", None)
        if uid is not None:
            by_uid.setdefault(str(uid), []).append(record)
    queued, duplicate = by_uid[str(image.SOPInstanceUID)]
    assert "queued" in queued.getMessage() and isinstance(getattr(queued, "job_id", None), int)
    assert getattr(queued, "study_instance_uid", None) == str(image.StudyInstanceUID)
    assert "already received" in duplicate.getMessage()
    (ignored,) = by_uid[str(pydicom.dcmread(ct).SOPInstanceUID)]
    assert "no job" in ignored.getMessage()
    assert getattr(ignored, "study_instance_uid", None) == str(pydicom.dcmread(ct).StudyInstanceUID)


# ------------------------------------------------------------------------- transport


def test_pynetdicom_check_passes_here_and_names_an_other_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_pynetdicom()
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(IncompatiblePynetdicom, match=r"pynetdicom 3\.1\.0 .*3\.0\.x"):
        check_pynetdicom()


def test_another_ae_in_the_process_does_not_stream_into_the_spool(
    receiver: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, node = receiver
    seen: list[tuple[object, int]] = []

    def on_store(event: evt.Event) -> int:
        seen.append(
            (getattr(event.request, "_dataset_path", None), len(event.request.DataSet.getvalue()))
        )
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(CR, [ExplicitVRLittleEndian])
    port = free_port()
    server = pacs.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        image = make_image(tmp_path / "a.dcm", rows=512, cols=512)
        incoming = settings.spool_dir / INCOMING_DIR
        for target in (port, settings.port):
            ae = AE(ae_title="MODALITY1")
            ae.add_requested_context(CR, [ExplicitVRLittleEndian])
            called = "PACS" if target == port else "SPINENODE"
            assoc = ae.associate("127.0.0.1", target, ae_title=called)
            assert assoc.is_established
            assert assoc.send_c_store(image).Status == 0x0000
            assoc.release()
    finally:
        server.shutdown()
    # the stand-in received the dataset in memory (pynetdicom's default), not via our spool
    assert seen and seen[0][0] is None and seen[0][1] > 512 * 512 * 2
    assert list(incoming.iterdir()) == []
    stored = settings.spool_dir / relative_name(str(image.SOPInstanceUID))
    assert stored.is_file() and node.store.status()["instances"] == 1
    assert pydicom.dcmread(stored).PixelData == image.PixelData


def test_audit_trail_records_every_object_sent(tmp_path: Path) -> None:
    import random

    from spine_node.dispatcher import Dispatcher, dispatch_settings
    from spine_node.node import open_store, prepare_data_dir
    from spine_node.spool import write_durable
    from spine_node.store import DestinationKind, SendSpec
    from tests.nodekit import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs", port=free_port())
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    ds = make_image(tmp_path / "r.dcm")
    uid = str(ds.SOPInstanceUID)
    write_durable(settings.outbox_dir, relative_name(uid), (tmp_path / "r.dcm").read_bytes())
    store.add_sends([SendSpec("pacs", DestinationKind.DICOM, uid, relative_name(uid))])
    dispatcher = Dispatcher(
        store,
        settings.destinations,
        settings.outbox_dir,
        dispatch_settings(settings),
        random.Random(0),
        audit=AuditLog(settings.audit_path),
    )
    pacs.start()
    try:
        assert dispatcher.run_once() == 1
    finally:
        pacs.stop()
        store.close()
    [record] = AuditLog(settings.audit_path).read()
    assert record.direction is Direction.SENT and record.outcome == "sent"
    assert record.detail == "0x0000" and record.peer == f"127.0.0.1:{pacs.port}"
    assert (record.calling_ae, record.called_ae) == ("SPINENODE", "PACS")
    assert record.sop_instance_uid == uid and record.sop_class_uid == CR
    assert record.study_instance_uid == str(ds.StudyInstanceUID)


def test_serve_stops_with_one_line_when_pynetdicom_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spine_node.cli import main
    from tests.nodekit import write_config

    settings = node_settings(tmp_path)
    config = write_config(tmp_path / "node.toml", settings)
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert main(["serve", "--role", "receiver", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pynetdicom 3.1.0 is not supported" in err[0]
    assert not settings.audit_path.exists() and not settings.spool_dir.exists()

"""The HL7 ORU^R01 (built, then parsed back with python-hl7) and MLLP delivery against the
library's own MLLP server answering AA, AE, AR, silence, a wrong control ID and CA."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import hl7  # type: ignore[import-untyped]
import pytest
from pydicom import Dataset

from spine_node.mllp import Hl7DeliveryError, send_message
from spine_node.oru import Hl7Header, StudyIdentity, build_oru, control_id
from spine_node.results.priority import study_priority
from spine_node.results.reference import reference_dataset
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status
from tests.mllp_kit import MllpListener
from tests.nodekit import free_port

HOSTILE = "O|Brien^&~\\x"  # every HL7 delimiter and the escape character
NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def _field(msg: hl7.Message, segment: str, field: int, component: int = 1, nth: int = 1) -> str:
    """One component of a field of the ``nth`` segment of that name, unescaped (python-hl7)."""
    return str(msg.extract_field(segment, nth, field, 1, component))


def _obx(msg: hl7.Message) -> dict[str, int]:
    """OBX-3 identifier -> which OBX it is (1-based), for ``_field(..., nth=...)``."""
    return {_field(msg, "OBX", 3, nth=n): n for n in range(1, len(msg.segments("OBX")) + 1)}


def _source() -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.PatientName = "Smith|Jones&Co^Jo~hn^Q^Dr^Jr"
    ds.PatientID = "ID|^~&42"
    ds.IssuerOfPatientID = "HOSP&1"
    ds.AccessionNumber = "ACC^&|~7"
    ds.PatientSex = "F"
    ds.PatientBirthDate = "19700102"
    return ds


def _positive() -> CascadeResult:
    return CascadeResult(
        "1.2.826.0.1.3680043.8.498.1", Status.POSITIVE, score=0.91, threshold=0.478,
        findings=(Finding("Osteophytes", 0.8, (1, 1, 5, 5)),
                  Finding("Spondylolysthesis", 0.6, (2, 2, 9, 9), grade="I")),
    )


def test_oru_fields_survive_hostile_text() -> None:
    ds = _source()
    result = _positive()
    priority = study_priority([(result.sop_instance_uid, result)])
    header = Hl7Header(HOSTILE, "FAC", "RIS", "HOSP", "T", "PROFILE|1")
    identity = StudyIdentity.of(HOSTILE, reference_dataset(ds))
    model = ModelInfo(HOSTILE, "1.0|b", demo=True)
    ctrl = control_id("ris", "1.2.3")
    text = build_oru(header, identity, priority, [result], model, revision=1,
                     message_control_id=ctrl, now=NOW)
    msg = hl7.parse(text)
    assert [str(s(0)) for s in msg] == ["MSH", "PID", "ORC", "OBR", *["OBX"] * 7]
    assert _field(msg, "MSH", 3) == HOSTILE
    assert (_field(msg, "MSH", 9), _field(msg, "MSH", 9, 2)) == ("ORU", "R01")
    assert _field(msg, "MSH", 10) == ctrl and len(ctrl) == 20
    assert _field(msg, "MSH", 11) == "T" and _field(msg, "MSH", 12) == "2.5.1"
    assert _field(msg, "MSH", 21) == "PROFILE|1"
    assert _field(msg, "PID", 3) == "ID|^~&42"
    assert _field(msg, "PID", 3, 4) == "HOSP&1"
    assert [_field(msg, "PID", 5, c) for c in range(1, 6)] == [
        "Smith|Jones&Co", "Jo~hn", "Q", "Jr", "Dr"]  # XPN: suffix before prefix
    assert _field(msg, "PID", 7) == "19700102" and _field(msg, "PID", 8) == "F"
    assert _field(msg, "ORC", 1) == "RE" and _field(msg, "ORC", 3) == "ACC^&|~7"
    assert _field(msg, "OBR", 3) == "ACC^&|~7" and _field(msg, "OBR", 18) == "ACC^&|~7"
    assert _field(msg, "OBR", 4) == "SN-100" and _field(msg, "OBR", 25) == "F"
    obx = _obx(msg)
    def value(code: str, field: int = 5, component: int = 1) -> str:
        return _field(msg, "OBX", field, component, nth=obx[code])

    assert value("SN-102", 2) == "CWE" and value("SN-102", 5, 2) == "Abnormal"
    assert value("SN-102", 8) == "A"
    assert value("122157", 2) == "NM" and float(value("122157")) == pytest.approx(0.91)
    assert value("121071") == "Osteophytes 0.80; Spondylolisthesis 0.60"
    assert value("111001") == HOSTILE and value("111003") == "1.0|b"
    assert value("110180") == HOSTILE
    assert "NOT FOR DIAGNOSTIC USE" in value("121106") and "DEMO MODEL" in value("121106")
    assert all(value(code, 11) == "F" for code in obx)


@pytest.mark.parametrize(
    ("result", "text", "flag"),
    [
        (CascadeResult("1.2.3.4", Status.NEGATIVE, score=0.1, threshold=0.478), "Normal", "N"),
        (CascadeResult("1.2.3.4", Status.NOT_PROCESSED, reason="not a | spine", threshold=None),
         "Not processed", ""),
    ],
)
def test_oru_levels_and_corrections(result: CascadeResult, text: str, flag: str) -> None:
    ds = _source()
    priority = study_priority([(result.sop_instance_uid, result)])
    msg = hl7.parse(build_oru(
        Hl7Header("A", "B", "C", "D"), StudyIdentity.of("1.2.3", reference_dataset(ds)),
        priority, [result], ModelInfo("m", "1"), revision=2, message_control_id="X1", now=NOW))
    obx = _obx(msg)

    def value(code: str, field: int = 5, component: int = 1) -> str:
        return _field(msg, "OBX", field, component, nth=obx[code])

    assert value("SN-102", 5, 2) == text and value("SN-102", 8) == flag
    assert ("122157" in obx) == (result.score is not None)  # no score: no NM observation
    assert _field(msg, "OBR", 25) == "C" and value("SN-102", 11) == "C"  # a correction
    assert "DEMO MODEL" not in value("121106")
    if result.reason:
        assert value("121071") == "not processed: not a | spine"


def test_oru_rejects_bad_arguments() -> None:
    result = _positive()
    priority = study_priority([(result.sop_instance_uid, result)])
    args = (Hl7Header("A", "", "", ""), StudyIdentity("1.2.3"), priority, [result],
            ModelInfo("m", "1"))
    with pytest.raises(ValueError, match="timezone"):
        build_oru(*args, revision=1, message_control_id="X", now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="message_control_id"):
        build_oru(*args, revision=1, message_control_id="X" * 21, now=NOW)
    with pytest.raises(ValueError, match="revision"):
        build_oru(*args, revision=0, message_control_id="X", now=NOW)
    with pytest.raises(ValueError, match="processing_id"):
        Hl7Header("A", "", "", "", "X")


@pytest.fixture
def listener() -> Iterator[MllpListener]:
    server = MllpListener(["AA", "AE", "AR", "silence", "wrong-id", "CA"]).start()
    yield server
    server.stop()


def test_send_message_judges_acknowledgments(listener: MllpListener) -> None:
    result = _positive()
    priority = study_priority([(result.sop_instance_uid, result)])
    message = build_oru(Hl7Header("A", "", "", ""), StudyIdentity("1.2.3"), priority, [result],
                        ModelInfo("m", "1"), revision=1, message_control_id="CTRL7", now=NOW)
    ack = send_message("127.0.0.1", listener.port, message, timeout_s=5)
    assert (ack.code, ack.control_id) == ("AA", "CTRL7")
    for expected in ("ACK AE", "ACK AR", "no acknowledgment", "acknowledges control ID"):
        with pytest.raises(Hl7DeliveryError, match=expected):
            send_message("127.0.0.1", listener.port, message,
                         timeout_s=1 if expected == "no acknowledgment" else 5)
    assert send_message("127.0.0.1", listener.port, message, timeout_s=5).code == "CA"
    assert listener.messages() == [message] * 6  # each one arrived whole, as built
    with pytest.raises(Hl7DeliveryError, match="no MLLP connection"):
        send_message("127.0.0.1", free_port(), message, timeout_s=5)

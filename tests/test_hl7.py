"""The HL7 ORU^R01 (built, then parsed back with python-hl7) and MLLP delivery against the
library's own MLLP server answering AA, AE, AR, silence, a wrong control ID and CA."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import hl7  # type: ignore[import-untyped]
import pytest
from pydicom import Dataset

from spine_node.mllp import Hl7DeliveryError, send_message
from spine_node.oru import (
    _ENCODING,
    CODECS,
    CharacterSet,
    Hl7Header,
    StudyIdentity,
    build_oru,
    control_id,
    escape,
)
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
    server = MllpListener(["AA", "AE:unknown patient", "AR", "silence", "wrong-id", "garbage",
                           "unframed", "CA"]).start()
    yield server
    server.stop()


def test_send_message_judges_acknowledgments(listener: MllpListener) -> None:
    result = _positive()
    priority = study_priority([(result.sop_instance_uid, result)])
    message = build_oru(Hl7Header("A", "", "", ""), StudyIdentity("1.2.3"), priority, [result],
                        ModelInfo("m", "1"), revision=1, message_control_id="CTRL7", now=NOW)
    ack = send_message("127.0.0.1", listener.port, message, timeout_s=5)
    assert (ack.code, ack.control_id) == ("AA", "CTRL7")
    with pytest.raises(Hl7DeliveryError, match="ACK AE") as refused:
        send_message("127.0.0.1", listener.port, message, timeout_s=5)
    assert refused.value.detail == "unknown patient" and "unknown" not in str(refused.value)
    for expected in ("ACK AR", "no acknowledgment", "acknowledges control ID",
                     "not an HL7 message", "not an HL7 message"):
        with pytest.raises(Hl7DeliveryError, match=expected):
            send_message("127.0.0.1", listener.port, message,
                         timeout_s=1 if expected == "no acknowledgment" else 5)
    assert send_message("127.0.0.1", listener.port, message, timeout_s=5).code == "CA"
    assert listener.messages() == [message] * 8  # each one arrived whole, as built
    with pytest.raises(Hl7DeliveryError, match="no MLLP connection"):
        send_message("127.0.0.1", free_port(), message, timeout_s=5)


def test_an_older_revision_never_reaches_the_ris_after_a_newer_one(
    tmp_path: Path, listener: MllpListener
) -> None:
    """Revision 1 dies (AE, AR), revision 2 is accepted; a replayed revision 1 is not sent; in
    one sweep holding both revisions of another study only the newer one is sent."""
    from spine_node.dispatcher import Dispatcher, dispatch_settings
    from spine_node.node import open_store, prepare_data_dir
    from spine_node.spool import relative_name, write_durable
    from spine_node.store import DestinationKind, Monitor, SendSpec
    from tests.nodekit import node_settings

    listener.script[:] = ["AE", "AR"]
    settings = node_settings(tmp_path, send_max_attempts=2, send_backoff_base_s=0.01,
                             send_backoff_max_s=0.01, send_backoff_jitter=0.0, destinations=[
                                 {"kind": "hl7", "name": "ris", "host": "127.0.0.1",
                                  "port": listener.port, "timeout_s": 5}])
    prepare_data_dir(settings)
    store = open_store(settings)
    result = _positive()
    priority = study_priority([(result.sop_instance_uid, result)])

    def queue(study: str, revision: int) -> str:
        message = build_oru(Hl7Header("A", "", "", ""), StudyIdentity(study), priority, [result],
                            ModelInfo("m", "1"), revision=revision,
                            message_control_id=f"C{study[-1]}{revision}", now=NOW)
        rel = relative_name(f"{study}:{revision}", ".hl7")
        write_durable(settings.outbox_dir, rel, message.encode("ascii"))
        store.add_sends([SendSpec("ris", DestinationKind.HL7, f"hl7:{study}:{revision}", rel,
                                  study)])
        return message

    try:
        dispatcher = Dispatcher(store, settings.destinations, settings.outbox_dir,
                                dispatch_settings(settings), random.Random(0))
        first = queue("1.2.3.1", 1)
        monitor = Monitor(store)

        def drain() -> None:
            for _ in range(100):
                if not dispatcher.run_once() and not store.status()["outbound"]["ris"]["pending"]:
                    return
                time.sleep(0.02)

        drain()
        assert store.status()["outbound"]["ris"]["dead"] == 1
        assert monitor.study_delivery(["1.2.3.1"]) == {"1.2.3.1": {"ris": "dead", "commitment": None}}
        second = queue("1.2.3.1", 2)
        drain()
        assert listener.messages() == [first, first, second]
        assert monitor.study_delivery(["1.2.3.1"]) == {"1.2.3.1": {"ris": "done", "commitment": None}}
        assert store.replay("sends") == 1
        drain()
        assert listener.messages() == [first, first, second]  # revision 1 was not sent again
        counts = store.status()["outbound"]["ris"]
        assert (counts["sent"], counts["superseded"], counts["dead"]) == (1, 1, 0)
        assert store.dead_letters()["sends"] == []

        queue("1.2.3.2", 1)
        newest = queue("1.2.3.2", 2)
        drain()  # both due in one sweep: only revision 2 goes
        assert listener.messages()[3:] == [newest]
        assert store.status()["outbound"]["ris"]["superseded"] == 2
    finally:
        store.close()


def test_ignored_study_message() -> None:
    from spine_node.oru import build_ignored_oru

    msg = hl7.parse(build_ignored_oru(
        Hl7Header("A", "", "", ""), StudyIdentity.of("1.2.3", reference_dataset(_source())),
        "out of scope: modality CT | not CR/DX", message_control_id="IGN1", now=NOW))
    obx = _obx(msg)
    assert list(obx) == ["SN-102", "121071", "110180", "121106"]  # no score, no model
    assert _field(msg, "OBX", 5, 1, nth=1) == "SN-103" and _field(msg, "OBX", 8, nth=1) == ""
    assert _field(msg, "OBX", 5, nth=2) == "ignored: out of scope: modality CT | not CR/DX"
    assert _field(msg, "PID", 3) == "ID|^~&42" and _field(msg, "OBR", 25) == "F"


# Names as the source DICOM holds them (F12: ISO 2022 Korean and Japanese; German in Latin-1).
NAMES = {
    "german": ("ISO_IR 100", "Müller-Groß^Jörg^Ätzel"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    "japanese": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
}


@pytest.fixture(scope="module")
def ris() -> Iterator[MllpListener]:
    server = MllpListener().start()
    yield server
    server.stop()


@pytest.mark.parametrize("charset", list(CharacterSet))
@pytest.mark.parametrize("case", sorted(NAMES))
def test_names_cross_in_the_destinations_character_set(
    case: str, charset: CharacterSet, ris: MllpListener, tmp_path: Path
) -> None:
    """The name read from the source (ISO 2022 on disk) reaches the RIS in MSH-18's character
    set: UTF-8 bytes with every group as a PID-5 repetition, or ASCII transliterated; parsed
    back with python-hl7 from the bytes the MLLP listener received."""
    from pydicom.valuerep import PersonName

    from tests.results_kit import dx_source, write_and_read

    dicom_charset, name = NAMES[case]
    source = dx_source(charset=dicom_charset)
    source.PatientName = name
    source = write_and_read(source, tmp_path / "source.dcm")
    if case != "german":
        assert b"\x1b" in (tmp_path / "source.dcm").read_bytes()  # ISO 2022 escapes on disk
    result = _positive()
    header = Hl7Header("SPINENODE", "", "RIS", "", charset=charset)
    text = build_oru(header, StudyIdentity.of("1.2.3", reference_dataset(source)),
                     study_priority([(result.sop_instance_uid, result)]), [result],
                     ModelInfo("m", "1"), revision=1, message_control_id="CS1", now=NOW)
    send_message("127.0.0.1", ris.port, text, timeout_s=5)
    raw = ris.raw()[-1]
    msg = hl7.parse(raw, encoding=CODECS[charset.msh18])
    assert _field(msg, "MSH", 18) == ("" if charset is CharacterSet.ASCII else "UNICODE UTF-8")
    repetitions = str(msg.segment("PID")(5)).count("~") + 1
    groups = PersonName(name).components
    if charset is CharacterSet.UTF8:
        assert raw.decode("utf-8") == text  # the wire holds the UTF-8 bytes of the message
        assert repetitions == len(groups)
        for rep, (group, code) in enumerate(zip(map(PersonName, groups), "AIP"[: len(groups)], strict=True), start=1):
            assert str(msg.extract_field("PID", 1, 5, rep, 1)) == group.family_name
            assert str(msg.extract_field("PID", 1, 5, rep, 2)) == group.given_name
            if len(groups) > 1:
                assert str(msg.extract_field("PID", 1, 5, rep, 8)) == code
        assert PersonName(groups[0]).family_name.encode("utf-8") in raw
    else:
        assert max(raw) < 0x80  # nothing but ASCII on the wire
        family, given = (str(msg.extract_field("PID", 1, 5, 1, c)) for c in (1, 2))
        if case == "german":
            assert (family, given, _field(msg, "PID", 5, 3)) == ("Muller-Gross", "Jorg", "Atzel")
        elif case == "korean":
            assert (family, given) == ("Hong", "Gildong")  # the alphabetic group only
        else:  # half-width katakana has no ASCII letters
            assert set(family) == {"?"} and set(given) == {"?"}
        assert repetitions == 1  # one repetition: the ideographic and phonetic groups are not sent


def test_escape_in_each_character_set() -> None:
    ascii_ = CharacterSet.ASCII
    assert escape("Łódź|Ærø^ß", ascii_) == "Lodz\\F\\AEro\\S\\ss"
    assert escape("홍~길동", ascii_) == "?\\R\\??"
    assert escape("홍~길동") == "홍\\R\\길동"
    assert escape("a\nb\tc") == "a\\X0A\\b\\X09\\c"  # hex of the bytes, zero-padded
    assert _ENCODING.unescape(escape("a\nb|c&d\\e")) == "a\nb|c&d\\e"
    with pytest.raises(ValueError, match="ISO-8859"):
        escape("x", "ISO-8859")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be a str"):
        escape(b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MSH-18"):  # an ASCII message must hold only ASCII
        send_message("127.0.0.1", free_port(), "MSH|^~\\&|A||||||ORU^R01|X|P|2.5.1\rPID|1||é\r",
                     timeout_s=1)

"""The HL7 v2.5.1 ORU^R01 that tells the RIS a study's AI triage priority.

One message per study summary revision and HL7 destination (``study_report``): built here
from the study's priority and results, the patient and order identifiers of one of its
images, and the destination's MSH values; stored in the outbox and sent as it is by the
dispatcher (``mllp``), so a retry or ``replay`` sends the same bytes with the same Message
Control ID. Every value taken from the source or the configuration is escaped with the
python-hl7 library (``hl7.Message.escape``: field ``|``, component ``^``, repetition ``~``,
escape ``\\`` and subcomponent ``&`` become ``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``, ASCII control
characters ``\\Xhh\\``), so no text can break the message structure.

The character set is the destination's (MSH-18, HL7 table 0211): ``UNICODE UTF-8`` (the
default) keeps every other character as it is and the message goes out as UTF-8 bytes;
``ASCII`` (MSH-18 empty, the HL7 default) transliterates Latin letters to their base letters
(``Müller`` -> ``Muller``, ``ß`` -> ``ss``) and replaces any other non-ASCII character with
``?``. HL7's ``\\Xhh\\`` names bytes of the message's own character set, and ASCII has no
bytes for such characters, so they are never written as ``\\Xhh\\``.
``docs/conformance.md`` lists the segments and fields.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import hl7  # type: ignore[import-untyped]
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.valuerep import PersonName

from spine_node.config import Hl7Destination
from spine_node.results import codes
from spine_node.results.priority import StudyPriority, level_text
from spine_node.results.types import CascadeResult, ModelInfo, Status, display_label

#: HL7 version (MSH-12) and message type (MSH-9).
VERSION = "2.5.1"
MESSAGE_TYPE = ("ORU", "R01", "ORU_R01")
#: OBX-8 abnormal flag per study level (HL7 table 0078: A abnormal, N normal; none when the
#: AI could not read the study).
ABNORMAL_FLAGS = {Status.POSITIVE: "A", Status.NEGATIVE: "N", Status.NOT_PROCESSED: ""}
#: OBX-3 observation identifiers.
FINDINGS = dcm_codes.DCM.Finding  # 121071
ALGORITHM_NAME = dcm_codes.DCM.AlgorithmName  # 111001
ALGORITHM_VERSION = dcm_codes.DCM.AlgorithmVersion  # 111003
STUDY_INSTANCE_UID = dcm_codes.DCM.StudyInstanceUID  # 110180
#: Message Control ID length (MSH-10 is ST, at most 20 characters in v2.5.1).
CONTROL_ID_LENGTH = 20

#: An empty message whose separators and escape character drive the library's escaping.
_ENCODING = hl7.parse("MSH|^~\\&|")


class CharacterSet(StrEnum):
    """The character set of a destination's messages (MSH-18, HL7 table 0211)."""

    UTF8 = "UNICODE UTF-8"
    ASCII = "ASCII"

    @property
    def msh18(self) -> str:
        """MSH-18 as written: empty for ASCII (the HL7 default), else the table 0211 term."""
        return "" if self is CharacterSet.ASCII else self.value

    @property
    def codec(self) -> str:
        """The Python codec of the bytes on the wire."""
        return "ascii" if self is CharacterSet.ASCII else "utf-8"


#: Python codec per MSH-18 value as received (empty: ASCII, the HL7 default).
CODECS = {"": "ascii", "ASCII": "ascii", "UNICODE UTF-8": "utf-8"}
#: Letters that Unicode does not decompose into an ASCII base letter.
_LATIN = str.maketrans({"ß": "ss", "ẞ": "SS", "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe",
                        "Ø": "O", "ø": "o", "Đ": "D", "đ": "d", "Ł": "L", "ł": "l",
                        "Þ": "TH", "þ": "th", "Ð": "D", "ð": "d", "ı": "i"})
#: Runs of characters escaped here, not by the library: controls (but CR) and non-ASCII.
_OWN = re.compile(r"[^\x20-\x7e\r]+")


def to_ascii(text: str) -> str:
    """``text`` in ASCII: Latin letters without their diacritics, anything else ``?``.

    Compatibility decomposition (NFKD) drops diacritics (``é`` -> ``e``) and folds
    compatibility forms (``ﬁ`` -> ``fi``); a few letters have their usual spelling (``ß`` ->
    ``ss``, ``æ`` -> ``ae``, ``ø`` -> ``o``, ``ł`` -> ``l``). Every other non-ASCII character
    (e.g. Hangul, kana, Han) becomes one ``?`` each.
    """
    folded = unicodedata.normalize("NFKD", text.translate(_LATIN))
    kept = "".join(c for c in folded if not unicodedata.combining(c))
    return "".join(c if c < "\x80" else "?" for c in unicodedata.normalize("NFC", kept))


def escape(text: str, charset: CharacterSet = CharacterSet.UTF8) -> str:
    """Escape ``text`` for one HL7 component in the message character set ``charset``.

    The delimiters, the escape character and carriage returns are escaped with python-hl7
    (``Message.escape``); control characters become ``\\Xhh..\\`` (hex of their bytes in
    ``charset``, HL7 v2.5.1 section 2.7.5). In ``UNICODE UTF-8`` every other character stays
    as it is; in ``ASCII`` the text is transliterated first (:func:`to_ascii`).

    Raises
    ------
    TypeError
        When ``text`` is not a string.
    ValueError
        When ``charset`` is not a CharacterSet value.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    charset = CharacterSet(charset)
    if charset is CharacterSet.ASCII:
        text = to_ascii(text)
    parts: list[str] = []
    start = 0
    for run in _OWN.finditer(text):
        if run.start() > start:
            parts.append(str(_ENCODING.escape(text[start : run.start()])))
        parts.append("".join(_own(c, charset) for c in run.group()))
        start = run.end()
    if start < len(text):
        parts.append(str(_ENCODING.escape(text[start:])))
    return "".join(parts)


def _own(char: str, charset: CharacterSet) -> str:
    """A character the library would write as ``\\X`` + its code point: itself (UTF-8), or
    ``\\Xhh..\\`` with the hex of its bytes in ``charset`` when it is a control character."""
    if unicodedata.category(char) in ("Cc", "Cs"):
        data = char.encode(charset.codec, "surrogatepass")
        return f"\\X{data.hex().upper()}\\"
    return char


def _components(charset: CharacterSet, *values: str) -> str:
    """One field from raw component values (each escaped), trailing empties dropped."""
    return "^".join(escape(v, charset) for v in values).rstrip("^")


def _coded(code: Code, charset: CharacterSet = CharacterSet.UTF8) -> str:
    """A CWE field: identifier ^ text ^ coding system."""
    return _components(charset, code.value, code.meaning, code.scheme_designator)


@dataclass(frozen=True)
class Hl7Header:
    """The MSH values of one destination.

    Attributes
    ----------
    sending_application, sending_facility, receiving_application, receiving_facility : str
        MSH-3 to MSH-6 (namespace IDs; escaped).
    processing_id : str
        MSH-11: ``P`` production, ``T`` training, ``D`` debugging.
    message_profile : str
        MSH-21 (empty: not sent).
    charset : CharacterSet
        The message character set (MSH-18) and encoding of the bytes on the wire.
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    processing_id: str = "P"
    message_profile: str = ""
    charset: CharacterSet = CharacterSet.UTF8

    def __post_init__(self) -> None:
        if self.processing_id not in ("P", "T", "D"):
            raise ValueError(f"processing_id must be P, T or D, got {self.processing_id!r}")
        if not isinstance(self.charset, CharacterSet):
            object.__setattr__(self, "charset", CharacterSet(self.charset))

    def encode(self, message: str) -> bytes:
        """The bytes of a message built for this destination (its character set)."""
        return message.encode(self.charset.codec)

    @classmethod
    def of(cls, destination: Hl7Destination) -> Hl7Header:
        """The header of a configured HL7 destination."""
        return cls(
            destination.sending_application,
            destination.sending_facility,
            destination.receiving_application,
            destination.receiving_facility,
            destination.processing_id,
            destination.message_profile,
            CharacterSet(destination.charset),
        )


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and order identifiers of a study, as the source images state them.

    Attributes
    ----------
    study_instance_uid : str
        As received (what the RIS knows the study by).
    patient_id, issuer_of_patient_id, accession_number : str
        Patient ID (0010,0020), its issuer (0010,0021), Accession Number (0008,0050).
    patient_name : str
        DICOM PN text (``family^given^middle^prefix^suffix``, alphabetic group used).
    birth_date, sex : str
        ``YYYYMMDD`` and ``M``/``F``/``O`` (empty when unknown or invalid).
    """

    study_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    accession_number: str = ""

    @classmethod
    def of(cls, study_instance_uid: str, reference: Dataset) -> StudyIdentity:
        """From the clean reference of one image (``results.reference.reference_dataset``)."""

        def text(keyword: str) -> str:
            value = reference.get(keyword)
            return "" if value is None else str(value)

        return cls(
            study_instance_uid=study_instance_uid,
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=text("PatientName"),
            birth_date=text("PatientBirthDate"),
            sex=text("PatientSex"),
            accession_number=text("AccessionNumber"),
        )


def hl7_headers(destinations: Sequence[object]) -> dict[str, Hl7Header]:
    """The MSH values of each configured HL7 destination, by name."""
    return {d.name: Hl7Header.of(d) for d in destinations if isinstance(d, Hl7Destination)}


def control_id(destination: str, document_uid: str) -> str:
    """The Message Control ID (MSH-10) of one revision's message to one destination.

    Derived from the destination's name and the revision's study summary SOP Instance UID
    (unique per study, bundle and revision), so a rebuilt message keeps its ID: 20 hex digits.
    """
    digest = hashlib.sha256(f"{destination}\0{document_uid}".encode()).hexdigest()
    return digest[:CONTROL_ID_LENGTH].upper()


def _xpn(dicom_name: str, charset: CharacterSet) -> str:
    """HL7 XPN (family^given^middle^suffix^prefix) from a DICOM PN (prefix before suffix).

    A name with ideographic or phonetic groups (DICOM PS3.5 6.2.1.2) becomes one repetition
    per group, each with its name representation code (XPN-8, HL7 table 4000: ``A``
    alphabetic, ``I`` ideographic, ``P`` phonetic); in ASCII only the alphabetic group is sent
    (the others have no ASCII letters).
    """
    if not dicom_name:
        return ""
    name = PersonName(dicom_name)
    groups = [("A", name.alphabetic)]
    if charset is not CharacterSet.ASCII:
        groups += [("I", name.ideographic), ("P", name.phonetic)]
    groups = [(code, text) for code, text in groups if text]
    if [code for code, _ in groups] in ([], ["A"]):
        return _components(charset, *_person(name))
    return "~".join(
        _components(charset, *_person(PersonName(text)), "", "", code) for code, text in groups
    )


def _person(name: PersonName) -> tuple[str, str, str, str, str]:
    """XPN-1 to XPN-5 (family, given, middle, suffix, prefix) of the first group of ``name``."""
    return (
        name.family_name, name.given_name, name.middle_name, name.name_suffix, name.name_prefix
    )


def findings_text(results: Sequence[CascadeResult]) -> str:
    """The findings in short: each finding label with its highest score, most likely first;
    the reasons of images not processed; "no findings" when there are none."""
    best: dict[str, float] = {}
    for result in results:
        for finding in result.findings:
            label = display_label(finding.label)
            best[label] = max(best.get(label, 0.0), finding.score)
    parts = [f"{label} {score:.2f}" for label, score in sorted(best.items(), key=lambda i: -i[1])]
    reasons = sorted({r.reason for r in results if r.status is Status.NOT_PROCESSED and r.reason})
    parts += [f"not processed: {reason}" for reason in reasons]
    return "; ".join(parts) or "no findings"


def build_oru(
    header: Hl7Header,
    identity: StudyIdentity,
    priority: StudyPriority,
    results: Sequence[CascadeResult],
    model: ModelInfo,
    *,
    revision: int,
    message_control_id: str,
    now: datetime,
) -> str:
    """Build the ORU^R01 of one study summary revision.

    Parameters
    ----------
    header : Hl7Header
        The destination's MSH values.
    identity : StudyIdentity
        Patient ID and name, accession number, Study Instance UID.
    priority : StudyPriority
        The study's priority (``results.priority.study_priority``) over ``results``.
    results : sequence of CascadeResult
        The latest result of each analysed image (findings and reasons).
    model : ModelInfo
        The bundle: name, version, and whether it is the demo bundle.
    revision : int
        The summary revision (1: result status ``F``; later revisions correct it: ``C``).
    message_control_id : str
        MSH-10, 1 to 20 characters (:func:`control_id`).
    now : datetime.datetime
        Time of the message (MSH-7, OBR-22, OBX-14); timezone-aware.

    Returns
    -------
    str
        The message, segments separated by carriage returns (HL7 ER7).

    Raises
    ------
    TypeError
        When ``priority`` is not a StudyPriority or ``now`` is not a datetime.
    ValueError
        When ``revision`` < 1, the control ID is empty or too long, or ``now`` is naive.
    """
    if not isinstance(priority, StudyPriority):
        raise TypeError(f"priority must be a StudyPriority, got {type(priority).__name__}")
    _check_common(message_control_id, now)
    if revision < 1:
        raise ValueError(f"revision must be >= 1, got {revision!r}")
    status = "F" if revision == 1 else "C"
    cs = header.charset
    observations: list[Observation] = [
        (
            "CWE",
            codes.STUDY_PRIORITY,
            _coded(codes.PRIORITY_CODES[priority.level], cs),
            "",
            ABNORMAL_FLAGS[priority.level],
        )
    ]
    if priority.max_score is not None:
        observations.append(
            (
                "NM",
                codes.PROBABILITY,
                f"{priority.max_score:.4f}",
                _coded(codes.UNIT_PROBABILITY, cs),
                "",
            )
        )
    observations += [
        ("TX", FINDINGS, escape(findings_text(results), cs), "", ""),
        ("ST", ALGORITHM_NAME, escape(model.name, cs), "", ""),
        ("ST", ALGORITHM_VERSION, escape(model.version, cs), "", ""),
        ("ST", STUDY_INSTANCE_UID, escape(identity.study_instance_uid, cs), "", ""),
        ("TX", codes.COMMENT, escape(comment_text(priority, model), cs), "", ""),
    ]
    return _message(header, identity, status, message_control_id, now, observations)


#: One OBX: value type, observation identifier, escaped value, escaped units, abnormal flag.
Observation = tuple[str, Code, str, str, str]


def _check_common(message_control_id: str, now: datetime) -> None:
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, got {type(now).__name__}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (HL7 DTM carries the UTC offset)")
    if not 1 <= len(message_control_id) <= CONTROL_ID_LENGTH:
        raise ValueError(
            f"message_control_id must be 1 to {CONTROL_ID_LENGTH} characters, "
            f"got {message_control_id!r}"
        )


def _message(
    header: Hl7Header,
    identity: StudyIdentity,
    status: str,
    message_control_id: str,
    now: datetime,
    observations: Sequence[Observation],
) -> str:
    """MSH, PID, ORC, OBR and one OBX per observation, as ER7 text."""
    stamp = now.strftime("%Y%m%d%H%M%S%z")
    cs = header.charset
    msh = [
        "MSH",
        "^~\\&",
        escape(header.sending_application, cs),
        escape(header.sending_facility, cs),
        escape(header.receiving_application, cs),
        escape(header.receiving_facility, cs),
        stamp,
        "",
        "^".join(MESSAGE_TYPE),
        escape(message_control_id, cs),
        header.processing_id,
        VERSION,
        *[""] * 5,  # MSH-13 .. MSH-17: original acknowledgment mode (MSH-15/16 empty)
        cs.msh18,  # MSH-18 character set
        "",  # MSH-19 principal language
        "",  # MSH-20 alternate character set handling scheme
        escape(header.message_profile, cs),
    ]
    pid = [
        "PID",
        "1",
        "",
        _components(cs, identity.patient_id, "", "", identity.issuer_of_patient_id)
        if identity.patient_id
        else "",
        "",
        _xpn(identity.patient_name, cs),
        "",
        escape(identity.birth_date, cs),
        escape(identity.sex, cs),
    ]
    filler = escape(identity.accession_number, cs)
    orc = ["ORC", "RE", "", filler, "", "CM"]
    obr = ["OBR", "1", "", filler, _coded(codes.TRIAGE_RESULT, cs), "", "", stamp]
    obr += [""] * 10 + [filler]  # OBR-8 .. OBR-17 empty; OBR-18 (placer field 1)
    obr += ["", "", "", stamp, "", "RAD", status]  # OBR-19 .. OBR-25
    obx = [
        ["OBX", str(i), vtype, _coded(code, cs), "", value, units, "", flag, "", "", status, "", "",
         stamp]
        for i, (vtype, code, value, units, flag) in enumerate(observations, start=1)
    ]
    segments = [msh, pid, orc, obr, *obx]
    return "\r".join("|".join(fields).rstrip("|") for fields in segments) + "\r"


def build_ignored_oru(
    header: Hl7Header,
    identity: StudyIdentity,
    reason: str,
    *,
    message_control_id: str,
    now: datetime,
) -> str:
    """Build the ORU^R01 of a study none of whose objects is analysed ("ignored").

    No model ran, so the message has no score and no model observations: the flag
    (``SN-103`` Ignored), the reason, the Study Instance UID and the comment.

    Parameters
    ----------
    header, identity : Hl7Header, StudyIdentity
        As for :func:`build_oru`.
    reason : str
        Why the object was not analysed (``sop_classes`` reason, e.g. "not an image").
    message_control_id : str
        MSH-10, 1 to 20 characters.
    now : datetime.datetime
        Time of the message; timezone-aware.

    Raises
    ------
    TypeError, ValueError
        As for :func:`build_oru`.
    """
    _check_common(message_control_id, now)
    cs = header.charset
    comment = f"AI triage: ignored (not analysed). {codes.NOT_FOR_DIAGNOSTIC_USE}."
    observations: list[Observation] = [
        ("CWE", codes.STUDY_PRIORITY, _coded(codes.IGNORED, cs), "", ""),
        ("TX", FINDINGS, escape(f"ignored: {reason or 'not analysed'}", cs), "", ""),
        ("ST", STUDY_INSTANCE_UID, escape(identity.study_instance_uid, cs), "", ""),
        ("TX", codes.COMMENT, escape(comment, cs), "", ""),
    ]
    return _message(header, identity, "F", message_control_id, now, observations)


def comment_text(priority: StudyPriority, model: ModelInfo) -> str:
    """The comment observation: the priority in words, not for diagnostic use, and the demo
    warning when the demo bundle is in use."""
    parts = [
        f"AI triage: {level_text(priority.level)}.",
        priority.summary() + ".",
        codes.NOT_FOR_DIAGNOSTIC_USE + ".",
    ]
    if model.demo:
        parts.append(codes.DEMO_TEXT + ": a demonstration model, its results mean nothing.")
    return " ".join(parts)

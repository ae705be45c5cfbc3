"""The HL7 v2.5.1 ORU^R01 that tells the RIS a study's AI triage priority.

One message per study summary revision and HL7 destination (``study_report``): built here
from the study's priority and results, the patient and order identifiers of one of its
images, and the destination's MSH values; stored in the outbox and sent as it is by the
dispatcher (``mllp``), so a retry or ``replay`` sends the same bytes with the same Message
Control ID. Every value taken from the source or the configuration is escaped with the
python-hl7 library (``hl7.Message.escape``: field ``|``, component ``^``, repetition ``~``,
escape ``\\`` and subcomponent ``&`` become ``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``; characters
outside printable ASCII become ``\\Xhh\\``), so no text can break the message structure.
``docs/conformance.md`` lists the segments and fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

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


def escape(text: str) -> str:
    """Escape ``text`` for one HL7 component (python-hl7 ``Message.escape``).

    Raises
    ------
    TypeError
        When ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return str(_ENCODING.escape(text)) if text else ""


def _components(*values: str) -> str:
    """One field from raw component values (each escaped), trailing empties dropped."""
    return "^".join(escape(v) for v in values).rstrip("^")


def _coded(code: Code) -> str:
    """A CWE field: identifier ^ text ^ coding system."""
    return _components(code.value, code.meaning, code.scheme_designator)


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
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    processing_id: str = "P"
    message_profile: str = ""

    def __post_init__(self) -> None:
        if self.processing_id not in ("P", "T", "D"):
            raise ValueError(f"processing_id must be P, T or D, got {self.processing_id!r}")

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


def _xpn(dicom_name: str) -> str:
    """HL7 XPN (family^given^middle^suffix^prefix) from a DICOM PN (prefix before suffix)."""
    if not dicom_name:
        return ""
    name = PersonName(dicom_name)
    return _components(
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
    observations: list[Observation] = [
        (
            "CWE",
            codes.STUDY_PRIORITY,
            _coded(codes.PRIORITY_CODES[priority.level]),
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
                _coded(codes.UNIT_PROBABILITY),
                "",
            )
        )
    observations += [
        ("TX", FINDINGS, escape(findings_text(results)), "", ""),
        ("ST", ALGORITHM_NAME, escape(model.name), "", ""),
        ("ST", ALGORITHM_VERSION, escape(model.version), "", ""),
        ("ST", STUDY_INSTANCE_UID, escape(identity.study_instance_uid), "", ""),
        ("TX", codes.COMMENT, escape(comment_text(priority, model)), "", ""),
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
    msh = [
        "MSH",
        "^~\\&",
        escape(header.sending_application),
        escape(header.sending_facility),
        escape(header.receiving_application),
        escape(header.receiving_facility),
        stamp,
        "",
        "^".join(MESSAGE_TYPE),
        escape(message_control_id),
        header.processing_id,
        VERSION,
        *[""] * 8,  # MSH-13 .. MSH-20: original acknowledgment mode (MSH-15/16 empty)
        escape(header.message_profile),
    ]
    pid = [
        "PID",
        "1",
        "",
        _components(identity.patient_id, "", "", identity.issuer_of_patient_id)
        if identity.patient_id
        else "",
        "",
        _xpn(identity.patient_name),
        "",
        escape(identity.birth_date),
        escape(identity.sex),
    ]
    filler = escape(identity.accession_number)
    orc = ["ORC", "RE", "", filler, "", "CM"]
    obr = ["OBR", "1", "", filler, _coded(codes.TRIAGE_RESULT), "", "", stamp]
    obr += [""] * 10 + [filler]  # OBR-8 .. OBR-17 empty; OBR-18 (placer field 1)
    obr += ["", "", "", stamp, "", "RAD", status]  # OBR-19 .. OBR-25
    obx = [
        ["OBX", str(i), vtype, _coded(code), "", value, units, "", flag, "", "", status, "", "",
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
    comment = f"AI triage: ignored (not analysed). {codes.NOT_FOR_DIAGNOSTIC_USE}."
    observations: list[Observation] = [
        ("CWE", codes.STUDY_PRIORITY, _coded(codes.IGNORED), "", ""),
        ("TX", FINDINGS, escape(f"ignored: {reason or 'not analysed'}"), "", ""),
        ("ST", STUDY_INSTANCE_UID, escape(identity.study_instance_uid), "", ""),
        ("TX", codes.COMMENT, escape(comment), "", ""),
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

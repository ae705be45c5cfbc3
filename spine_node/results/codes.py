"""Coded concepts and fixed wording used in every result object.

Policy: a finding is coded in SNOMED CT (``SCT``) only where the concept can be checked
against the terminology source available offline, pydicom's ``codes.SCT`` dictionary
(``tests/test_results_codes.py`` performs that check for every ``SCT`` and ``DCM`` code
here). Everything else uses the private coding scheme ``99SPINENODE``, declared in each
object through the Coding Scheme Identification Sequence.

SNOMED CT concepts that very probably exist but cannot be verified offline are listed in
``UNVERIFIED_SNOMED_CANDIDATES``; they are documented, never written.
"""

from __future__ import annotations

from collections.abc import Mapping

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from spine_node.results.types import LESION_LABELS, Status
from spine_node.results.types import MEYERDING_GRADES as GRADE_VOCABULARY

#: Designator of the private coding scheme.
PRIVATE_SCHEME = "99SPINENODE"

#: Texts that every object carries.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DEMO_TEXT = "DEMO MODEL - PHANTOM-TRAINED"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# --- standard concepts (checked against pydicom's dictionaries) ----------------------
ABNORMAL: Code = codes.SCT.Abnormal  # 263654008
NORMAL: Code = codes.SCT.Normal  # 17621005
PLAIN_RADIOGRAPHY: Code = codes.SCT.PlainRadiography  # 168537006, the procedure reported
IMPLANT: Code = codes.SCT.Implant  # 40388003
LESION: Code = codes.SCT.Lesion  # 52988006
STENOSIS: Code = Code("415582006", "SCT", "Stenosis")
VERTEBRAL_FORAMEN: Code = codes.SCT.VertebralForamen  # 280734009, finding site
PROBABILITY: Code = codes.DCM.Probability  # 122157
THRESHOLD_VALUE: Code = codes.DCM.ThresholdValue  # 122411
COMMENT: Code = codes.DCM.Comment  # 121106
SOURCE_IMAGE_PURPOSE: Code = codes.DCM.SourceImageForImageProcessingOperation  # 121322

#: UCUM annotation for a dimensionless probability in [0, 1].
UNIT_PROBABILITY = Code("{probability}", "UCUM", "probability")

# --- private concepts ------------------------------------------------------------------
OSTEOPHYTE = _private("SN-001", "Osteophyte")
DISC_SPACE_NARROWING = _private("SN-002", "Disc space narrowing")
SPONDYLOLISTHESIS = _private("SN-004", "Spondylolisthesis")
VERTEBRAL_COLLAPSE = _private("SN-006", "Vertebral collapse")

TRIAGE_RESULT = _private("SN-100", "Spine radiograph AI triage")
NOT_PROCESSED = _private("SN-101", "Not processed")
STUDY_PRIORITY = _private("SN-102", "Study AI triage priority")
#: HL7 study flag when no object of the study is analysed (not images, out of scope)
IGNORED = _private("SN-103", "Ignored: not analysed")
MEYERDING_GRADE = _private("SN-110", "Meyerding grade")
#: One code per grade of the one vocabulary (``types.MEYERDING_GRADES``): SN-111 .. SN-115.
MEYERDING_GRADES: Mapping[str, Code] = {
    grade: _private(f"SN-{111 + i}", f"Meyerding grade {grade}")
    for i, grade in enumerate(GRADE_VOCABULARY)
}

#: Finding code per VinDr label.
FINDING_CODES: Mapping[str, Code] = {
    "Osteophytes": OSTEOPHYTE,
    "Disc space narrowing": DISC_SPACE_NARROWING,
    "Surgical implant": IMPLANT,
    "Spondylolysthesis": SPONDYLOLISTHESIS,
    "Foraminal stenosis": STENOSIS,
    "Vertebral collapse": VERTEBRAL_COLLAPSE,
    "Other lesions": LESION,
}

#: Finding sites that post-coordinate a finding code (stenosis of the vertebral foramen).
FINDING_SITES: Mapping[str, Code] = {
    "Foraminal stenosis": VERTEBRAL_FORAMEN,
}

#: SNOMED CT concepts that are likely right but absent from the offline terminology source;
#: documented for a later mapping, never written into objects.
UNVERIFIED_SNOMED_CANDIDATES: Mapping[str, tuple[str, str]] = {
    "Spondylolysthesis": ("274152003", "Spondylolisthesis"),
    "Osteophytes": ("88998003", "Osteophyte"),
}

#: Triage value per study priority level (a study verdict: the abnormal / normal concepts).
PRIORITY_CODES: Mapping[Status, Code] = {
    Status.POSITIVE: ABNORMAL,
    Status.NEGATIVE: NORMAL,
    Status.NOT_PROCESSED: NOT_PROCESSED,
}

if set(FINDING_CODES) != set(LESION_LABELS):  # pragma: no cover - guards an edit mistake
    raise RuntimeError("FINDING_CODES must cover LESION_LABELS exactly")
if tuple(MEYERDING_GRADES) != GRADE_VOCABULARY:  # pragma: no cover - guards an edit mistake
    raise RuntimeError("MEYERDING_GRADES must cover the grade vocabulary exactly")


def finding_code(label: str) -> Code:
    """Return the finding code for a VinDr lesion label.

    Parameters
    ----------
    label : str
        One of ``LESION_LABELS``.

    Returns
    -------
    pydicom.sr.coding.Code
        SNOMED CT code where verified, otherwise a ``99SPINENODE`` code.
    """
    try:
        return FINDING_CODES[label]
    except KeyError:
        raise ValueError(f"label must be one of {LESION_LABELS}, got {label!r}") from None


def meyerding_code(grade: str) -> Code:
    """Return the private code for a Meyerding grade (``"I"`` .. ``"V"``)."""
    try:
        return MEYERDING_GRADES[grade]
    except KeyError:
        raise ValueError(f"grade must be one of {tuple(MEYERDING_GRADES)}, got {grade!r}") from None


def all_codes() -> tuple[Code, ...]:
    """Return every code this package can write (for checks and the conformance statement)."""
    fixed = (
        ABNORMAL,
        NORMAL,
        PLAIN_RADIOGRAPHY,
        PROBABILITY,
        THRESHOLD_VALUE,
        COMMENT,
        SOURCE_IMAGE_PURPOSE,
        UNIT_PROBABILITY,
        TRIAGE_RESULT,
        NOT_PROCESSED,
        STUDY_PRIORITY,
        IGNORED,
        MEYERDING_GRADE,
    )
    seen: dict[tuple[str, str], Code] = {}
    for code in (
        *fixed,
        *FINDING_CODES.values(),
        *FINDING_SITES.values(),
        *MEYERDING_GRADES.values(),
    ):
        seen.setdefault((code.scheme_designator, code.value), code)
    return tuple(seen.values())


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """Return the Coding Scheme Identification item declaring ``99SPINENODE``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="spine-node private concepts",
        version="1",
        responsible_organization="spine-node",
    )

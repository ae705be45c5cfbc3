"""What the result objects take from a source image: identity, patient/study text, image facts.

``source_reference`` accepts sloppy sources and returns a clean dataset plus notes:

- identity: Study, Series and SOP Instance UIDs exactly as received when usable
  (``uids.is_usable_uid``: <= 64 digits and dots, leading zeros allowed); an unusable one is
  replaced by a deterministic ``2.25`` UID and recorded in ``derived_uids`` (the SR says so);
- patient and study text decoded and recovered per ``results.text`` (UTF-8 out), cut to the
  VR's limits; invalid dates, times, sexes and ages written empty;
- a known storage SOP Class (CR or DX-for-presentation when the source's is missing or
  unknown);
- the image attributes the overlay and the GSPS use.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
from dataclasses import dataclass

from highdicom._standard_utils import get_sop_class_iod_map
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from spine_node.results import text as text_module
from spine_node.results.uids import is_usable_uid, received_uid, uid_from_name, usable_or_derived

logger = logging.getLogger(__name__)

OUTPUT_CHARACTER_SET = text_module.OUTPUT_CHARACTER_SET

_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_AGE_RE = re.compile(r"^\d{3}[DWMY]$")
_ORIENTATION_RE = re.compile(r"^[APLRHF]{1,3}$")

#: Patient and study attributes copied into the reference: keyword -> VR.
TEXT_ATTRIBUTES: dict[str, str] = {
    "PatientName": "PN",
    "PatientID": "LO",
    "IssuerOfPatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "PatientAge": "AS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "AccessionNumber": "SH",
    "StudyID": "SH",
    "ReferringPhysicianName": "PN",
    "StudyDescription": "LO",
}
#: Type 2 attributes the result IODs need present (empty when unknown).
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
#: Image attributes the GSPS and the overlay use, copied as they are when readable.
IMAGE_ATTRIBUTES = (
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "ModalityLUTSequence",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "BodyPartExamined",
    "LossyImageCompression",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class DerivedUID:
    """A source UID that could not be carried and was replaced.

    Attributes
    ----------
    keyword : str
        ``StudyInstanceUID``, ``SeriesInstanceUID`` or ``SOPInstanceUID``.
    received : str
        The value as received (empty when it was missing).
    derived : str
        The ``2.25`` UID used instead.
    """

    keyword: str
    received: str
    derived: str

    def sentence(self) -> str:
        """One sentence for the SR, e.g. for a VinDr 32-hex identifier."""
        shown = text_module.clean_characters(self.received)[:80] or "(missing)"
        return (
            f"The source {self.keyword} {shown!r} is not a usable DICOM UID; "
            f"the results use the derived UID {self.derived}."
        )


@dataclass(frozen=True)
class SourceReference:
    """The clean reference of one source image.

    Attributes
    ----------
    dataset : pydicom.Dataset
        Identity, patient/study and image attributes, ``SpecificCharacterSet`` ISO_IR 192.
    derived_uids : tuple of DerivedUID
        Source UIDs that were unusable and replaced (empty for a well-formed source).
    recovered_text : tuple of str
        Keywords whose bytes did not decode in the declared character set and were
        recovered with a fallback codec.
    """

    dataset: Dataset
    derived_uids: tuple[DerivedUID, ...] = ()
    recovered_text: tuple[str, ...] = ()


def source_reference(source: Dataset) -> SourceReference:
    """Return the clean reference of ``source`` with notes on what had to be repaired.

    Parameters
    ----------
    source : pydicom.Dataset
        The image as received, however sloppy.

    Returns
    -------
    SourceReference

    Raises
    ------
    TypeError
        When ``source`` is not a pydicom Dataset.
    ValueError
        When the source has no SOP Instance UID at all.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    raw_sop = source_sop_instance_uid(source)
    ref = Dataset()
    ref.SpecificCharacterSet = OUTPUT_CHARACTER_SET
    derived: list[DerivedUID] = []

    def carry(keyword: str, value: str, role: str, fallback: str) -> str:
        if is_usable_uid(value):
            return value
        uid = usable_or_derived(value, role) if value else fallback
        derived.append(DerivedUID(keyword, value, uid))
        return uid

    raw_study = received_uid(_get_text(source, "StudyInstanceUID"))
    raw_series = received_uid(_get_text(source, "SeriesInstanceUID"))
    ref.SOPInstanceUID = carry("SOPInstanceUID", raw_sop, "instance", "")
    ref.SOPClassUID = _sop_class(source)
    ref.StudyInstanceUID = carry(
        "StudyInstanceUID", raw_study, "study", uid_from_name("study-of", raw_sop)
    )
    ref.SeriesInstanceUID = carry(
        "SeriesInstanceUID", raw_series, "series", uid_from_name("series-of", raw_sop)
    )
    recovered: list[str] = []
    for keyword, vr in TEXT_ATTRIBUTES.items():
        decoded = text_module.element_text(source, keyword, vr)
        if decoded.recovered_with:
            recovered.append(keyword)
            logger.warning(
                "source %s: %s does not decode in the declared character set; read as %s",
                raw_sop,
                keyword,
                decoded.recovered_with,
            )
        value = clean_value(decoded.text, vr)
        if value or keyword in TYPE2:
            setattr(ref, keyword, value or None)
    for keyword in IMAGE_ATTRIBUTES:
        _copy_element(source, ref, keyword)
    if "SamplesPerPixel" not in ref:
        ref.SamplesPerPixel = 1
    orientation = _get_values(source, "PatientOrientation")
    if len(orientation) == 2 and all(_ORIENTATION_RE.match(v) for v in orientation):
        ref.PatientOrientation = orientation
    laterality = _get_text(source, "Laterality").upper()
    if laterality in {"R", "L"}:
        ref.Laterality = laterality
    for item in derived:
        logger.warning("source %s: %s", raw_sop, item.sentence())
    return SourceReference(ref, tuple(derived), tuple(recovered))


def reference_dataset(source: Dataset) -> Dataset:
    """Return ``source_reference(source).dataset`` (see :func:`source_reference`)."""
    return source_reference(source).dataset


def clean_value(value: str, vr: str) -> str:
    """Return ``value`` valid for ``vr`` (``PN LO SH DA TM AS CS``) or ``""``.

    Dates, times, ages and sexes that are not valid become empty; strings are cut to the
    VR's byte limit at a character boundary (``results.text``).
    """
    if vr == "PN":
        return text_module.clean_person_name(value)
    value = text_module.clean_characters(value)
    if vr == "DA":
        return value if _DATE_RE.match(value) and _valid_date(value) else ""
    if vr == "TM":
        return value if _TIME_RE.match(value) and _valid_time(value) else ""
    if vr == "AS":
        return value if _AGE_RE.match(value) else ""
    if vr == "CS":
        value = value.upper()
        return value if value in {"M", "F", "O"} else ""
    return text_module.clean_string(value, vr)


def source_sop_instance_uid(source: Dataset) -> str:
    """Return the source's SOP Instance UID as received (file meta as a fallback).

    Raises
    ------
    ValueError
        When neither the dataset nor its file meta has one.
    """
    value = received_uid(_get_text(source, "SOPInstanceUID"))
    if not value:
        meta = getattr(source, "file_meta", None)
        value = received_uid(_get_text(meta, "MediaStorageSOPInstanceUID")) if meta else ""
    if not value:
        raise ValueError("source has no SOPInstanceUID: it cannot be referenced")
    return value


def _sop_class(source: Dataset) -> str:
    value = _get_text(source, "SOPClassUID")
    if not value:
        meta = getattr(source, "file_meta", None)
        value = _get_text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    if value in get_sop_class_iod_map():
        return value
    modality = _get_text(source, "Modality").upper()
    fallback = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else DigitalXRayImageStorageForPresentation
    )
    logger.warning(
        "source SOP Class UID %r is missing or not a known storage class; referencing it as %s",
        value,
        fallback.name,
    )
    return str(fallback)


def _get_text(ds: Dataset | None, keyword: str) -> str:
    """Return an ASCII-valued attribute (UI, CS) as text; '' if absent or unreadable."""
    if ds is None:
        return ""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # undecodable bytes, bogus VR: treat as absent
        logger.warning("could not read %s from the source: %s", keyword, exc)
        return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).rstrip("\x00").strip()


def _get_values(ds: Dataset, keyword: str) -> list[str]:
    """Return a multi-valued attribute as a list of stripped strings; [] if absent/unreadable."""
    try:
        value = ds.get(keyword)
    except Exception as exc:
        logger.warning("could not read %s from the source: %s", keyword, exc)
        return []
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip().upper() for v in values]


def _valid_date(value: str) -> bool:
    try:
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def _valid_time(value: str) -> bool:
    hh = int(value[0:2])
    mm = int(value[2:4]) if len(value) >= 4 else 0
    ss = int(value[4:6]) if len(value) >= 6 else 0
    return hh < 24 and mm < 60 and ss < 61


def _copy_element(source: Dataset, ref: Dataset, keyword: str) -> None:
    try:
        if keyword not in source:
            return
        element = source[keyword]
        value = element.value
    except Exception as exc:
        logger.warning("could not read %s from the source: %s", keyword, exc)
        return
    if value is None or value == "":
        return
    ref[element.tag] = copy.deepcopy(element)

"""Build every DICOM result object for one analysed image.

``build_results`` returns datasets; writing and sending happen elsewhere. The SR is always
built; the Secondary Capture overlay whenever the source pixels decode (negative results
included); the GSPS when enabled, when there are findings and the source is a single-frame
grayscale image.

Sloppy sources are accepted: ``reference_dataset`` copies only what the result objects
need, decoded with the source's character set (unknown character sets fall back to the
default repertoire, as pydicom does), validated per VR (invalid dates, times, sexes and
ages are written empty; over-long strings are cut to the VR's maximum), with invalid UIDs
replaced by deterministic ``2.25`` UIDs (``uids.valid_or_derived``). Everything we write
is UTF-8 (``ISO_IR 192``).
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

from spine_node import imaging
from spine_node.results import gsps as gsps_module
from spine_node.results import overlay as overlay_module
from spine_node.results import sr as sr_module
from spine_node.results.codes import DEMO_TEXT
from spine_node.results.priority import StudyPriority
from spine_node.results.types import CascadeResult, ModelInfo, Status
from spine_node.results.uids import uid_from_name, valid_or_derived

logger = logging.getLogger(__name__)

#: Character set of every object we write.
OUTPUT_CHARACTER_SET = "ISO_IR 192"

_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_AGE_RE = re.compile(r"^\d{3}[DWMY]$")
_CS_RE = re.compile(r"^[A-Z0-9 _]{0,16}$")
_ORIENTATION_RE = re.compile(r"^[APLRHF]{1,3}$")

#: Patient and study attributes copied into the reference: keyword -> (VR, max length).
_TEXT_ATTRIBUTES: dict[str, tuple[str, int]] = {
    "PatientName": ("PN", 64),
    "PatientID": ("LO", 64),
    "IssuerOfPatientID": ("LO", 64),
    "PatientBirthDate": ("DA", 8),
    "PatientSex": ("CS", 16),
    "PatientAge": ("AS", 4),
    "StudyDate": ("DA", 8),
    "StudyTime": ("TM", 16),
    "AccessionNumber": ("SH", 16),
    "StudyID": ("SH", 16),
    "ReferringPhysicianName": ("PN", 64),
    "StudyDescription": ("LO", 64),
}
#: Type 2 attributes the result IODs need present (empty when unknown).
_TYPE2 = (
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
_IMAGE_ATTRIBUTES = (
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
class ResultOptions:
    """How result series look. Field names match ``config.ResultsSettings``.

    Attributes
    ----------
    sr_series_number, sc_series_number, gsps_series_number : int
        Series Number per object kind.
    sr_series_description, sc_series_description, gsps_series_description : str
        Series Description per object kind (a demo bundle appends ``DEMO_TEXT``).
    secondary_capture : bool
        Build the overlay Secondary Capture.
    gsps : bool
        Build the GSPS (off by default).
    institution_name, institutional_department_name : str
        Written when not empty.
    manufacturer : str
        Manufacturer of the device (this node) and of the algorithm.
    device_name : str
        Device Observer Name in the SR.
    """

    sr_series_number: int = 9901
    sc_series_number: int = 9902
    gsps_series_number: int = 9903
    sr_series_description: str = "AI spine triage SR"
    sc_series_description: str = "AI spine triage overlay"
    gsps_series_description: str = "AI spine triage annotations"
    secondary_capture: bool = True
    gsps: bool = False
    institution_name: str = ""
    institutional_department_name: str = ""
    manufacturer: str = "spine-node"
    device_name: str = "spine-node"

    def __post_init__(self) -> None:
        for name in ("sr_series_number", "sc_series_number", "gsps_series_number"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 1 <= value <= 2**31 - 1:
                raise ValueError(f"{name} must be in [1, 2**31 - 1], got {value!r}")
        for name in (
            "sr_series_description",
            "sc_series_description",
            "gsps_series_description",
            "institution_name",
            "institutional_department_name",
            "manufacturer",
            "device_name",
        ):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            if len(value) > 64 or any(c in value for c in "\\\r\n\x00"):
                raise ValueError(f"{name} must be a DICOM LO (<= 64 chars, no \\), got {value!r}")
        for name in ("manufacturer", "device_name", "sr_series_description"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        for name in ("secondary_capture", "gsps"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def series_description(self, kind: str, model: ModelInfo) -> str:
        """Return the Series Description for ``kind`` (``"sr"``, ``"sc"``, ``"gsps"``)."""
        base: str = getattr(self, f"{kind}_series_description")
        if not model.demo:
            return base
        suffix = f" {DEMO_TEXT}"
        return (base[: 64 - len(suffix)] + suffix).strip()


def build_results(
    source: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions | None = None,
    study_priority: StudyPriority | None = None,
) -> list[Dataset]:
    """Build the result objects for one source image.

    Parameters
    ----------
    source : pydicom.Dataset
        The image as received (pixel data needed for the overlay).
    result : CascadeResult
        The cascade's answer for it (``result.sop_instance_uid`` must match the source).
    model : ModelInfo
        The bundle that produced ``result``.
    options : ResultOptions, optional
        Series numbers, descriptions and switches (defaults when None).
    study_priority : StudyPriority, optional
        Priority of the whole study, reported in the SR and the banner.

    Returns
    -------
    list of pydicom.Dataset
        ``[SR, SC?, GSPS?]``: SR always, SC when pixels decode (and enabled), GSPS when
        enabled, with findings, on a single-frame grayscale source.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    if not isinstance(result, CascadeResult):
        raise TypeError(f"result must be a CascadeResult, got {type(result).__name__}")
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo, got {type(model).__name__}")
    if options is None:
        options = ResultOptions()
    if not isinstance(options, ResultOptions):
        raise TypeError(f"options must be a ResultOptions, got {type(options).__name__}")
    if study_priority is not None and not isinstance(study_priority, StudyPriority):
        raise TypeError(
            f"study_priority must be a StudyPriority or None, got {type(study_priority).__name__}"
        )
    source_uid = _source_sop_instance_uid(source)
    if result.sop_instance_uid != source_uid:
        raise ValueError(
            f"result.sop_instance_uid {result.sop_instance_uid!r} does not match the source "
            f"SOP Instance UID {source_uid!r}"
        )

    reference = reference_dataset(source)
    image: imaging.SourceImage | None = None
    if options.secondary_capture or _n_frames(source) > 1:
        image = _try_decode(source, result)
    frame_number = _frame_number(source, image)

    objects: list[Dataset] = [
        sr_module.build_sr(
            reference,
            result,
            model,
            options,
            study_priority=study_priority,
            frame_number=frame_number,
        )
    ]
    if options.secondary_capture and image is not None:
        objects.append(
            overlay_module.build_overlay(
                reference, image, result, model, options, study_priority=study_priority
            )
        )
    if options.gsps and result.findings:
        if gsps_module.supports(reference):
            objects.append(gsps_module.build_gsps(reference, result, model, options))
        else:
            logger.info(
                "no GSPS for %s: the source is not a single-frame grayscale image",
                reference.SOPInstanceUID,
            )
    return objects


def reference_dataset(source: Dataset) -> Dataset:
    """Return a clean copy of what the result objects need from ``source``.

    Parameters
    ----------
    source : pydicom.Dataset
        The image as received, however sloppy.

    Returns
    -------
    pydicom.Dataset
        Valid UIDs (derived when the source's are invalid), a known storage SOP Class,
        patient and study attributes decoded and validated (type 2 ones present, empty when
        unknown), image attributes, ``SpecificCharacterSet`` ``ISO_IR 192``.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    raw_sop = _source_sop_instance_uid(source)
    ref = Dataset()
    ref.SpecificCharacterSet = OUTPUT_CHARACTER_SET
    ref.SOPInstanceUID = valid_or_derived(raw_sop, "instance")
    ref.SOPClassUID = _sop_class(source)
    raw_study = _get_text(source, "StudyInstanceUID")
    raw_series = _get_text(source, "SeriesInstanceUID")
    ref.StudyInstanceUID = (
        valid_or_derived(raw_study, "study") if raw_study else uid_from_name("study-of", raw_sop)
    )
    ref.SeriesInstanceUID = (
        valid_or_derived(raw_series, "series")
        if raw_series
        else uid_from_name("series-of", raw_sop)
    )
    for keyword, (vr, max_len) in _TEXT_ATTRIBUTES.items():
        value = _clean_text(_get_text(source, keyword), vr, max_len)
        if value or keyword in _TYPE2:
            setattr(ref, keyword, value or None)
    for keyword in _IMAGE_ATTRIBUTES:
        _copy_element(source, ref, keyword)
    if "SamplesPerPixel" not in ref:
        ref.SamplesPerPixel = 1
    orientation = _get_values(source, "PatientOrientation")
    if len(orientation) == 2 and all(_ORIENTATION_RE.match(v) for v in orientation):
        ref.PatientOrientation = orientation
    laterality = _get_text(source, "Laterality").upper()
    if laterality in {"R", "L"}:
        ref.Laterality = laterality
    return ref


def _source_sop_instance_uid(source: Dataset) -> str:
    value = _get_text(source, "SOPInstanceUID")
    if not value:
        meta = getattr(source, "file_meta", None)
        value = _get_text(meta, "MediaStorageSOPInstanceUID") if meta is not None else ""
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
    """Return an attribute as text, decoded with the dataset's character set; '' if absent."""
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
        value = value.decode("latin-1", errors="replace")
    text = str(value)
    return text.rstrip("\x00").strip()


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


def _clean_text(value: str, vr: str, max_len: int) -> str:
    value = "".join(c for c in value if c.isprintable()).replace("\\", " ")
    if vr == "DA":
        return value if _DATE_RE.match(value) and _valid_date(value) else ""
    if vr == "TM":
        return value if _TIME_RE.match(value) and _valid_time(value) else ""
    if vr == "AS":
        return value if _AGE_RE.match(value) else ""
    if vr == "CS":
        value = value.upper()
        return value if value in {"M", "F", "O"} and _CS_RE.match(value) else ""
    if vr == "PN":
        groups = value.split("=")[:3]
        cleaned = ["^".join(part[:max_len] for part in g.split("^")[:5]) for g in groups]
        return "=".join(cleaned).rstrip("=^")
    return value[:max_len]


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


def _try_decode(source: Dataset, result: CascadeResult) -> imaging.SourceImage | None:
    """Decode the display image; None when it cannot be decoded."""
    if "PixelData" not in source and "FloatPixelData" not in source:
        return None
    try:
        return imaging.decode(source)
    except Exception as exc:
        log = logger.info if result.status is Status.NOT_PROCESSED else logger.warning
        log("no overlay for %s: pixels do not decode (%s)", result.sop_instance_uid, exc)
        return None


def _n_frames(source: Dataset) -> int:
    try:
        return int(source.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _frame_number(source: Dataset, image: imaging.SourceImage | None) -> int | None:
    """1-based frame the findings refer to, for multi-frame sources; None otherwise."""
    if _n_frames(source) <= 1:
        return None
    return (image.frame if image is not None else 0) + 1

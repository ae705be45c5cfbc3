"""The gate: is this a spine radiograph the models can read?

Two checks, both with reasons a radiologist understands:

* tag rules (:func:`check_tags`), before any pixel decoding: modality, SOP class, body part,
  image type, size;
* a content check (:class:`ContentGate`): Mahalanobis distance of the ensemble's pooled
  embeddings (standardised, PCA to at most 32 dimensions, shrunk inverse covariance) against
  statistics fitted on training images (:func:`fit_gate`); images farther than a high quantile
  of the training distances are refused.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from spine_node.sop_classes import RADIOGRAPH_CLASSES

log = logging.getLogger(__name__)

#: Modalities of projection radiographs (missing Modality is allowed: VinDr files lack it).
ALLOWED_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})

_MODALITY_WORDS: Mapping[str, str] = {
    "CT": "CT image",
    "MR": "MR image",
    "US": "ultrasound image",
    "NM": "nuclear medicine image",
    "PT": "PET image",
    "MG": "mammogram",
    "XA": "angiography (XA) image",
    "RF": "fluoroscopy (RF) image",
    "IO": "intra-oral dental image",
    "PX": "panoramic dental image",
    "SR": "structured report",
    "PR": "presentation state",
    "KO": "key object selection",
    "SEG": "segmentation",
    "OP": "ophthalmic photograph",
    "XC": "photograph",
    "ES": "endoscopy image",
    "ECG": "ECG waveform",
    "BMD": "bone densitometry image",
}

#: SOP classes whose pixel data can be a spine radiograph (missing SOP Class UID is allowed):
#: the receiver's list, one definition.
ALLOWED_SOP_CLASSES: Mapping[str, str] = RADIOGRAPH_CLASSES

#: Body-part spellings (normalised: upper case, no spaces, hyphens, underscores, dots) for spine.
SPINE_BODY_PARTS = frozenset(
    {
        "SPINE",
        "CSPINE",
        "TSPINE",
        "LSPINE",
        "SSPINE",
        "CTSPINE",
        "TLSPINE",
        "LSSPINE",
        "WHOLESPINE",
        "FULLSPINE",
        "CERVICALSPINE",
        "THORACICSPINE",
        "LUMBARSPINE",
        "SACRALSPINE",
        "LUMBOSACRALSPINE",
        "THORACOLUMBARSPINE",
        "CERVICOTHORACICSPINE",
        "LUMBAR",
        "CERVICAL",
        "THORACOLUMBAR",
        "LUMBOSACRAL",
        "SACRUM",
        "COCCYX",
        "SACROCOCCYX",
        "VERTEBRA",
        "VERTEBRAE",
        "COLUMNA",
        "COLUMNAVERTEBRAL",
        "COLUMNALUMBAR",
        "COLUNA",
        "COLUNAVERTEBRAL",
        "WIRBELSAEULE",
        "WIRBELSÄULE",
        "LWS",
        "BWS",
        "HWS",
        "RACHIS",
        "RACHISLOMBAIRE",
        "RACHISCERVICAL",
        "COLONNA",
        "COLONNAVERTEBRALE",
        "COLONNALOMBARE",
        "CERVICALE",
        "LOMBARE",
        "WERVELKOLOM",
    }
)
_SPINE_STEMS = ("SPINE", "WIRBEL", "RACHIS", "COLONNA", "COLUMNA", "VERTEBR", "LUMB")

#: Body parts that are clearly not a spine examination.
NON_SPINE_BODY_PARTS = frozenset(
    {
        "CHEST",
        "THORAX",
        "BREAST",
        "LUNG",
        "HEART",
        "HAND",
        "FINGER",
        "THUMB",
        "WRIST",
        "FOREARM",
        "ELBOW",
        "ARM",
        "UPPERARM",
        "HUMERUS",
        "SHOULDER",
        "CLAVICLE",
        "SCAPULA",
        "RIB",
        "RIBS",
        "STERNUM",
        "SKULL",
        "HEAD",
        "BRAIN",
        "FACE",
        "JAW",
        "MANDIBLE",
        "TMJ",
        "SINUS",
        "NOSE",
        "ORBIT",
        "EYE",
        "EAR",
        "TEETH",
        "TOOTH",
        "DENTAL",
        "HIP",
        "FEMUR",
        "KNEE",
        "PATELLA",
        "LEG",
        "LOWERLEG",
        "TIBIA",
        "FIBULA",
        "ANKLE",
        "FOOT",
        "HEEL",
        "CALCANEUS",
        "TOE",
        "EXTREMITY",
        "UPPEREXTREMITY",
        "LOWEREXTREMITY",
        "ABDOMEN",
        "PELVIS",
        "BLADDER",
        "KIDNEY",
        "COLON",
        "STOMACH",
        "THORAXABDOMEN",
    }
)

MIN_SHORT_SIDE = 256
#: Minimum patient age (years) of the intended use when a bundle's manifest does not say
#: (the VinDr-SpineXR method was developed on adults, as cleared spine radiograph AI is).
DEFAULT_MIN_AGE_YEARS = 18.0
#: Ages above this are taken as a wrong value, not as a very old patient.
_MAX_PLAUSIBLE_AGE_YEARS = 150.0
_AS_UNITS = {"D": 365.25, "W": 365.25 / 7.0, "M": 12.0, "Y": 1.0}
_AS_WORDS = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}
_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True)
class GateDecision:
    """Outcome of a gate check.

    Attributes
    ----------
    accepted : bool
        True when the image may go on to the models.
    reason : str or None
        Why it was refused (a sentence a radiologist understands).
    notes : tuple of str
        What was noticed but allowed (e.g. a FOR PROCESSING image).
    """

    accepted: bool
    reason: str | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.accepted and not self.reason:
            raise ValueError("a refused GateDecision needs a reason")


@dataclass(frozen=True)
class PatientAge:
    """The patient's age at the examination.

    Attributes
    ----------
    years : float
        Age in years (fractions for ages given in days, weeks or months).
    text : str
        The age in words as it was given ("12 years", "6 months").
    source : str
        Where it came from: "Patient's Age" or "birth date and study date".
    """

    years: float
    text: str
    source: str


def patient_age(ds: pydicom.Dataset) -> PatientAge | None:
    """The patient's age from Patient's Age (AS), else from Birth Date and the study date.

    Patient's Age (0010,1010) is ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY`` (PS3.5 6.2). Without
    a usable one, whole years between Patient's Birth Date and the first of Study, Series,
    Acquisition or Content Date are used. Unparsable, future or implausible values (over
    150 years) count as unknown.

    Returns
    -------
    PatientAge or None
        None when the age cannot be known from the header.
    """
    raw = _text(ds, "PatientAge").upper()
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY])", raw)
    if match:
        number, unit = int(match.group(1)), match.group(2)
        years = number / _AS_UNITS[unit]
        if years <= _MAX_PLAUSIBLE_AGE_YEARS:
            return PatientAge(years, f"{number} {_AS_WORDS[unit]}", "Patient's Age")
    birth = _date(_text(ds, "PatientBirthDate"))
    exam = next(
        (d for d in (_date(_text(ds, k)) for k in _DATE_KEYWORDS) if d is not None), None
    )
    if birth is None or exam is None or exam < birth:
        return None
    whole = exam.year - birth.year - ((exam.month, exam.day) < (birth.month, birth.day))
    if whole > _MAX_PLAUSIBLE_AGE_YEARS:
        return None
    return PatientAge(float(whole), f"{whole} years", "birth date and study date")


def _date(value: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        return None


def check_age(ds: pydicom.Dataset, min_age_years: float) -> GateDecision:
    """The age part of the intended use.

    Parameters
    ----------
    ds : pydicom.Dataset
    min_age_years : float
        Minimum age in years (the bundle's ``min_patient_age_years``); 0 means no limit.

    Returns
    -------
    GateDecision
        Refused, "outside the intended use (age ...)", for a younger patient; accepted with
        the note "patient age unknown ..." when the header gives no age; accepted otherwise.
    """
    if min_age_years < 0:
        raise ValueError(f"min_age_years must be >= 0, got {min_age_years!r}")
    if min_age_years == 0:
        return GateDecision(True)
    age = patient_age(ds)
    if age is None:
        return GateDecision(
            True,
            notes=(
                f"patient age unknown (the intended use is patients aged {min_age_years:g} "
                "years or older)",
            ),
        )
    if age.years < min_age_years:
        return GateDecision(
            False,
            f"outside the intended use (age {age.text}; for patients aged {min_age_years:g} "
            "years or older)",
        )
    return GateDecision(True)


def normalise_body_part(value: str) -> str:
    """Upper-case a BodyPartExamined value and drop spaces, hyphens, underscores and dots."""
    return re.sub(r"[\s\-_.,/]+", "", str(value)).upper()


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def check_tags(
    ds: pydicom.Dataset,
    *,
    min_short_side: int = MIN_SHORT_SIDE,
    min_age_years: float = DEFAULT_MIN_AGE_YEARS,
    intended_modalities: Collection[str] | None = None,
) -> GateDecision:
    """Apply the tag rules, before any pixel data is decoded.

    Parameters
    ----------
    ds : pydicom.Dataset
        The received dataset (pixel data untouched).
    min_short_side : int
        Smallest acceptable short side in pixels.
    min_age_years : float
        Minimum patient age of the intended use (:func:`check_age`; 0: no limit).
    intended_modalities : Collection[str], optional
        Modalities of the intended use (setting ``intended_modalities``): a radiograph of
        another modality is "outside the intended use (modality ...)". None: any of
        :data:`ALLOWED_MODALITIES`.

    Returns
    -------
    GateDecision
    """
    if not isinstance(ds, pydicom.Dataset):
        raise TypeError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    notes: list[str] = []

    modality = _text(ds, "Modality").upper()
    if modality and modality not in ALLOWED_MODALITIES:
        what = _MODALITY_WORDS.get(modality, f"{modality} image")
        return GateDecision(False, f"{what}, not a radiograph")
    intended = None if intended_modalities is None else [m.upper() for m in intended_modalities]
    if modality and intended is not None and modality not in intended:
        return GateDecision(
            False,
            f"outside the intended use (modality {modality}; intended: {', '.join(intended)})",
        )

    sop_class = _text(ds, "SOPClassUID")
    if sop_class and sop_class not in ALLOWED_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name
        return GateDecision(False, f"{name} object, not a radiograph")

    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return GateDecision(False, "localizer (scout) image, not a diagnostic radiograph")

    age = check_age(ds, min_age_years)
    if not age.accepted:
        return age
    notes.extend(age.notes)

    body = _text(ds, "BodyPartExamined")
    if body:
        norm = normalise_body_part(body)
        if norm in SPINE_BODY_PARTS or any(stem in norm for stem in _SPINE_STEMS):
            pass
        elif norm in NON_SPINE_BODY_PARTS:
            return GateDecision(False, f"body part {body.upper()}, not spine")
        else:
            notes.append(f"body part {body!r} not recognised as spine; image content decides")

    intent = _text(ds, "PresentationIntentType").upper()
    if intent == "FOR PROCESSING" or sop_class == "1.2.840.10008.5.1.4.1.1.1.1.1":
        notes.append(
            "FOR PROCESSING image (unprocessed detector data): results may be less reliable"
        )

    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is not None and cols is not None:
        short = min(int(rows), int(cols))
        if short < min_short_side:
            return GateDecision(
                False,
                f"image too small ({int(cols)} x {int(rows)} pixels; the short side must be at "
                f"least {min_short_side})",
            )
    frames = ds.get("NumberOfFrames")
    if frames is not None and str(frames).strip() not in ("", "1"):
        notes.append(f"multi-frame image ({frames} frames): only the first frame is analysed")
    return GateDecision(True, None, tuple(notes))


def fit_gate(
    embeddings: np.ndarray,
    quantile: float = 0.995,
    *,
    max_dims: int = 32,
    shrinkage: float = 0.1,
) -> tuple[dict[str, np.ndarray], float]:
    """Fit content-gate statistics on training-image embeddings.

    Features are standardised (so no member dominates), projected by PCA to
    ``min(max_dims, (n - 1) // 4, D)`` dimensions (at least 1); the covariance in PCA space is shrunk towards its
    mean variance (``(1 - s) C + s * tr(C)/k * I``) and inverted.

    Parameters
    ----------
    embeddings : numpy.ndarray
        ``(N, D)`` pooled member embeddings of training images (N >= 3).
    quantile : float
        Quantile of the training distances used as the refusal threshold.
    max_dims : int
        Upper bound on the PCA dimensions.
    shrinkage : float
        Covariance shrinkage in [0, 1].

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        ``feature_mean``, ``feature_scale``, ``components``, ``mean``, ``precision``
        (save with ``numpy.savez``).
    threshold : float
        The ``quantile`` of the training images' cross-fitted distances (5-fold when
        N >= 8: each image scored by statistics fitted without it).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite (N >= 3, D) array, got shape {x.shape}")
    if not 0.5 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0.5, 1], got {quantile!r}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
    if max_dims < 1:
        raise ValueError(f"max_dims must be positive, got {max_dims!r}")
    arrays = _fit_arrays(x, max_dims, shrinkage)
    # Threshold from cross-fitted distances (each image scored by statistics fitted without
    # it), so it reflects unseen in-distribution images, not the optimistic in-sample fit.
    folds = min(5, x.shape[0] // 4)
    if folds >= 2:
        order = np.random.default_rng(0).permutation(x.shape[0])
        held_out = np.empty(x.shape[0])
        for part in np.array_split(order, folds):
            train = np.setdiff1d(order, part)
            held_out[part] = _distances(_fit_arrays(x[train], max_dims, shrinkage), x[part])
    else:
        held_out = _distances(arrays, x)
    threshold = float(np.quantile(held_out, quantile))
    return arrays, threshold


def _fit_arrays(x: np.ndarray, max_dims: int, shrinkage: float) -> dict[str, np.ndarray]:
    feature_mean = x.mean(axis=0)
    feature_scale = x.std(axis=0)
    # Floor the scale so near-constant features (dead ReLUs) are not blown up into noise.
    floor = max(0.1 * float(np.median(feature_scale)), 1e-6)
    feature_scale = np.maximum(feature_scale, floor)
    z = (x - feature_mean) / feature_scale
    # At most one dimension per four images, so the covariance is estimated, not memorised.
    k = int(max(1, min(max_dims, (x.shape[0] - 1) // 4, x.shape[1])))
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    components = vt[:k]
    p = z @ components.T
    mean = p.mean(axis=0)
    cov = np.cov(p, rowvar=False).reshape(k, k)
    target = np.trace(cov) / k
    cov = (1.0 - shrinkage) * cov + shrinkage * target * np.eye(k)
    precision = np.linalg.inv(cov + 1e-9 * np.eye(k))
    return {
        "feature_mean": feature_mean,
        "feature_scale": feature_scale,
        "components": components,
        "mean": mean,
        "precision": precision,
    }


def _distances(arrays: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64) - arrays["feature_mean"]) / arrays["feature_scale"]
    d = z @ arrays["components"].T - arrays["mean"]
    m2 = np.einsum("ij,jk,ik->i", d, arrays["precision"], d)
    return np.sqrt(np.maximum(m2, 0.0))


class ContentGate:
    """Out-of-distribution check on pooled member embeddings.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Statistics from :func:`fit_gate`.
    threshold : float
        Distance above which an image is refused (from the manifest).
    """

    _KEYS = ("feature_mean", "feature_scale", "components", "mean", "precision")

    def __init__(self, arrays: Mapping[str, np.ndarray], threshold: float) -> None:
        missing = [k for k in self._KEYS if k not in arrays]
        if missing:
            raise ValueError(f"gate statistics lack {missing}")
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}")
        self.arrays = {k: np.asarray(arrays[k], dtype=np.float64) for k in self._KEYS}
        self.threshold = float(threshold)
        self.dims = int(self.arrays["feature_mean"].shape[0])

    @classmethod
    def load(cls, path: Path, threshold: float) -> ContentGate:
        """Read statistics saved by ``numpy.savez`` (no pickles)."""
        with np.load(Path(path), allow_pickle=False) as data:
            arrays: dict[str, Any] = {k: data[k] for k in data.files}
        return cls(arrays, threshold)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Return the OOD distance of each row of ``embeddings`` ``(N, D)``."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dims:
            raise ValueError(f"embeddings must be (N, {self.dims}), got {x.shape}")
        return _distances(self.arrays, x)

    def decide(self, distance: float) -> GateDecision:
        """Turn one distance into a decision with a readable reason."""
        if not np.isfinite(distance) or distance > self.threshold:
            return GateDecision(
                False,
                "image content does not look like a spine radiograph "
                f"(out-of-distribution score {distance:.1f} > {self.threshold:.1f})",
            )
        return GateDecision(True)

"""What the node does with a received object, decided from its SOP class and modality.

Every object a sender stores is acknowledged; only radiographs of the intended use get a job.
The decision is made by SOP class (never by looking for pixel data):

* **radiograph classes** (:data:`RADIOGRAPH_CLASSES`: CR, DX for presentation / processing,
  Secondary Capture, multi-frame grayscale Secondary Capture) are images the models may read;
* **other image classes**: every standard storage class whose name ends in "Image Storage"
  (CT, MR, US, NM, PET, XA, RF, mammography, intra-oral, RT Image, VL, ...) is an image, but
  not a radiograph;
* **everything else is not an image**: SR of any kind (dose reports too), presentation states,
  key object selections, RT objects other than RT Image, encapsulated documents, raw data,
  segmentations, registrations, waveforms, and every private or unknown storage class.

An image is then in scope when its Modality is one of the intended modalities (CR and DX by
default; setting ``intended_modalities``); a radiograph class without Modality (VinDr files,
routers that strip it) is in scope; any other image class without Modality is out of scope.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID

__all__ = [
    "DICOM_ROOT",
    "RADIOGRAPH_CLASSES",
    "Category",
    "Classification",
    "class_name",
    "classify",
    "is_image_class",
    "is_storage_like",
]

#: SOP classes whose pixel data can be a spine radiograph.
RADIOGRAPH_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
#: Root of the UIDs defined by the DICOM standard; anything else is private.
DICOM_ROOT = "1.2.840.10008."
#: Every standard composite storage SOP class lives under this arc.
_STORAGE_ARC = "1.2.840.10008.5.1.4.1.1."


class Category(str, enum.Enum):
    """What the node does with a received object."""

    IMAGE = "image"
    """A radiograph of the intended use: queued for the models."""
    NOT_IMAGE = "not_image"
    """Not an image (SR, PR, KO, RT, documents, raw data, private classes): recorded only."""
    OUT_OF_SCOPE = "out_of_scope"
    """An image outside the intended use (modality or class): recorded; reported on request."""

    @property
    def label(self) -> str:
        """How ``status`` and the worklist name the category."""
        return _LABELS[self]

    def why(self, reason: str | None) -> str:
        """Why an object of this category is not analysed, in words: the category, then the
        classification's reason (e.g. "not an image: Basic Text SR Storage")."""
        words = _WHY[self]
        return f"{words}: {reason}" if reason else words


_LABELS = {
    Category.IMAGE: "image",
    Category.NOT_IMAGE: "ignored: not an image",
    Category.OUT_OF_SCOPE: "out of scope",
}


_WHY = {
    Category.IMAGE: "image",
    Category.NOT_IMAGE: "not an image",
    Category.OUT_OF_SCOPE: "out of scope",
}


@dataclass(frozen=True)
class Classification:
    """The category of one received object and why.

    Attributes
    ----------
    category : Category
    reason : str or None
        Why the object is not processed (None for :attr:`Category.IMAGE`).
    """

    category: Category
    reason: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.category, Category):
            raise TypeError(f"category must be a Category, got {type(self.category).__name__}")
        if self.category is not Category.IMAGE and not self.reason:
            raise ValueError(f"a {self.category.value} classification needs a reason")

    def to_json(self) -> dict[str, Any]:
        """JSON form (audit records)."""
        return {"category": self.category.value, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Classification:
        """Inverse of :meth:`to_json`."""
        return cls(Category(data["category"]), data.get("reason"))


def class_name(sop_class_uid: str) -> str:
    """A readable name of a SOP class: the standard name, or "private SOP class <uid>"."""
    uid = UID(str(sop_class_uid).strip())
    if not uid.startswith(DICOM_ROOT):
        return f"private SOP class {uid}"
    name = uid.name
    return name if name != str(uid) else f"SOP class {uid}"


def is_image_class(sop_class_uid: str) -> bool:
    """True for a radiograph class or a standard class named "... Image Storage"."""
    uid = str(sop_class_uid).strip()
    if uid in RADIOGRAPH_CLASSES:
        return True
    return uid.startswith(DICOM_ROOT) and "Image Storage" in UID(uid).name


def is_storage_like(sop_class_uid: str) -> bool:
    """True for a SOP class that may be accepted as an unknown storage class.

    A syntactically valid UID that is private (outside ``1.2.840.10008``) or a standard
    composite storage class (``1.2.840.10008.5.1.4.1.1.*``). Standard non-storage services
    (query/retrieve, worklist, print, ...) are never treated as storage.
    """
    uid = UID(str(sop_class_uid).strip())
    if not uid.is_valid:
        return False
    return not uid.startswith(DICOM_ROOT) or uid.startswith(_STORAGE_ARC)


def classify(
    sop_class_uid: str, modality: str, intended_modalities: Collection[str]
) -> Classification:
    """Decide what the node does with a received object.

    Parameters
    ----------
    sop_class_uid : str
        The object's SOP Class UID (the dataset's, else the C-STORE command's).
    modality : str
        The dataset's Modality ("" when absent).
    intended_modalities : Collection[str]
        Modalities of the intended use (setting ``intended_modalities``), upper case.

    Returns
    -------
    Classification
    """
    if not isinstance(sop_class_uid, str):
        raise TypeError(f"sop_class_uid must be a str, got {type(sop_class_uid).__name__}")
    uid = sop_class_uid.strip()
    if not is_image_class(uid):
        return Classification(Category.NOT_IMAGE, class_name(uid))
    mod = str(modality or "").strip().upper()
    intended = tuple(m.upper() for m in intended_modalities)
    if mod and mod not in intended:
        return Classification(
            Category.OUT_OF_SCOPE,
            f"modality {mod} is outside the intended use ({', '.join(intended) or 'none'})",
        )
    if not mod and uid not in RADIOGRAPH_CLASSES:
        return Classification(
            Category.OUT_OF_SCOPE, f"{class_name(uid)} without Modality: not a radiograph"
        )
    return Classification(Category.IMAGE)

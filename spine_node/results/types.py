"""Typed, immutable values passed between the cascade, the results builders and the worker."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spine_node.labels import (  # noqa: F401 - the vocabulary, re-exported for the results
    DISPLAY_LABELS,
    LESION_LABELS,
    MEYERDING_GRADES,
    display_label,
)

if TYPE_CHECKING:
    from spine_node.imaging import SourceImage


class Status(str, enum.Enum):
    """Outcome of the cascade for one image."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    NOT_PROCESSED = "not_processed"


@dataclass(frozen=True)
class Finding:
    """One detected lesion.

    Attributes
    ----------
    label : str
        VinDr label (one of ``LESION_LABELS``).
    score : float
        Detector confidence in [0, 1].
    box : tuple of float
        ``(xmin, ymin, xmax, ymax)`` in source-image pixel coordinates (column, row).
    grade : str or None
        Meyerding grade (one of ``MEYERDING_GRADES``, ``"I"`` .. ``"V"``) for
        spondylolisthesis findings, when graded.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    grade: str | None = None

    def __post_init__(self) -> None:
        if self.label not in LESION_LABELS:
            raise ValueError(f"Finding label must be one of {LESION_LABELS}, got {self.label!r}")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Finding score must be in [0, 1], got {self.score!r}")
        if len(self.box) != 4:
            raise ValueError(f"Finding box must have 4 values, got {self.box!r}")
        xmin, ymin, xmax, ymax = self.box
        if not (xmax > xmin and ymax > ymin):
            raise ValueError(f"Finding box must have xmax > xmin and ymax > ymin, got {self.box!r}")
        if self.grade is not None and self.grade not in MEYERDING_GRADES:
            raise ValueError(
                f"Finding grade must be None or one of {MEYERDING_GRADES}, got {self.grade!r}"
            )


@dataclass(frozen=True)
class ModelInfo:
    """What produced a result: identifies the model bundle in every output object.

    Attributes
    ----------
    name : str
        Bundle name (used as the device's model name).
    version : str
        Bundle version (part of every derived UID).
    demo : bool
        True for the phantom-trained demo bundle: every output object must say so.
    intended_use : str
        Free text from the manifest.
    parameters : Mapping[str, Any]
        Algorithm parameters worth recording (member weights, hashes, threshold, TTA views).
    analysis_revision : int
        1 normally; 2 and more when an image re-sent with other content (same SOP Instance
        UID) is analysed again. Part of the derived UIDs, so the new objects never collide
        with the ones already sent.
    """

    name: str
    version: str
    demo: bool = False
    intended_use: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    analysis_revision: int = 1


@dataclass(frozen=True)
class CascadeResult:
    """The cascade's answer for one image.

    Attributes
    ----------
    sop_instance_uid : str
        The source image's SOP Instance UID.
    status : Status
        positive, negative or not_processed.
    reason : str or None
        Why the image was not processed (required then), in words a radiologist understands.
    score : float or None
        Ensemble probability of "abnormal" (None when not processed).
    threshold : float or None
        The bundle's decision threshold (``triage.threshold`` in its manifest). Required and
        stated by the caller, never defaulted here: a positive or negative result needs it; a
        not_processed result has it when the bundle's value is passed, else None.
    findings : tuple of Finding
        Detected lesions (empty unless the detector ran).
    member_scores : Mapping[str, float]
        Per-member probabilities, keyed by member name.
    heatmap : Any
        Optional Grad-CAM heatmap (numpy array, source-image shape, values in [0, 1]).
    display : imaging.SourceImage or None
        The display image the cascade decoded (in the isolated decoder) for this result;
        the result builder draws the overlay on it, so the worker never decodes the source
        again. None when the image was refused before decoding or did not decode. Not part
        of ``to_json`` and not compared.
    notes : tuple of str
        What the gate noticed about the input but allowed, for the report (e.g. "patient age
        unknown (the intended use is patients aged 18 years or older)", a FOR PROCESSING
        image, a body part not recognised as spine).
    stage_seconds : Mapping[str, float]
        Seconds this image spent in each inference stage (:class:`spine_node.timing.Stage`
        values; a batch stage's time shared among the batch's images), for the metrics. Not
        part of ``to_json`` and not compared.
    """

    sop_instance_uid: str
    status: Status
    reason: str | None = None
    score: float | None = None
    findings: tuple[Finding, ...] = ()
    member_scores: Mapping[str, float] = field(default_factory=dict)
    heatmap: Any = None
    display: SourceImage | None = field(default=None, compare=False, repr=False)
    notes: tuple[str, ...] = ()
    threshold: float | None = field(kw_only=True)
    stage_seconds: Mapping[str, float] = field(
        default_factory=dict, compare=False, repr=False, kw_only=True
    )

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            raise TypeError(f"status must be a Status, got {type(self.status).__name__}")
        if self.status is Status.NOT_PROCESSED and not self.reason:
            raise ValueError("a not_processed result needs a reason")
        if self.status is not Status.NOT_PROCESSED and self.score is None:
            raise ValueError(f"a {self.status.value} result needs a score")
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score!r}")
        if self.threshold is None:
            if self.status is not Status.NOT_PROCESSED:
                raise ValueError(f"a {self.status.value} result needs the bundle's threshold")
        elif isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(self.threshold).__name__}")
        elif not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form used by ``spine-node analyze``, the database and webhooks."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "status": self.status.value,
            "reason": self.reason,
            "score": self.score,
            "threshold": self.threshold,
            "member_scores": dict(self.member_scores),
            "notes": list(self.notes),
            "findings": [
                {
                    "label": f.label,
                    "display_label": display_label(f.label),
                    "score": f.score,
                    "box": list(f.box),
                    "grade": f.grade,
                }
                for f in self.findings
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CascadeResult:
        """Rebuild a result from :meth:`to_json` output (``display`` and ``heatmap`` are not kept).

        Raises
        ------
        ValueError
            When a key is missing or a value is invalid (naming it).
        """
        try:
            return cls(
                sop_instance_uid=str(data["sop_instance_uid"]),
                status=Status(data["status"]),
                reason=data["reason"],
                score=None if data["score"] is None else float(data["score"]),
                threshold=None if data["threshold"] is None else float(data["threshold"]),
                findings=tuple(
                    Finding(
                        f["label"],
                        float(f["score"]),
                        (
                            float(f["box"][0]),
                            float(f["box"][1]),
                            float(f["box"][2]),
                            float(f["box"][3]),
                        ),
                        f["grade"],
                    )
                    for f in data["findings"]
                ),
                member_scores={str(k): float(v) for k, v in data["member_scores"].items()},
                notes=tuple(str(n) for n in data.get("notes", ())),  # absent before notes existed
            )
        except KeyError as exc:
            raise ValueError(f"result JSON has no {exc.args[0]!r}: {dict(data)!r}") from None


@dataclass(frozen=True)
class ResultRecord:
    """One image's stored result: what the worker records, the worklist ranks, ``export`` and
    ``demo`` list and the webhook posts (one JSON form, read in one place).

    Attributes
    ----------
    study_instance_uid : str
        The source image's study.
    result : CascadeResult
        The cascade's answer.
    objects : tuple of str
        SOP Instance UIDs of the result objects made for it (SR first).
    """

    study_instance_uid: str
    result: CascadeResult
    objects: tuple[str, ...] = ()

    @property
    def sop_instance_uid(self) -> str:
        """The source image's SOP Instance UID."""
        return self.result.sop_instance_uid

    def to_json(self) -> dict[str, Any]:
        """The result's JSON form plus ``study_instance_uid`` and ``objects``."""
        return {
            **self.result.to_json(),
            "study_instance_uid": self.study_instance_uid,
            "objects": list(self.objects),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultRecord:
        """Rebuild a record from :meth:`to_json` output.

        Raises
        ------
        ValueError
            When a key is missing or a value is invalid.
        """
        try:
            study, objects = str(data["study_instance_uid"]), data["objects"]
        except KeyError as exc:
            raise ValueError(f"result record has no {exc.args[0]!r}") from None
        return cls(study, CascadeResult.from_json(data), tuple(str(o) for o in objects))

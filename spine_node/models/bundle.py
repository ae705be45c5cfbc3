"""Model bundle: a directory with ``manifest.json`` and the files it names, each hash-checked.

Every number the cascade runs on (ensemble weights, threshold, TTA views, detector confidence
and IoU, gate threshold, preparation parameters) lives in the manifest, never in code.

Manifest layout (``format`` 1)::

    {
      "format": 1,
      "name": "...", "version": "...", "intended_use": "...", "demo": false,
      "min_patient_age_years": 18,
      "triage": {
        "members": [{"name", "arch", "kwargs", "weights", "sha256", "input_size",
                     "mean", "std", "onnx", "onnx_sha256"}, ...],
        "ensemble_weights": [0.42, 0.32, 0.26], "threshold": 0.478, "tta_views": 5
      },
      "detector": {"weights", "sha256", "class_names", "imgsz", "conf", "iou", "gate",
                   "soft_gate_min_score", "soft_nms", "soft_nms_sigma", "onnx", "onnx_sha256"},
      "gate": {"stats", "sha256", "threshold"} | null,
      "grader": {"weights", "sha256", "crop_size"} | null,
      "prep": {PrepParams fields},
      "metrics": {...},
      "score_reference": {"statistic", "bin_edges", "counts", "n", "source",
                          "positive_rate"} | null,
      "precision_checks": [{PrecisionCheck fields}, ...]
    }

``score_reference`` is the ensemble score's distribution on the validation split
(:class:`spine_node.drift.ScoreReference`), the reference of the node's drift monitoring;
a bundle without it works, and drift then reads "no reference".

Triage members take the prepared grey image repeated to three channels (``in_chans=3``), so
ImageNet weights load unchanged; training and serving share this convention
(:class:`spine_node.models.triage.TriageMember`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from spine_node.drift import ScoreReference
from spine_node.labels import LESION_LABELS

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
GATE_MODES = ("hard", "soft")
_PREP_KEYS = frozenset({"triage_size", "detect_size", "clip_limit", "tiles", "max_pixels"})


class BundleError(RuntimeError):
    """The model bundle is unusable: one sentence naming the file and what is wrong with it."""


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


def _check_name(value: str, argument: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{argument} must be a non-empty string, got {value!r}")
    if Path(value).name != value or value in (".", ".."):
        raise ValueError(f"{argument} must be a plain file name inside the bundle, got {value!r}")


def _check_sha(value: str, argument: str) -> None:
    if (
        not isinstance(value, str)
        or len(value) != 64
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise ValueError(f"{argument} must be 64 lower-case hex digits, got {value!r}")


def _check_unit(value: float, argument: str, *, closed_low: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a number in [0, 1], got {value!r}")
    if not (0.0 <= value <= 1.0) or (not closed_low and value == 0.0):
        raise ValueError(f"{argument} must be in {'[' if closed_low else '('}0, 1], got {value!r}")


def _check_optional_pair(name: str | None, sha: str | None, argument: str) -> None:
    if (name is None) != (sha is None):
        raise ValueError(f"{argument} and {argument}_sha256 must be given together, got {name!r}")
    if name is not None and sha is not None:
        _check_name(name, argument)
        _check_sha(sha, f"{argument}_sha256")


@dataclass(frozen=True)
class MemberSpec:
    """One triage member of the ensemble.

    Attributes
    ----------
    name : str
        Unique member name (``"densenet"``, ``"efficientnet"``, ``"resnet"``).
    arch : str
        timm architecture, e.g. ``"densenet121"``.
    kwargs : Mapping[str, Any]
        Extra ``timm.create_model`` keyword arguments (the demo bundle shrinks models this way).
    weights : str
        File name inside the bundle (``torch.save`` state_dict or ``.safetensors``).
    sha256 : str
        SHA-256 of ``weights``.
    input_size : int
        Square input side in pixels (384 in the method).
    mean, std : tuple of float
        Per-channel normalisation from the member's pretrained config.
    onnx, onnx_sha256 : str or None
        ONNX export of the member (``TriageMember`` graph: grey [0, 1] in, logit + embedding out).
    """

    name: str
    arch: str
    kwargs: Mapping[str, Any]
    weights: str
    sha256: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    onnx: str | None = None
    onnx_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"member name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"member arch must be a non-empty string, got {self.arch!r}")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"member kwargs must be a mapping, got {type(self.kwargs).__name__}")
        object.__setattr__(self, "kwargs", _frozen(self.kwargs))
        _check_name(self.weights, "weights")
        _check_sha(self.sha256, "sha256")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise TypeError(f"input_size must be an int, got {type(self.input_size).__name__}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size!r}")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ValueError(f"{label} must have 3 values, got {values!r}")
            object.__setattr__(self, label, tuple(float(v) for v in values))
        if any(v <= 0 for v in self.std):
            raise ValueError(f"std values must be positive, got {self.std!r}")
        _check_optional_pair(self.onnx, self.onnx_sha256, "onnx")


@dataclass(frozen=True)
class DetectorSpec:
    """The lesion detector (ultralytics YOLO checkpoint) and its inference settings.

    Attributes
    ----------
    weights, sha256 : str
        Ultralytics ``.pt`` checkpoint inside the bundle and its SHA-256.
    class_names : tuple of str
        Class names in class-id order (``LESION_LABELS``).
    imgsz : int
        Letterbox size the detector runs at (640 in the method).
    conf : float
        Confidence threshold (0.25).
    iou : float
        Class-wise NMS IoU threshold (0.5).
    gate : str
        ``"hard"``: run only on triage-positive images; ``"soft"``: run on every processed
        image, but below the triage threshold keep only boxes scoring >= ``soft_gate_min_score``.
    soft_gate_min_score : float
        Box score kept below the threshold in soft-gate mode (0.5).
    soft_nms : bool
        Class-aware Gaussian Soft-NMS instead of hard class-wise NMS.
    soft_nms_sigma : float
        Gaussian Soft-NMS sigma.
    onnx, onnx_sha256 : str or None
        ONNX export of the raw detection head ``(N, 4 + nc, anchors)``.
    """

    weights: str
    sha256: str
    class_names: tuple[str, ...]
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.5
    gate: str = "hard"
    soft_gate_min_score: float = 0.5
    soft_nms: bool = False
    soft_nms_sigma: float = 0.5
    onnx: str | None = None
    onnx_sha256: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.weights, "detector weights")
        _check_sha(self.sha256, "detector sha256")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        unknown = [c for c in self.class_names if c not in LESION_LABELS]
        if not self.class_names or unknown:
            raise ValueError(f"class_names must be VinDr lesion labels, got {self.class_names!r}")
        if isinstance(self.imgsz, bool) or not isinstance(self.imgsz, int) or self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32, got {self.imgsz!r}")
        _check_unit(self.conf, "conf")
        _check_unit(self.iou, "iou", closed_low=False)
        if self.gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {GATE_MODES}, got {self.gate!r}")
        _check_unit(self.soft_gate_min_score, "soft_gate_min_score")
        if not isinstance(self.soft_nms, bool):
            raise TypeError(f"soft_nms must be a bool, got {type(self.soft_nms).__name__}")
        if not (isinstance(self.soft_nms_sigma, int | float) and self.soft_nms_sigma > 0):
            raise ValueError(f"soft_nms_sigma must be positive, got {self.soft_nms_sigma!r}")
        _check_optional_pair(self.onnx, self.onnx_sha256, "onnx")


@dataclass(frozen=True)
class GateSpec:
    """Content-gate statistics fitted on training-set embeddings.

    Attributes
    ----------
    stats, sha256 : str
        ``.npz`` file (see :func:`spine_node.models.gate.fit_gate`) and its SHA-256.
    threshold : float
        Out-of-distribution distance above which an image is refused.
    """

    stats: str
    sha256: str
    threshold: float

    def __post_init__(self) -> None:
        _check_name(self.stats, "gate stats")
        _check_sha(self.sha256, "gate sha256")
        if not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold)):
            raise ValueError(f"gate threshold must be a finite number, got {self.threshold!r}")
        if self.threshold <= 0:
            raise ValueError(f"gate threshold must be positive, got {self.threshold!r}")


@dataclass(frozen=True)
class GraderSpec:
    """Optional Meyerding grader (HOG + random forest) for spondylolisthesis findings."""

    weights: str
    sha256: str
    crop_size: int = 128

    def __post_init__(self) -> None:
        _check_name(self.weights, "grader weights")
        _check_sha(self.sha256, "grader sha256")
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int):
            raise TypeError(f"crop_size must be an int, got {type(self.crop_size).__name__}")
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be at least 16, got {self.crop_size!r}")


#: Agreement a reduced precision must keep with fp32 on the held-out split (issue 13): the same
#: triage call for every image, member probabilities within 0.02, detector mAP@0.5 within 0.01.
PRECISION_TOLERANCES: Mapping[str, float] = MappingProxyType(
    {"member_probability": 0.02, "map50": 0.01}
)


@dataclass(frozen=True)
class PrecisionCheck:
    """One agreement check of a reduced precision against fp32, recorded in the manifest.

    Written by ``spine-train check-precision`` (the demo build runs it); the node uses
    ``precision`` on ``backend`` / ``device`` only when a check for them ``passed``.

    Attributes
    ----------
    precision : str
        The precision checked (``"bf16"``, ``"fp16"``).
    backend : str
        ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
    device : str
        Device kind, ``"cpu"`` or ``"cuda"``.
    passed : bool
        Every tolerance held.
    n_images : int
        Images of the split compared.
    triage_calls_changed : int
        Images whose triage call (score >= threshold) differs from fp32's.
    max_member_probability_diff : float
        Largest absolute difference of a member's TTA-averaged probability.
    map50_fp32, map50 : float or None
        Detector mAP@0.5 (COCO 101-point, every class with ground truth) at fp32 and at
        ``precision``; None when the split has no boxes.
    tolerances : Mapping[str, float]
        ``member_probability`` and ``map50`` limits used.
    data : str
        What the split was.
    checked_at : str
        ISO 8601 time of the check.
    """

    precision: str
    backend: str
    device: str
    passed: bool
    n_images: int
    triage_calls_changed: int
    max_member_probability_diff: float
    map50_fp32: float | None
    map50: float | None
    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(PRECISION_TOLERANCES))
    data: str = ""
    checked_at: str = ""

    def __post_init__(self) -> None:
        for label in ("precision", "backend", "device"):
            value = getattr(self, label)
            if not isinstance(value, str) or not value:
                raise ValueError(f"precision check {label} must be a non-empty string, got {value!r}")
        if not isinstance(self.passed, bool):
            raise TypeError(f"precision check passed must be a bool, got {type(self.passed).__name__}")
        for label in ("n_images", "triage_calls_changed"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"precision check {label} must be an int >= 0, got {value!r}")
        object.__setattr__(self, "tolerances", _frozen(self.tolerances))

    @property
    def map50_delta(self) -> float | None:
        """``|map50 - map50_fp32|`` (None when either is None)."""
        if self.map50 is None or self.map50_fp32 is None:
            return None
        return abs(self.map50 - self.map50_fp32)

    def summary(self) -> str:
        """One line: what was compared and what was found."""
        delta = self.map50_delta
        return (
            f"{self.precision} on {self.backend} ({self.device}), {self.n_images} images: "
            f"{self.triage_calls_changed} triage calls changed, member probabilities within "
            f"{self.max_member_probability_diff:.4f}, mAP@0.5 "
            + ("not measured" if delta is None else f"{self.map50:.4f} vs {self.map50_fp32:.4f}")
        )

    def to_json(self) -> dict[str, Any]:
        """The check as stored in ``manifest.json``."""
        return {
            "precision": self.precision,
            "backend": self.backend,
            "device": self.device,
            "passed": self.passed,
            "n_images": self.n_images,
            "triage_calls_changed": self.triage_calls_changed,
            "max_member_probability_diff": self.max_member_probability_diff,
            "map50_fp32": self.map50_fp32,
            "map50": self.map50,
            "tolerances": dict(self.tolerances),
            "data": self.data,
            "checked_at": self.checked_at,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PrecisionCheck:
        """Inverse of :meth:`to_json`."""
        return cls(
            precision=document["precision"],
            backend=document["backend"],
            device=document["device"],
            passed=document["passed"],
            n_images=document["n_images"],
            triage_calls_changed=document["triage_calls_changed"],
            max_member_probability_diff=float(document["max_member_probability_diff"]),
            map50_fp32=document.get("map50_fp32"),
            map50=document.get("map50"),
            tolerances=document.get("tolerances") or dict(PRECISION_TOLERANCES),
            data=document.get("data", ""),
            checked_at=document.get("checked_at", ""),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the cascade needs to know about one model bundle."""

    name: str
    version: str
    intended_use: str
    demo: bool
    members: tuple[MemberSpec, ...]
    ensemble_weights: tuple[float, ...]
    threshold: float
    tta_views: int
    detector: DetectorSpec
    gate: GateSpec | None
    prep: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    grader: GraderSpec | None = None
    #: Minimum patient age of the intended use, in years (0: none). Manifests without the key
    #: get 18 (the VinDr-SpineXR method was developed on adults).
    min_patient_age_years: float = 18.0
    #: Distribution of the ensemble score on the validation split, for drift monitoring
    #: (``score_reference`` in manifest.json; None: the bundle has none).
    score_reference: ScoreReference | None = None
    #: Agreement checks of reduced precisions against fp32 (``spine-train check-precision``).
    precision_checks: tuple[PrecisionCheck, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision_checks", tuple(self.precision_checks))
        if not all(isinstance(c, PrecisionCheck) for c in self.precision_checks):
            raise TypeError("precision_checks must hold PrecisionCheck values")
        for label in ("name", "version"):
            value = getattr(self, label)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} must be a non-empty string, got {value!r}")
        if not isinstance(self.demo, bool):
            raise TypeError(f"demo must be a bool, got {type(self.demo).__name__}")
        age = self.min_patient_age_years
        if isinstance(age, bool) or not isinstance(age, int | float):
            raise TypeError(f"min_patient_age_years must be a number, got {type(age).__name__}")
        if not 0 <= age <= 150:
            raise ValueError(f"min_patient_age_years must be in [0, 150], got {age!r}")
        object.__setattr__(self, "min_patient_age_years", float(age))
        if self.score_reference is not None and not isinstance(
            self.score_reference, ScoreReference
        ):
            raise TypeError(
                "score_reference must be a ScoreReference or None, got "
                f"{type(self.score_reference).__name__}"
            )
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members or not all(isinstance(m, MemberSpec) for m in self.members):
            raise ValueError("members must be a non-empty sequence of MemberSpec")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names!r}")
        weights = tuple(float(w) for w in self.ensemble_weights)
        object.__setattr__(self, "ensemble_weights", weights)
        if len(weights) != len(self.members):
            raise ValueError(
                f"ensemble_weights must have one weight per member ({len(self.members)}), "
                f"got {weights!r}"
            )
        if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"ensemble_weights must be non-negative and sum to 1, got {weights!r}")
        _check_unit(self.threshold, "threshold")
        if isinstance(self.tta_views, bool) or not isinstance(self.tta_views, int):
            raise TypeError(f"tta_views must be an int, got {type(self.tta_views).__name__}")
        if not 1 <= self.tta_views <= 5:
            raise ValueError(f"tta_views must be between 1 and 5, got {self.tta_views!r}")
        if not isinstance(self.detector, DetectorSpec):
            raise TypeError(f"detector must be a DetectorSpec, got {type(self.detector).__name__}")
        unknown = set(self.prep) - _PREP_KEYS
        if unknown:
            raise ValueError(
                f"prep has unknown keys {sorted(unknown)}; allowed {sorted(_PREP_KEYS)}"
            )
        object.__setattr__(self, "prep", _frozen(self.prep))
        object.__setattr__(self, "metrics", _frozen(self.metrics))
        triage_size = self.prep.get("triage_size", 384)
        for member in self.members:
            if member.input_size != triage_size:
                raise ValueError(
                    f"member {member.name} input_size {member.input_size} differs from "
                    f"prep triage_size {triage_size}"
                )
        if self.detector.imgsz != self.prep.get("detect_size", 640):
            raise ValueError(
                f"detector imgsz {self.detector.imgsz} differs from prep detect_size "
                f"{self.prep.get('detect_size', 640)}"
            )

    def precision_check(self, precision: str, backend: str, device: str) -> PrecisionCheck | None:
        """The last recorded check of ``precision`` on ``backend`` and ``device`` kind, if any."""
        found = [
            c
            for c in self.precision_checks
            if (c.precision, c.backend, c.device) == (precision, backend, device)
        ]
        return found[-1] if found else None

    def files(self) -> list[tuple[str, str, str]]:
        """Return ``(role, file name, sha256)`` for every file the manifest names."""
        out: list[tuple[str, str, str]] = []
        for m in self.members:
            out.append((f"triage member {m.name} weights", m.weights, m.sha256))
            if m.onnx and m.onnx_sha256:
                out.append((f"triage member {m.name} ONNX export", m.onnx, m.onnx_sha256))
        d = self.detector
        out.append(("detector weights", d.weights, d.sha256))
        if d.onnx and d.onnx_sha256:
            out.append(("detector ONNX export", d.onnx, d.onnx_sha256))
        if self.gate is not None:
            out.append(("gate statistics", self.gate.stats, self.gate.sha256))
        if self.grader is not None:
            out.append(("Meyerding grader", self.grader.weights, self.grader.sha256))
        return out

    def to_json(self) -> dict[str, Any]:
        """Return the ``manifest.json`` document."""
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "intended_use": self.intended_use,
            "demo": self.demo,
            "min_patient_age_years": self.min_patient_age_years,
            "triage": {
                "members": [
                    {
                        "name": m.name,
                        "arch": m.arch,
                        "kwargs": _jsonable(m.kwargs),
                        "weights": m.weights,
                        "sha256": m.sha256,
                        "input_size": m.input_size,
                        "mean": list(m.mean),
                        "std": list(m.std),
                        "onnx": m.onnx,
                        "onnx_sha256": m.onnx_sha256,
                    }
                    for m in self.members
                ],
                "ensemble_weights": list(self.ensemble_weights),
                "threshold": self.threshold,
                "tta_views": self.tta_views,
            },
            "detector": {
                "weights": self.detector.weights,
                "sha256": self.detector.sha256,
                "class_names": list(self.detector.class_names),
                "imgsz": self.detector.imgsz,
                "conf": self.detector.conf,
                "iou": self.detector.iou,
                "gate": self.detector.gate,
                "soft_gate_min_score": self.detector.soft_gate_min_score,
                "soft_nms": self.detector.soft_nms,
                "soft_nms_sigma": self.detector.soft_nms_sigma,
                "onnx": self.detector.onnx,
                "onnx_sha256": self.detector.onnx_sha256,
            },
            "gate": None
            if self.gate is None
            else {
                "stats": self.gate.stats,
                "sha256": self.gate.sha256,
                "threshold": self.gate.threshold,
            },
            "grader": None
            if self.grader is None
            else {
                "weights": self.grader.weights,
                "sha256": self.grader.sha256,
                "crop_size": self.grader.crop_size,
            },
            "prep": _jsonable(self.prep),
            "metrics": _jsonable(self.metrics),
            "score_reference": None
            if self.score_reference is None
            else self.score_reference.to_json(),
            "precision_checks": [c.to_json() for c in self.precision_checks],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def sha256_file(path: Path) -> str:
    """Return the SHA-256 hex digest of a file.

    Parameters
    ----------
    path : pathlib.Path
        File to hash (read in 1 MiB chunks).

    Returns
    -------
    str
        64 lower-case hex digits.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _member_from_json(entry: Mapping[str, Any]) -> MemberSpec:
    kwargs = dict(entry.get("kwargs") or {})
    # JSON has no tuples; timm accepts lists for block/layer configurations, keep them as lists.
    return MemberSpec(
        name=entry["name"],
        arch=entry["arch"],
        kwargs=kwargs,
        weights=entry["weights"],
        sha256=entry["sha256"],
        input_size=entry["input_size"],
        mean=tuple(entry["mean"]),  # type: ignore[arg-type]
        std=tuple(entry["std"]),  # type: ignore[arg-type]
        onnx=entry.get("onnx"),
        onnx_sha256=entry.get("onnx_sha256"),
    )


def _optional(entry: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: entry[k] for k in keys if k in entry and entry[k] is not None}


def manifest_from_json(document: Mapping[str, Any]) -> Manifest:
    """Build a :class:`Manifest` from a parsed ``manifest.json`` (no file checks).

    Raises
    ------
    KeyError, TypeError, ValueError
        When a key is missing or a value is invalid.
    """
    if document.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"format must be {MANIFEST_FORMAT}, got {document.get('format')!r}")
    triage = document["triage"]
    det = document["detector"]
    detector = DetectorSpec(
        weights=det["weights"],
        sha256=det["sha256"],
        class_names=tuple(det["class_names"]),
        **_optional(
            det,
            (
                "imgsz",
                "conf",
                "iou",
                "gate",
                "soft_gate_min_score",
                "soft_nms",
                "soft_nms_sigma",
                "onnx",
                "onnx_sha256",
            ),
        ),
    )
    gate_doc = document.get("gate")
    gate = (
        None
        if gate_doc is None
        else GateSpec(
            stats=gate_doc["stats"], sha256=gate_doc["sha256"], threshold=gate_doc["threshold"]
        )
    )
    grader_doc = document.get("grader")
    grader = (
        None
        if grader_doc is None
        else GraderSpec(
            weights=grader_doc["weights"],
            sha256=grader_doc["sha256"],
            **_optional(grader_doc, ("crop_size",)),
        )
    )
    return Manifest(
        name=document["name"],
        version=document["version"],
        intended_use=document.get("intended_use", ""),
        demo=document["demo"],
        members=tuple(_member_from_json(m) for m in triage["members"]),
        ensemble_weights=tuple(triage["ensemble_weights"]),
        threshold=triage["threshold"],
        tta_views=triage["tta_views"],
        detector=detector,
        gate=gate,
        grader=grader,
        prep=document.get("prep") or {},
        metrics=document.get("metrics") or {},
        min_patient_age_years=document.get("min_patient_age_years", 18.0),
        score_reference=None
        if document.get("score_reference") is None
        else ScoreReference.from_json(document["score_reference"]),
        precision_checks=tuple(
            PrecisionCheck.from_json(c) for c in document.get("precision_checks") or ()
        ),
    )


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check that every file the manifest names exists and has its recorded SHA-256.

    Raises
    ------
    BundleError
        Naming the first missing or altered file.
    """
    for role, name, expected in manifest.files():
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"model bundle {bundle_dir}: {role} file {name} is missing.")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"model bundle {bundle_dir}: {role} file {name} has sha256 {actual}, "
                f"but the manifest records {expected} (file altered or corrupted)."
            )


def load_manifest(bundle_dir: Path) -> Manifest:
    """Parse and validate ``manifest.json`` and verify the SHA-256 of every file it names.

    Parameters
    ----------
    bundle_dir : pathlib.Path
        The bundle directory.

    Returns
    -------
    Manifest

    Raises
    ------
    BundleError
        One sentence naming the file and the problem (missing, unreadable, bad key or value,
        sha256 mismatch).
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"model bundle {bundle_dir}: {MANIFEST_NAME} is missing.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"model bundle {bundle_dir}: {MANIFEST_NAME} is unreadable ({exc})."
        ) from exc
    if not isinstance(document, dict):
        raise BundleError(f"model bundle {bundle_dir}: {MANIFEST_NAME} is not a JSON object.")
    try:
        manifest = manifest_from_json(document)
    except KeyError as exc:
        raise BundleError(
            f"model bundle {bundle_dir}: {MANIFEST_NAME} lacks the required key {exc.args[0]!r}."
        ) from exc
    except (TypeError, ValueError) as exc:
        raise BundleError(f"model bundle {bundle_dir}: {MANIFEST_NAME} is invalid: {exc}.") from exc
    verify_files(bundle_dir, manifest)
    log.info(
        "model bundle %s %s verified (%d files)",
        manifest.name,
        manifest.version,
        len(manifest.files()),
    )
    return manifest


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``bundle_dir`` (files must already be there).

    Parameters
    ----------
    bundle_dir : pathlib.Path
        The bundle directory.
    manifest : Manifest
        What to write.

    Returns
    -------
    pathlib.Path
        The manifest path.

    Raises
    ------
    BundleError
        When a file named by the manifest is missing or does not match its sha256.
    """
    if not isinstance(manifest, Manifest):
        raise TypeError(f"manifest must be a Manifest, got {type(manifest).__name__}")
    bundle_dir = Path(bundle_dir)
    verify_files(bundle_dir, manifest)
    path = bundle_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    tmp.replace(path)
    return path

"""The cascade: tag gate -> preparation -> triage ensemble (+ content gate) -> gated detector.

One :class:`Cascade` per worker process: models are loaded once from a hash-checked bundle and
stay warm. ``analyze`` takes several datasets at once and batches them (images x TTA views);
one bad image never raises, it becomes ``not_processed`` with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from spine_node.imaging import ImageError, PreparedImage, PrepParams, prepare
from spine_node.isolation import DecoderCrash
from spine_node.labels import SPONDYLOLISTHESIS
from spine_node.models.bundle import BundleError, Manifest, load_manifest
from spine_node.models.detector import Detections, Detector, DetectorNet, load_yolo_module
from spine_node.models.gate import ContentGate, GateDecision, check_tags
from spine_node.models.runtime import (
    BACKEND_SETTINGS,
    Backend,
    Precision,
    RuntimeChoice,
    choose_runtime,
)
from spine_node.models.triage import MemberRunner, TriageEnsemble, TriageMember, load_member
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status
from spine_node.timing import Stage, timed

log = logging.getLogger(__name__)

#: Values of the ``backend`` argument (``onnx``: the older name of ``onnxruntime``).
BACKENDS = BACKEND_SETTINGS

#: Detects lesions on ``(B, S, S)`` letterboxed images; returns boxes in letterbox pixels.
DetectFn = Callable[[np.ndarray], list[Detections]]
#: Grades one spondylolisthesis finding: ``(enhanced image, source-pixel box) -> "I".."IV"``.
GradeFn = Callable[[np.ndarray, Sequence[float]], str]


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` into a torch device.

    Raises
    ------
    ValueError
        For an unknown device, or CUDA requested where none is available.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def model_info_from_manifest(
    manifest: Manifest, *, runtime: RuntimeChoice | None = None
) -> ModelInfo:
    """Describe a bundle for every output object (name, version, demo flag, parameters).

    ``runtime`` (default: PyTorch fp32 on the CPU) adds ``backend``, ``precision`` and
    ``device``: what the models ran on is part of the algorithm's parameters.
    """
    runtime = runtime or RuntimeChoice(Backend.TORCH, Precision.FP32, "cpu")
    d = manifest.detector
    return ModelInfo(
        name=manifest.name,
        version=manifest.version,
        demo=manifest.demo,
        intended_use=manifest.intended_use,
        parameters={
            "members": [
                {"name": m.name, "arch": m.arch, "weights": m.weights, "sha256": m.sha256}
                for m in manifest.members
            ],
            "ensemble_weights": list(manifest.ensemble_weights),
            "threshold": manifest.threshold,
            "tta_views": manifest.tta_views,
            "detector": {
                "weights": d.weights,
                "sha256": d.sha256,
                "conf": d.conf,
                "iou": d.iou,
                "gate": d.gate,
                "soft_nms": d.soft_nms,
            },
            "gate_threshold": None if manifest.gate is None else manifest.gate.threshold,
            "backend": runtime.backend.value,
            "precision": runtime.precision.value,
            "device": runtime.device,
        },
    )


@dataclass(frozen=True)
class _Pending:
    index: int
    uid: str
    image: PreparedImage
    notes: tuple[str, ...] = ()


class Cascade:
    """Gate, triage and detection for batches of images, models warm.

    Build it with :meth:`load`; the constructor takes ready components so tests (and callers
    with special needs) can substitute one, e.g. a detector wrapper that counts calls.

    Parameters
    ----------
    manifest : Manifest
        The bundle's manifest (threshold, gate mode, class names, prep).
    triage : TriageEnsemble
        The ensemble (any backend).
    detector : callable
        ``(B, S, S)`` letterboxed images -> list of :class:`Detections` in letterbox pixels.
    content_gate : ContentGate or None
        Out-of-distribution check on the triage embeddings; None disables it.
    model_info : ModelInfo, optional
        Defaults to :func:`model_info_from_manifest`.
    explainers : Mapping[str, TriageMember], optional
        PyTorch members for Grad-CAM; with ``heatmaps=True`` every processed image gets one.
    heatmaps : bool
        Compute heatmaps (needs ``explainers``).
    heatmap_method : str
        ``"gradcam"`` or ``"layercam"`` (``spine_node.models.explain.HEATMAP_METHODS``).
    grader : callable, optional
        Meyerding grader for spondylolisthesis findings.
    preparer : callable, optional
        ``(dataset, PrepParams) -> PreparedImage``; default :func:`spine_node.imaging.prepare`
        in this process, or a :class:`spine_node.isolation.IsolatedPreparer` to decode in a
        child process. Its :class:`~spine_node.isolation.DecoderCrash` propagates (with the
        image's UID) so the worker can retry that one job.
    intended_modalities : sequence of str, optional
        Modalities of the intended use (setting ``intended_modalities``); an image of another
        modality is "not processed: outside the intended use (modality ...)". None: only the
        gate's radiograph rule applies.
    """

    def __init__(
        self,
        *,
        manifest: Manifest,
        triage: TriageEnsemble,
        detector: DetectFn,
        content_gate: ContentGate | None,
        model_info: ModelInfo | None = None,
        explainers: Mapping[str, TriageMember] | None = None,
        heatmaps: bool = False,
        heatmap_method: str = "gradcam",
        grader: GradeFn | None = None,
        preparer: Callable[[pydicom.Dataset, PrepParams], PreparedImage] = prepare,
        intended_modalities: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(manifest, Manifest):
            raise TypeError(f"manifest must be a Manifest, got {type(manifest).__name__}")
        if not callable(detector):
            raise TypeError(f"detector must be callable, got {type(detector).__name__}")
        if heatmaps and not explainers:
            raise ValueError("heatmaps=True needs explainers (PyTorch triage members)")
        self.manifest = manifest
        self.triage = triage
        self.detector = detector
        self.content_gate = content_gate
        self.model_info = model_info or model_info_from_manifest(manifest)
        self.explainers = dict(explainers or {})
        self.heatmaps = heatmaps
        from spine_node.models.explain import check_method

        self.heatmap_method = check_method(heatmap_method)
        self.grader = grader
        self.preparer = preparer
        self.intended_modalities = (
            None if intended_modalities is None else tuple(intended_modalities)
        )
        self.prep = PrepParams(**dict(manifest.prep))

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        *,
        device: str = "auto",
        backend: str = "torch",
        precision: str = "fp32",
        heatmaps: bool = False,
        heatmap_method: str = "gradcam",
        max_batch: int = 40,
        detector_batch: int = 8,
        preparer: Callable[[pydicom.Dataset, PrepParams], PreparedImage] = prepare,
        intended_modalities: Sequence[str] | None = None,
    ) -> Cascade:
        """Load a bundle: verify every hash, build the models once, keep them warm.

        Parameters
        ----------
        bundle_dir : pathlib.Path
            Bundle directory (``manifest.json`` and the files it names).
        device : str
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        backend : str
            ``"auto"``, ``"torch"``, ``"onnxruntime"`` (``"onnx"``) or ``"openvino"`` (both on
            the bundle's ONNX exports); see :func:`spine_node.models.runtime.choose_runtime`.
        precision : str
            ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA); a reduced precision
            without a passing agreement check in the manifest falls back to fp32 (logged).
        heatmaps : bool
            Also compute heatmaps (loads the PyTorch members even for ONNX).
        heatmap_method : str
            ``"gradcam"`` (default) or ``"layercam"`` (``spine_node.models.explain``).
        max_batch : int
            Upper bound on triage views per forward pass (images x TTA views; whole images
            are never split across passes).
        detector_batch : int
            Upper bound on detector images per forward pass.
        preparer, intended_modalities
            As for the constructor.

        Raises
        ------
        BundleError
            Missing file, hash mismatch, bad manifest, weights that do not fit.
        ValueError
            Unknown backend or device.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        bundle_dir = Path(bundle_dir)
        dev = resolve_device(device)
        manifest = load_manifest(bundle_dir)
        if backend != "torch" and backend != "auto":
            missing = [m.name for m in manifest.members if not m.onnx]
            if missing or not manifest.detector.onnx:
                raise BundleError(
                    f"model bundle {bundle_dir} has no ONNX export for "
                    f"{', '.join(missing + ([] if manifest.detector.onnx else ['detector']))}."
                )
        runtime = choose_runtime(manifest, backend=backend, precision=precision, device=str(dev))
        torch_members: dict[str, TriageMember] = {}
        if runtime.backend is Backend.TORCH or heatmaps:
            torch_members = {m.name: load_member(m, bundle_dir) for m in manifest.members}
        runner, detector_net = build_backend(runtime, bundle_dir, manifest, torch_members)
        ensemble = TriageEnsemble(
            runner, manifest.ensemble_weights, manifest.tta_views, max_batch=max_batch
        )
        detector = Detector(detector_net, manifest.detector, max_batch=detector_batch)
        gate = None
        if manifest.gate is not None:
            try:
                gate = ContentGate.load(bundle_dir / manifest.gate.stats, manifest.gate.threshold)
            except (OSError, ValueError, KeyError) as exc:
                raise BundleError(
                    f"model bundle {bundle_dir}: gate statistics file {manifest.gate.stats} "
                    f"is unusable ({exc})."
                ) from exc
        grader = _load_grader(bundle_dir, manifest)
        log.info(
            "cascade loaded: %s %s, %s%s",
            manifest.name,
            manifest.version,
            runtime.describe(),
            " (DEMO bundle)" if manifest.demo else "",
        )
        if runtime.refusal:
            log.warning("model bundle %s %s: %s", manifest.name, manifest.version, runtime.refusal)
        explainers = {n: m.to(dev).eval() for n, m in torch_members.items()} if heatmaps else None
        return cls(
            manifest=manifest,
            triage=ensemble,
            detector=detector,
            content_gate=gate,
            model_info=model_info_from_manifest(manifest, runtime=runtime),
            explainers=explainers,
            heatmaps=heatmaps,
            heatmap_method=heatmap_method,
            grader=grader,
            preparer=preparer,
            intended_modalities=intended_modalities,
        )

    # ------------------------------------------------------------------ analysis

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[CascadeResult]:
        """Run the cascade on several datasets at once.

        Parameters
        ----------
        datasets : Sequence[pydicom.Dataset]
            Received datasets (pixel data not yet decoded).

        Returns
        -------
        list of CascadeResult
            One per dataset, same order. A refused or undecodable image is ``not_processed``
            with a reason; errors of the models themselves (e.g. out of memory) propagate.
        """
        results: list[CascadeResult | None] = [None] * len(datasets)
        pending: list[_Pending] = []
        times: list[dict[str, float]] = [{} for _ in datasets]
        for i, ds in enumerate(datasets):
            uid = _uid(ds)
            with timed(times[i], Stage.GATE):
                try:
                    decision = check_tags(
                        ds,
                        min_age_years=self.manifest.min_patient_age_years,
                        intended_modalities=self.intended_modalities,
                    )
                except Exception as exc:  # a malformed header value must not stop the batch
                    decision = GateDecision(False, f"image header could not be read: {exc}")
            if not decision.accepted:
                results[i] = self._refused(uid, str(decision.reason), times[i])
                continue
            for note in decision.notes:
                log.info("image %s: %s", uid, note)
            try:
                with timed(times[i], Stage.DECODE):
                    prepared = self.preparer(ds, self.prep)
            except DecoderCrash as exc:
                raise DecoderCrash(str(exc), uid) from exc
            except ImageError as exc:
                results[i] = self._refused(
                    uid, f"image could not be decoded: {exc.reason}", times[i]
                )
                continue
            except Exception as exc:  # decoders raise anything; one bad image never stops the batch
                log.warning("image %s could not be decoded", uid, exc_info=True)
                results[i] = self._refused(
                    uid, f"image could not be decoded: {type(exc).__name__}: {exc}", times[i]
                )
                continue
            for note in prepared.source.notes:
                log.debug("image %s: %s", uid, note)
            pending.append(_Pending(i, uid, prepared, decision.notes))
        for item, result in zip(
            pending,
            self.analyze_prepared([p.uid for p in pending], [p.image for p in pending]),
            strict=True,
        ):
            spent = dict(times[item.index])
            for stage, seconds in result.stage_seconds.items():
                spent[stage] = spent.get(stage, 0.0) + seconds
            results[item.index] = replace(result, notes=item.notes or result.notes,
                                          stage_seconds=spent)
        return [r for r in results if r is not None]

    def analyze_prepared(
        self, uids: Sequence[str], images: Sequence[PreparedImage]
    ) -> list[CascadeResult]:
        """Run content gate, triage and detector on already prepared images.

        Parameters
        ----------
        uids : Sequence[str]
            SOP Instance UID per image.
        images : Sequence[PreparedImage]
            From :func:`spine_node.imaging.prepare` / ``prepare_array`` with this bundle's prep.

        Returns
        -------
        list of CascadeResult
        """
        if len(uids) != len(images):
            raise ValueError(f"uids and images differ in length: {len(uids)} != {len(images)}")
        if not images:
            return []
        size = self.prep.triage_size
        for img in images:
            if img.triage.shape != (size, size):
                raise ValueError(f"triage image must be {size} x {size}, got {img.triage.shape}")
        batch: dict[str, float] = {}  # stage -> seconds for the whole batch
        with timed(batch, Stage.TRIAGE):
            out = self.triage(np.stack([img.triage for img in images]).astype(np.float32))
        threshold = self.manifest.threshold
        refused: dict[int, str] = {}
        with timed(batch, Stage.GATE):
            if self.content_gate is not None:
                for j, dist in enumerate(self.content_gate.distances(out.embeddings)):
                    decision = self.content_gate.decide(float(dist))
                    if not decision.accepted:
                        refused[j] = str(decision.reason)
        shared = {stage: seconds / len(images) for stage, seconds in batch.items()}
        spent: list[dict[str, float]] = [dict(shared) for _ in images]
        positive = [
            j not in refused and float(out.scores[j]) >= threshold for j in range(len(images))
        ]
        soft = self.manifest.detector.gate == "soft"
        to_detect = [j for j in range(len(images)) if j not in refused and (positive[j] or soft)]
        detections: dict[int, Detections] = {}
        if to_detect:
            detect_time: dict[str, float] = {}
            with timed(detect_time, Stage.DETECTOR):
                found = self.detector(np.stack([images[j].detect for j in to_detect]))
            if len(found) != len(to_detect):
                raise RuntimeError(
                    f"detector returned {len(found)} results for {len(to_detect)} images"
                )
            detections = dict(zip(to_detect, found, strict=True))
            for j in to_detect:
                spent[j][Stage.DETECTOR.value] = detect_time[Stage.DETECTOR.value] / len(to_detect)
        results = []
        for j, (uid, img) in enumerate(zip(uids, images, strict=True)):
            if j in refused:
                results.append(
                    replace(self._refused(uid, refused[j], spent[j]), display=img.source)
                )
                continue
            findings: tuple[Finding, ...] = ()
            if j in detections:
                min_score = None if positive[j] else self.manifest.detector.soft_gate_min_score
                with timed(spent[j], Stage.DETECTOR):  # boxes mapped back, Meyerding grades
                    findings = self._findings(detections[j], img, min_score)
            heatmap = None
            if self.heatmaps:
                from spine_node.models.explain import ensemble_gradcam

                heatmap = ensemble_gradcam(
                    self.explainers,
                    self.manifest.ensemble_weights,
                    img.triage,
                    (img.source.rows, img.source.columns),
                    method=self.heatmap_method,
                )
            results.append(
                CascadeResult(
                    sop_instance_uid=uid,
                    status=Status.POSITIVE if positive[j] else Status.NEGATIVE,
                    score=float(out.scores[j]),
                    threshold=threshold,
                    findings=findings,
                    member_scores={
                        name: float(probs[j]) for name, probs in out.member_probs.items()
                    },
                    heatmap=heatmap,
                    display=img.source,
                    stage_seconds=spent[j],
                )
            )
        return results

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Pooled member embeddings of prepared triage images ``(B, H, W)`` (to fit the gate)."""
        return self.triage.embed(np.asarray(images, dtype=np.float32))

    # ------------------------------------------------------------------ helpers

    def _refused(
        self, uid: str, reason: str, stage_seconds: Mapping[str, float] | None = None
    ) -> CascadeResult:
        return CascadeResult(
            sop_instance_uid=uid,
            status=Status.NOT_PROCESSED,
            reason=reason,
            threshold=self.manifest.threshold,
            stage_seconds=dict(stage_seconds or {}),
        )

    def _findings(
        self, det: Detections, img: PreparedImage, min_score: float | None
    ) -> tuple[Finding, ...]:
        names = self.manifest.detector.class_names
        keep = np.ones(len(det), dtype=bool)
        if min_score is not None:
            keep &= det.scores >= min_score
        det = det.select(keep)
        if not len(det):
            return ()
        boxes = img.letterbox.to_source(det.boxes)
        findings = []
        for box, score, cls in zip(boxes, det.scores, det.classes, strict=True):
            xmin, ymin, xmax, ymax = (float(v) for v in box)
            if not (xmax > xmin and ymax > ymin):
                continue  # entirely in the letterbox padding
            label = names[int(cls)]
            grade = None
            if self.grader is not None and label == SPONDYLOLISTHESIS:
                try:
                    grade = self.grader(img.enhanced, (xmin, ymin, xmax, ymax))
                except Exception:  # grading is optional; the finding stands without it
                    log.warning("Meyerding grading failed", exc_info=True)
            findings.append(
                Finding(
                    label=label,
                    score=float(np.clip(score, 0.0, 1.0)),
                    box=(xmin, ymin, xmax, ymax),
                    grade=grade,
                )
            )
        return tuple(findings)


def _uid(ds: Any) -> str:
    try:
        return str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # a broken element must not stop the batch
        return ""


def build_backend(
    runtime: RuntimeChoice,
    bundle_dir: Path,
    manifest: Manifest,
    torch_members: Mapping[str, TriageMember] | None = None,
) -> tuple[MemberRunner, DetectorNet]:
    """The triage runner and detector network of ``runtime``, as chosen (no agreement check).

    :meth:`Cascade.load` calls it after :func:`~spine_node.models.runtime.choose_runtime`;
    the agreement check (``training.precision``) calls it to compare precisions.

    Parameters
    ----------
    runtime : RuntimeChoice
        Backend, precision and device.
    bundle_dir : pathlib.Path
        The bundle (already verified by :func:`~spine_node.models.bundle.load_manifest`).
    manifest : Manifest
        Its manifest.
    torch_members : Mapping[str, TriageMember], optional
        Already loaded PyTorch members (loaded here when needed and not given).

    Returns
    -------
    (MemberRunner, DetectorNet)
    """
    bundle_dir = Path(bundle_dir)
    if runtime.backend is Backend.TORCH:
        from spine_node.models.backend_torch import TorchDetectorNet, TorchMembers

        if torch_members is None:
            torch_members = {m.name: load_member(m, bundle_dir) for m in manifest.members}
        dev = torch.device(runtime.device)
        return (
            TorchMembers(torch_members, dev, runtime.precision),
            TorchDetectorNet(_load_detector(bundle_dir, manifest), dev, runtime.precision),
        )
    members = {m.name: bundle_dir / str(m.onnx) for m in manifest.members}
    detector_onnx = bundle_dir / str(manifest.detector.onnx)
    if runtime.backend is Backend.OPENVINO:
        from spine_node.models.backend_openvino import OpenVinoDetectorNet, OpenVinoMembers

        return (
            OpenVinoMembers(members, runtime.precision),
            OpenVinoDetectorNet(detector_onnx, runtime.precision),
        )
    from spine_node.models.backend_onnxruntime import (
        OnnxDetectorNet,
        OnnxMembers,
        providers_for,
    )

    providers = providers_for(runtime.device_kind)
    return OnnxMembers(members, providers), OnnxDetectorNet(detector_onnx, providers)


def _load_detector(bundle_dir: Path, manifest: Manifest) -> torch.nn.Module:
    spec = manifest.detector
    try:
        # The file's sha256 was verified by load_manifest just before this unpickling load.
        model = load_yolo_module(bundle_dir / spec.weights)
    except Exception as exc:
        raise BundleError(
            f"model bundle {bundle_dir}: detector weights file {spec.weights} could not be "
            f"loaded as an ultralytics checkpoint ({type(exc).__name__}: {exc})."
        ) from exc
    names = getattr(model, "names", None)
    if isinstance(names, Mapping) and names:
        ordered = tuple(str(names[k]) for k in sorted(names))
        if ordered != tuple(spec.class_names):
            raise BundleError(
                f"model bundle {bundle_dir}: detector weights file {spec.weights} has classes "
                f"{ordered}, the manifest names {tuple(spec.class_names)}."
            )
    return model


def _load_grader(bundle_dir: Path, manifest: Manifest) -> GradeFn | None:
    if manifest.grader is None:
        return None
    try:
        from spine_node.models.grader import load_grader

        # joblib unpickles: acceptable only because load_manifest verified the sha256.
        grader = load_grader(bundle_dir / manifest.grader.weights)
    except Exception as exc:
        raise BundleError(
            f"model bundle {bundle_dir}: Meyerding grader file {manifest.grader.weights} "
            f"could not be loaded ({type(exc).__name__}: {exc})."
        ) from exc
    return grader.grade

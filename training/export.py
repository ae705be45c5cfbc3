"""Build model bundles: weights, ONNX exports, gate statistics, manifest with every hash.

``make_tiny_bundle`` builds a random-weight bundle of the same model families, shrunk (64 px
members, a tiny YOLO11), for plumbing tests; it takes a few seconds on one CPU core.
"""

from __future__ import annotations

import copy
import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spine_node.drift import ScoreReference, score_reference
from spine_node.labels import LESION_LABELS
from spine_node.models.bundle import (
    DetectorSpec,
    GateSpec,
    GraderSpec,
    Manifest,
    MemberSpec,
    load_manifest,
    sha256_file,
    write_manifest,
)
from spine_node.models.detector import RawHead, load_yolo_module
from spine_node.models.gate import fit_gate
from spine_node.models.triage import TorchMembers, TriageEnsemble, TriageMember, create_member
from spine_node.offline import configure_offline

log = logging.getLogger(__name__)

ONNX_OPSET = 17
#: The method's defaults (spec.md); a real bundle records the values refitted on validation.
DEFAULT_WEIGHTS = (0.42, 0.32, 0.26)
DEFAULT_THRESHOLD = 0.478
DEFAULT_TTA = 5

#: Tiny members for plumbing tests: the real families, shrunk through timm kwargs.
TINY_MEMBERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("densenet", "densenet121", {"growth_rate": 8, "block_config": [1, 1, 1, 1]}),
    ("efficientnet", "tf_efficientnetv2_s", {"channel_multiplier": 0.1, "depth_multiplier": 0.1}),
    (
        "resnet",
        "resnet50",
        {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 16], "stem_width": 8},
    ),
)
TINY_SIZE = 64
#: A YOLO11 scale far below "n": depth 0.25, width 1/16, max 64 channels.
TINY_YOLO_SCALE = (0.25, 0.0625, 64)


def pretrained_norm(
    arch: str, kwargs: Mapping[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return ``(mean, std)`` from the architecture's timm pretrained config (no download)."""
    import timm

    model: Any = timm.create_model(arch, pretrained=False, num_classes=1, **dict(kwargs or {}))
    cfg = model.pretrained_cfg
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def export_member_onnx(model: nn.Module, input_size: int, path: Path) -> None:
    """Export a :class:`TriageMember` to ONNX with a dynamic batch axis.

    The graph takes ``image`` ``(N, 1, S, S)`` float32 [0, 1] and returns ``logit`` ``(N,)`` and
    ``embedding`` ``(N, F)``, preprocessing included, exactly like the PyTorch member.

    Parameters
    ----------
    model : TriageMember
        The wrapped member.
    input_size : int
        Side of the square input.
    path : pathlib.Path
        Output ``.onnx`` file.
    """
    if not isinstance(model, TriageMember):
        raise TypeError(f"model must be a TriageMember, got {type(model).__name__}")
    model = model.cpu().eval()
    dummy = torch.rand(2, 1, input_size, input_size)
    _onnx_export(
        model,
        dummy,
        Path(path),
        ["image"],
        ["logit", "embedding"],
        {"logit": {0: "batch"}, "embedding": {0: "batch"}},
    )


def export_detector_onnx(weights: Path, imgsz: int, path: Path) -> None:
    """Export an ultralytics checkpoint's raw detection head to ONNX (dynamic batch, offline).

    The graph takes ``image`` ``(N, 3, S, S)`` float32 [0, 1] and returns ``raw``
    ``(N, 4 + nc, anchors)``, the tensor :func:`spine_node.models.detector.postprocess` decodes.
    Only use on checkpoints you built or whose hash you trust (they are unpickled).
    """
    head = RawHead(load_yolo_module(Path(weights))).eval()
    dummy = torch.rand(1, 3, imgsz, imgsz)
    _onnx_export(head, dummy, Path(path), ["image"], ["raw"], {"raw": {0: "batch"}})


def _onnx_export(
    model: nn.Module,
    dummy: torch.Tensor,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={"image": {0: "batch"}, **dynamic},
            opset_version=ONNX_OPSET,
        )
    model.eval()  # the exporter restores the training flag it found; keep the module in eval


def _save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def build_bundle(
    out_dir: Path,
    *,
    name: str,
    version: str,
    intended_use: str,
    demo: bool,
    members: Sequence[tuple[MemberSpec, Mapping[str, torch.Tensor] | Path]],
    ensemble_weights: Sequence[float] = DEFAULT_WEIGHTS,
    threshold: float = DEFAULT_THRESHOLD,
    tta_views: int = DEFAULT_TTA,
    detector_weights: Path,
    detector_settings: Mapping[str, Any] | None = None,
    gate_embeddings: np.ndarray | None = None,
    gate_images: np.ndarray | None = None,
    gate_quantile: float = 0.995,
    gate_margin: float = 1.0,
    grader_file: Path | None = None,
    prep: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    score_reference: ScoreReference | None = None,
    onnx: bool = True,
    device: str = "cpu",
) -> Manifest:
    """Assemble a bundle directory and write its manifest (every file hashed).

    Parameters
    ----------
    out_dir : pathlib.Path
        Bundle directory (created; existing files with the same names are replaced; an
        existing ledger of test-split evaluations, ``evaluations.json``, is kept and the
        model card ``MODEL_CARD.md`` is written).
    name, version, intended_use : str
        Identification recorded in every result.
    demo : bool
        True for phantom-trained demo bundles.
    members : sequence of (MemberSpec, state_dict or path)
        Member specs (``weights``/``sha256`` are replaced) with the timm model's state_dict
        or a file holding it.
    ensemble_weights, threshold, tta_views
        Triage settings (refitted on validation, never on test).
    detector_weights : pathlib.Path
        Ultralytics ``.pt`` checkpoint.
    detector_settings : Mapping, optional
        ``DetectorSpec`` fields other than weights/sha256/class_names/imgsz (conf, iou, gate, ...).
    gate_embeddings : numpy.ndarray, optional
        ``(N, D)`` training-image embeddings for the content gate.
    gate_images : numpy.ndarray, optional
        ``(N, S, S)`` prepared training triage images; embedded with the given members.
    gate_quantile : float
        Quantile of training distances used as the gate threshold.
    gate_margin : float
        Factor (>= 1) applied to that quantile.
    grader_file : pathlib.Path, optional
        Meyerding grader (``training.meyerding.save_grader``).
    prep : Mapping, optional
        ``PrepParams`` fields.
    metrics : Mapping, optional
        Held-out figures to record.
    score_reference : ScoreReference, optional
        The ensemble score's distribution on the validation images
        (:func:`reference_from_validation`), recorded as the manifest's ``score_reference``:
        the node's drift reference. None: the bundle has none (drift reads "no reference").
    onnx : bool
        Also export every member and the detector to ONNX.
    device : str
        Where to embed ``gate_images`` (``"cpu"``, ``"cuda"``).

    Returns
    -------
    Manifest
    """
    from training import model_card

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bundle rebuilt in place keeps its ledger of test-split evaluations (touched once).
    ledger = model_card.read_evaluations(out_dir)
    prep = dict(prep or {})
    specs: list[MemberSpec] = []
    wrapped: dict[str, TriageMember] = {}
    for spec, weights in members:
        if not isinstance(spec, MemberSpec):
            raise TypeError(f"members must hold MemberSpec, got {type(spec).__name__}")
        model = create_member(spec)
        state = weights if isinstance(weights, Mapping) else _read_state(Path(weights))
        model.load_state_dict(state, strict=True)
        file = f"{spec.name}.pt"
        _save_state_dict(model.state_dict(), out_dir / file)
        member = TriageMember(model, spec.mean, spec.std).eval()
        new = replace(
            spec, weights=file, sha256=sha256_file(out_dir / file), onnx=None, onnx_sha256=None
        )
        if onnx:
            onnx_file = f"{spec.name}.onnx"
            export_member_onnx(member, spec.input_size, out_dir / onnx_file)
            new = replace(new, onnx=onnx_file, onnx_sha256=sha256_file(out_dir / onnx_file))
        specs.append(new)
        wrapped[spec.name] = member

    det_file = "detector.pt"
    if Path(detector_weights).resolve() != (out_dir / det_file).resolve():
        shutil.copyfile(detector_weights, out_dir / det_file)
    yolo = load_yolo_module(out_dir / det_file)
    names = getattr(yolo, "names", None)
    class_names = (
        tuple(str(names[k]) for k in sorted(names))
        if isinstance(names, Mapping) and names
        else LESION_LABELS
    )
    imgsz = int(prep.get("detect_size", 640))
    det_kwargs: dict[str, Any] = dict(detector_settings or {})
    detector = DetectorSpec(
        weights=det_file,
        sha256=sha256_file(out_dir / det_file),
        class_names=class_names,
        imgsz=imgsz,
        **det_kwargs,
    )
    if onnx:
        export_detector_onnx(out_dir / det_file, imgsz, out_dir / "detector.onnx")
        detector = replace(
            detector, onnx="detector.onnx", onnx_sha256=sha256_file(out_dir / "detector.onnx")
        )

    gate = None
    if gate_embeddings is None and gate_images is not None:
        runner = TorchMembers(wrapped, torch.device(device))
        ensemble = TriageEnsemble(runner, ensemble_weights, 1)
        gate_embeddings = ensemble.embed(np.asarray(gate_images, np.float32))
        for member in wrapped.values():
            member.cpu()
    if gate_embeddings is not None:
        if gate_margin < 1.0:
            raise ValueError(f"gate_margin must be >= 1, got {gate_margin!r}")
        arrays, gate_threshold = fit_gate(gate_embeddings, gate_quantile)
        gate_threshold *= gate_margin
        np.savez(out_dir / "gate.npz", **arrays)  # type: ignore[arg-type]
        gate = GateSpec(
            stats="gate.npz", sha256=sha256_file(out_dir / "gate.npz"), threshold=gate_threshold
        )

    grader = None
    if grader_file is not None:
        if Path(grader_file).resolve() != (out_dir / "grader.joblib").resolve():
            shutil.copyfile(grader_file, out_dir / "grader.joblib")
        grader = GraderSpec(weights="grader.joblib", sha256=sha256_file(out_dir / "grader.joblib"))

    manifest = Manifest(
        name=name,
        version=version,
        intended_use=intended_use,
        demo=demo,
        members=tuple(specs),
        ensemble_weights=tuple(ensemble_weights),
        threshold=threshold,
        tta_views=tta_views,
        detector=detector,
        gate=gate,
        grader=grader,
        prep=prep,
        metrics={**dict(metrics or {}), "built": datetime.now(UTC).isoformat(timespec="seconds")},
        score_reference=score_reference,
    )
    write_manifest(out_dir, manifest)
    if ledger:
        model_card.write_evaluations(out_dir, ledger)
    model_card.write_model_card(out_dir)
    log.info("bundle %s %s written to %s", name, version, out_dir)
    return manifest


def reference_from_validation(
    scores: np.ndarray | Sequence[float], threshold: float, source: str = "validation split"
) -> ScoreReference:
    """The drift reference of a bundle: its validation scores in decile bins.

    Parameters
    ----------
    scores : array_like
        ``(N,)`` ensemble scores of the validation images (never the test split).
    threshold : float
        The bundle's decision threshold (records the validation positive rate).
    source : str
        Which images these are (recorded in the manifest).

    Returns
    -------
    ScoreReference
        See :func:`spine_node.drift.score_reference`.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    return score_reference(values, threshold=threshold, source=f"{source} ({values.size} images)")


def add_score_reference(
    bundle_dir: Path, scores: np.ndarray | Sequence[float], source: str = "validation split"
) -> Manifest:
    """Add (or replace) the drift reference of an already-built bundle.

    The manifest is verified (every file's hash), given ``score_reference`` from ``scores``
    and written again; the other files are untouched (the bundle's SHA-256, that of its
    manifest, changes).

    Parameters
    ----------
    bundle_dir : pathlib.Path
        The bundle directory.
    scores : array_like
        ``(N,)`` ensemble scores of the bundle's validation images.
    source : str
        Which images these are.

    Returns
    -------
    Manifest
        The manifest written.

    Raises
    ------
    spine_node.models.bundle.BundleError
        When the bundle does not verify.
    ValueError
        Empty scores or scores outside [0, 1].
    """
    manifest = load_manifest(Path(bundle_dir))
    reference = reference_from_validation(scores, manifest.threshold, source)
    updated = replace(manifest, score_reference=reference)
    write_manifest(Path(bundle_dir), updated)
    log.info("score reference (%d validation images) written to %s", reference.n, bundle_dir)
    return updated


def _read_state(path: Path) -> Mapping[str, torch.Tensor]:
    from spine_node.models.triage import read_state_dict

    return read_state_dict(path)


def tiny_yolo_checkpoint(
    path: Path, *, seed: int = 0, class_names: Sequence[str] = LESION_LABELS
) -> Path:
    """Write a random-weight tiny YOLO11 checkpoint that ``ultralytics.YOLO(path)`` loads.

    Built from the stock ``yolo11.yaml`` with a custom, tiny scale; class biases are raised so
    the random network produces boxes above the 0.25 confidence threshold.
    """
    configure_offline()
    import ultralytics
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load
    from ultralytics.utils import DEFAULT_CFG_DICT

    torch.manual_seed(seed)
    cfg = dict(yaml_model_load("yolo11n.yaml"))
    cfg["scales"] = {"t": list(TINY_YOLO_SCALE)}
    cfg["scale"] = "t"
    cfg["nc"] = len(class_names)
    model: Any = DetectionModel(cfg, ch=3, nc=len(class_names), verbose=False)
    gen = torch.Generator().manual_seed(seed)
    head = model.model[-1]
    with torch.no_grad():
        # Calibrate batch-norm statistics on synthetic images, so every layer passes a unit-scale
        # signal and the random network's output depends on its input.
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        model.train()
        images = torch.from_numpy(synthetic_radiographs(8, 64, seed=seed))[:, None].repeat(
            1, 3, 1, 1
        )
        model(images)
        for bn in norms:
            bn.momentum = 0.03
        for seq in head.cv3:  # class logits centred below 0: a few boxes above 0.25
            final = seq[-1]
            final.weight.copy_(
                torch.randn(final.weight.shape, generator=gen)
                * 0.5
                / final.weight[0].numel() ** 0.5
            )
            final.bias.fill_(-2.0)
        bins = torch.arange(head.reg_max, dtype=torch.float32)
        for seq in head.cv2:  # DFL logits favouring short distances: boxes of a few strides
            final = seq[-1]
            final.weight.copy_(
                torch.randn(final.weight.shape, generator=gen)
                * 0.5
                / final.weight[0].numel() ** 0.5
            )
            final.bias.copy_((-0.4 * bins).repeat(4))
    model.names = dict(enumerate(class_names))
    model.args = {**DEFAULT_CFG_DICT, "model": "yolo11-tiny.yaml", "task": "detect"}
    model.eval()
    ckpt = {
        "model": copy.deepcopy(model).half(),
        "ema": None,
        "updates": None,
        "train_args": {"task": "detect", "model": "yolo11-tiny.yaml"},
        "date": datetime.now(UTC).isoformat(),
        "version": ultralytics.__version__,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def synthetic_radiographs(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Smooth random grey images in [0, 1] ``(n, size, size)`` (a stand-in for training images)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), np.float32)
    yy = np.linspace(-1, 1, size)[:, None]
    for i in range(n):
        noise = ndimage.gaussian_filter(rng.random((size, size)), sigma=size / 16)
        column = np.exp(-((np.linspace(-1, 1, size)[None, :] - rng.normal(0, 0.1)) ** 2) / 0.05)
        img = 0.5 * column * (0.8 + 0.2 * np.cos(yy * rng.uniform(8, 14))) + noise
        low, high = np.percentile(img, (0.5, 99.5))  # as imaging does without a window
        out[i] = np.clip((img - low) / max(float(high - low), 1e-6), 0.0, 1.0).astype(np.float32)
    return out


def _prepared(images: np.ndarray, prep: Mapping[str, Any], *, seed: int = 0) -> np.ndarray:
    """Prepared triage images of random crops (aspect ratios 0.6 to 1.7) of ``images``."""
    from spine_node.imaging import PrepParams, prepare_array

    params = PrepParams(**dict(prep))
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        rows = int(img.shape[0] * rng.uniform(0.6, 1.0))
        cols = int(img.shape[1] * rng.uniform(0.6, 1.0))
        out.append(prepare_array(np.ascontiguousarray(img[:rows, :cols]), params).triage)
    return np.stack(out)


def make_tiny_bundle(
    out_dir: Path, *, seed: int = 0, onnx: bool = True, gate: bool = True
) -> Manifest:
    """Build a random-weight tiny bundle for plumbing tests (a few seconds on one core).

    Members are the real timm families shrunk through kwargs (64 px); the detector is a tiny
    YOLO11 with 7 classes (64 px letterbox); the gate is fitted on synthetic images.

    Parameters
    ----------
    out_dir : pathlib.Path
        Bundle directory.
    seed : int
        Seed for weights and gate images.
    onnx : bool
        Also export ONNX models.
    gate : bool
        Include content-gate statistics.

    Returns
    -------
    Manifest
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    members = []
    for member_name, arch, kwargs in TINY_MEMBERS:
        mean, std = pretrained_norm(arch, kwargs)
        spec = MemberSpec(
            name=member_name,
            arch=arch,
            kwargs=kwargs,
            weights="pending.pt",
            sha256="0" * 64,
            input_size=TINY_SIZE,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
        )
        model = create_member(spec)
        members.append((spec, model.state_dict()))
    yolo = tiny_yolo_checkpoint(out_dir / "detector.pt", seed=seed)
    prep = {"triage_size": TINY_SIZE, "detect_size": TINY_SIZE, "clip_limit": 2.0, "tiles": 4}
    return build_bundle(
        out_dir,
        name="spine-node-tiny",
        version=f"0.0.0-tiny{seed}",
        intended_use="Plumbing tests only; random weights, no clinical meaning.",
        demo=True,
        members=members,
        ensemble_weights=DEFAULT_WEIGHTS,
        threshold=DEFAULT_THRESHOLD,
        tta_views=DEFAULT_TTA,
        detector_weights=yolo,
        gate_images=_prepared(synthetic_radiographs(48, 3 * TINY_SIZE, seed=seed), prep, seed=seed)
        if gate
        else None,
        gate_quantile=1.0,
        gate_margin=1.5,
        prep=prep,
        metrics={"note": "random weights"},
        onnx=onnx,
    )

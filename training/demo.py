"""Build model bundles: ``spine-train bundle`` (from trained artefacts) and ``spine-train
demo-bundle`` (the phantom-trained demo bundle embedded in the package, end to end).

The demo bundle is built by ONE command::

    spine-train demo-bundle --out spine_node/demo_bundle

It generates a balanced phantom (seeded), trains the three triage members (the method's timm
families, shrunk through ``create_model`` kwargs) on fold 0 of a study-level stratified split,
trains a small YOLO11 (a custom tiny scale of ``yolo11.yaml``), fits the ensemble weights and
the Youden threshold on the fold's validation (out-of-fold) predictions, fits the content gate
on training-image embeddings, trains the Meyerding grader, evaluates triage, detector and grader
on the held-out phantom test split and records those figures in the manifest. The manifest says
``demo: true`` and "demo, phantom-trained, not for clinical use".
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spine_node.models.bundle import Manifest, MemberSpec

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_INTENDED_USE",
    "DEMO_MEMBERS",
    "DemoSettings",
    "add_arguments",
    "build_demo_bundle",
    "bundle_add_arguments",
    "bundle_run",
    "run",
    "write_readme",
]

DEMO_INTENDED_USE = "demo, phantom-trained, not for clinical use"

#: The method's families, shrunk through timm kwargs (name, arch, kwargs).
DEMO_MEMBERS: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    ("densenet", "densenet121", {"growth_rate": 12, "block_config": [2, 3, 4, 3]}),
    ("efficientnet", "tf_efficientnetv2_s", {"channel_multiplier": 0.25, "depth_multiplier": 0.25}),
    (
        "resnet",
        "resnet50",
        {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
    ),
)


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo build (defaults: the committed demo bundle)."""

    images: int = 560
    rows: int = 512
    columns: int = 384
    seed: int = 0
    folds: int = 5
    triage_size: int = 192
    detect_size: int = 448
    member_epochs: int = 12
    member_batch: int = 32
    member_lr: float = 1e-3
    detector_epochs: int = 50
    detector_batch: int = 16
    detector_scale: tuple[float, float, int] = (0.33, 0.1875, 256)
    tta_views: int = 5
    version: str = "demo-2"
    members: tuple[tuple[str, str, Mapping[str, Any]], ...] = field(default=DEMO_MEMBERS)


# --------------------------------------------------------------------------- helpers


def _records(data_dir: Path) -> tuple[list[Any], list[Any]]:
    from training import vindr

    return vindr.load_records(data_dir, "train"), vindr.load_records(data_dir, "test")


def _member_config(settings: DemoSettings, name: str, arch: str, kwargs: Mapping[str, Any]) -> Any:
    from training.train_classifier import ClassifierConfig

    return ClassifierConfig(
        arch=arch,
        name=name,
        kwargs=dict(kwargs),
        input_size=settings.triage_size,
        epochs=settings.member_epochs,
        batch_size=settings.member_batch,
        lr=settings.member_lr,
        t_max=settings.member_epochs,
        patience=max(3, settings.member_epochs // 2),
        seed=settings.seed,
    )


def _ensemble_scores(
    members: Mapping[str, Any], images: np.ndarray, weights: Sequence[float], tta: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from spine_node.models.triage import TorchMembers, TriageEnsemble

    ensemble = TriageEnsemble(TorchMembers(dict(members), torch.device("cpu")), weights, tta)
    out = ensemble(np.asarray(images, dtype=np.float32))
    return out.scores, {k: np.asarray(v) for k, v in out.member_probs.items()}


def _detector_metrics(weights: Path, data_yaml: Path, imgsz: int, split: str) -> dict[str, Any]:
    from training.train_detector import offline_ultralytics

    with offline_ultralytics():
        from ultralytics import YOLO

        model = YOLO(str(weights))
        res = model.val(
            data=str(data_yaml),
            split=split,
            imgsz=imgsz,
            batch=16,
            conf=0.001,
            iou=0.6,
            plots=False,
            verbose=False,
            device="cpu",
            workers=0,
        )
    per_class = {
        str(res.names[int(c)]): float(ap)
        for c, ap in zip(res.box.ap_class_index, res.box.ap50, strict=True)
    }
    return {
        "map50": float(res.box.map50),
        "map50_95": float(res.box.map),
        "ap50_per_class": per_class,
    }


# --------------------------------------------------------------------------- demo build


def build_demo_bundle(
    out_dir: Path, work_dir: Path, settings: DemoSettings = DemoSettings()
) -> Manifest:
    """Build the demo bundle end to end (see the module docstring).

    Parameters
    ----------
    out_dir : pathlib.Path
        Bundle directory (replaced).
    work_dir : pathlib.Path
        Scratch directory for the phantom, caches and training runs.
    settings : DemoSettings
        Build settings.

    Returns
    -------
    Manifest
    """
    from sklearn.metrics import roc_auc_score

    from spine_node.imaging import PrepParams
    from spine_node.models.triage import TriageMember, create_member
    from training import vindr
    from training.detector_extras import DetectorExtras
    from training.ensemble import OofPredictions, fit_ensemble, youden_threshold
    from training.export import build_bundle, reference_from_validation
    from training.meyerding import evaluate_on_phantom, save_grader, train_from_phantom
    from training.phantom import write_phantom_dataset
    from training.train_classifier import train_fold
    from training.train_detector import DetectorConfig, tiny_model_yaml, train_detector

    t_start = time.monotonic()
    timings: dict[str, float] = {}
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = work_dir / "phantom"
    s = settings

    # 1. phantom -----------------------------------------------------------------------
    t = time.monotonic()
    if not (data_dir / "annotations" / "train.csv").is_file():
        write_phantom_dataset(data_dir, s.images, s.seed, balanced=True, size=(s.rows, s.columns))
    train_recs, test_recs = _records(data_dir)
    timings["phantom_s"] = time.monotonic() - t

    params = PrepParams(triage_size=s.triage_size, detect_size=s.detect_size)
    cache = work_dir / "cache"
    by_id = {r.image_id: r for r in train_recs}
    train_ids, val_ids = vindr.study_stratified_kfold(train_recs, s.folds, s.seed)[0]
    fold_train = [by_id[i] for i in train_ids]
    fold_val = [by_id[i] for i in val_ids]
    train_set = vindr.TriageDataset(fold_train, params, cache)
    val_set = vindr.TriageDataset(fold_val, params, cache)
    test_set = vindr.TriageDataset(test_recs, params, cache)
    t = time.monotonic()
    vindr.warm_cache([*train_recs, *test_recs], params, cache, workers=None)  # parallel, once
    timings["prepare_s"] = time.monotonic() - t

    # 2. triage members (fold 0), OOF predictions -------------------------------------
    t = time.monotonic()
    member_results = []
    for name, arch, kwargs in s.members:
        cfg = _member_config(s, name, arch, kwargs)
        # resume=True: a re-run with the same settings reuses finished members
        member_results.append(
            train_fold(
                cfg,
                train_set,
                val_set,
                work_dir / "members" / name / "fold0",
                fold=0,
                from_scratch=True,  # the shrunk demo members have no pretrained weights
                resume=True,
            )
        )
    timings["members_s"] = time.monotonic() - t

    wrapped: dict[str, TriageMember] = {}
    specs: list[tuple[MemberSpec, Path]] = []
    for res in member_results:
        model = create_member(res.spec)
        model.load_state_dict(torch.load(res.best_weights, map_location="cpu", weights_only=True))
        wrapped[res.spec.name] = TriageMember(model, res.spec.mean, res.spec.std).eval()
        specs.append((res.spec, res.best_weights))

    # 3. ensemble weights + threshold on validation (out-of-fold) predictions ---------
    val_images = np.stack([val_set.array(i) for i in range(len(val_set))])
    val_labels = val_set.labels
    _, val_member = _ensemble_scores(
        wrapped, val_images, [1 / len(wrapped)] * len(wrapped), s.tta_views
    )
    names = tuple(wrapped)
    oof = OofPredictions(
        members=names,
        image_ids=tuple(r.image_id for r in fold_val),
        scores=np.stack([val_member[n] for n in names], axis=1),
        labels=val_labels.astype(np.int64),
    )
    fit = fit_ensemble(oof)
    logger.info("ensemble fit on %d validation images: %s", fit.n_images, fit)
    reference = reference_from_validation(
        np.clip(oof.scores @ np.asarray(fit.weights), 0.0, 1.0),
        fit.threshold,
        "phantom fold-0 validation split",
    )

    # 4. detector ------------------------------------------------------------------------
    t = time.monotonic()
    yolo = vindr.export_yolo(
        {"train": fold_train, "val": fold_val, "test": test_recs},
        work_dir / "yolo",
        params=params,
        cache_dir=cache,  # the images decoded for the members; reused when up to date
    )
    depth, width, max_ch = s.detector_scale
    det_cfg = DetectorConfig(
        model=str(
            tiny_model_yaml(
                work_dir / "yolo11-demo.yaml", depth=depth, width=width, max_channels=max_ch
            )
        ),
        imgsz=s.detect_size,
        epochs=s.detector_epochs,
        batch=s.detector_batch,
        nbs=64,
        close_mosaic=max(1, s.detector_epochs // 3),
        warmup_epochs=2.0,
        lr0=0.01,
        scale_range=None,
        mixup=0.0,
        patience=s.detector_epochs,
        seed=s.seed,
        workers=2,
        extras=DetectorExtras(),
    )
    det = train_detector(det_cfg, yolo.data_yaml, work_dir / "detector", from_scratch=True)
    timings["detector_s"] = time.monotonic() - t

    # 5. grader -------------------------------------------------------------------------
    t = time.monotonic()
    grader, n_slips = train_from_phantom(data_dir, split="train", seed=s.seed)
    grader_file = save_grader(grader, work_dir / "grader.joblib")
    grader_test = evaluate_on_phantom(grader, data_dir, split="test")
    timings["grader_s"] = time.monotonic() - t

    # 6. held-out evaluation (phantom test split, touched once) --------------------------
    t = time.monotonic()
    test_images = np.stack([test_set.array(i) for i in range(len(test_set))])
    test_labels = test_set.labels
    test_scores, test_member = _ensemble_scores(wrapped, test_images, fit.weights, s.tta_views)
    pred = test_scores >= fit.threshold
    tp = int(np.sum(pred & (test_labels == 1)))
    tn = int(np.sum(~pred & (test_labels == 0)))
    fp = int(np.sum(pred & (test_labels == 0)))
    fn = int(np.sum(~pred & (test_labels == 1)))
    det_test = _detector_metrics(det.best, yolo.data_yaml, s.detect_size, "test")
    timings["evaluate_s"] = time.monotonic() - t
    test_youden = youden_threshold(test_scores, test_labels)  # reported only, never used
    metrics: dict[str, Any] = {
        "dataset": f"phantom (balanced, seed {s.seed}, {s.images} images {s.rows}x{s.columns})",
        "split": "phantom test split (held out; weights/threshold fitted on fold-0 validation)",
        "n_test_images": len(test_recs),
        "n_test_abnormal": int(test_labels.sum()),
        "triage_auroc": float(roc_auc_score(test_labels, test_scores)),
        "triage_member_auroc": {
            n: float(roc_auc_score(test_labels, test_member[n])) for n in names
        },
        "triage_sensitivity": tp / max(tp + fn, 1),
        "triage_specificity": tn / max(tn + fp, 1),
        "triage_f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "test_best_threshold_for_reference_only": test_youden[0],
        "detector_map50": det_test["map50"],
        "detector_map50_95": det_test["map50_95"],
        "detector_ap50_per_class": det_test["ap50_per_class"],
        "detector_metric_source": "ultralytics val (all test images, conf 0.001)",
        "grader_test_accuracy": grader_test["accuracy"],
        "grader_test_n": int(grader_test["n"]),
        "grader_train_n": n_slips,
        "validation": {
            "n_images": fit.n_images,
            "auroc": fit.auroc,
            "member_auroc": dict(zip(names, fit.member_auroc, strict=True)),
            "sensitivity": fit.sensitivity,
            "specificity": fit.specificity,
        },
        "members_best_epoch": {r.spec.name: r.best_epoch for r in member_results},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "build_seconds": round(time.monotonic() - t_start, 1),
        "settings": json.loads(json.dumps(asdict(s), default=list)),
    }

    # 7. bundle ----------------------------------------------------------------------------
    gate_images = np.stack([train_set.array(i) for i in range(len(train_set))])
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    manifest = build_bundle(
        Path(out_dir),
        name="spine-node-demo",
        version=s.version,
        intended_use=DEMO_INTENDED_USE,
        demo=True,
        members=specs,
        ensemble_weights=fit.weights,
        threshold=fit.threshold,
        tta_views=s.tta_views,
        detector_weights=det.best,
        gate_images=gate_images,
        grader_file=grader_file,
        prep={k: v for k, v in asdict(params).items() if k != "max_pixels"},
        metrics={**metrics, "build_seconds": round(time.monotonic() - t_start, 1)},
        score_reference=reference,
        onnx=True,
    )
    write_readme(Path(out_dir), manifest)
    total = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    logger.info(
        "demo bundle: %.1f MB in %s, %.0f s", total / 1e6, out_dir, time.monotonic() - t_start
    )
    return manifest


def write_readme(out_dir: Path, manifest: Manifest) -> Path:
    """Write ``README.md`` next to the manifest: how the bundle was built and its figures."""
    m = dict(manifest.metrics)
    nan = float("nan")
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file() and p.name != "README.md")
    weights = dict(zip([s.name for s in manifest.members], manifest.ensemble_weights, strict=True))
    lines = [
        f"# {manifest.name} {manifest.version}: {manifest.intended_use}",
        "",
        "Phantom-trained demo bundle embedded in the package. It shows the node working end to",
        "end; it has never seen a real radiograph and must not be used on patients.",
        "",
        "Rebuild (same seed, same settings; CPU only):",
        "",
        "    spine-train demo-bundle --out spine_node/demo_bundle",
        "",
        "Held-out phantom test split (weights and threshold fitted on validation only):",
        "",
        f"- triage AUROC {m.get('triage_auroc', nan):.3f}, sensitivity "
        f"{m.get('triage_sensitivity', nan):.3f}, specificity "
        f"{m.get('triage_specificity', nan):.3f} at threshold {manifest.threshold:.3f}",
        f"- detector mAP@0.5 {m.get('detector_map50', nan):.3f}, "
        f"mAP@0.5:0.95 {m.get('detector_map50_95', nan):.3f}",
        f"- Meyerding grader accuracy {m.get('grader_test_accuracy', nan):.3f} "
        f"on {m.get('grader_test_n', 0)} slips",
        f"- ensemble weights {weights}",
        f"- bundle size {size / 1e6:.1f} MB; build time {m.get('build_seconds', 0):.0f} s",
        "",
        "Full figures and settings: `manifest.json` (`metrics`).",
        "",
    ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------- CLIs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train demo-bundle`` arguments."""
    d = DemoSettings()
    parser.add_argument(
        "--out", type=Path, required=True, help="bundle directory (e.g. spine_node/demo_bundle)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(".cache/demo-work"),
        help="scratch directory (default .cache/demo-work)",
    )
    parser.add_argument("--images", type=int, default=d.images)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--member-epochs", type=int, default=d.member_epochs)
    parser.add_argument("--detector-epochs", type=int, default=d.detector_epochs)
    parser.add_argument("--detect-size", type=int, default=d.detect_size)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="where to write the demo's sample studies (default: samples/ next to --out, "
        "i.e. spine_node/samples)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train demo-bundle``."""
    torch.set_num_threads(args.threads)
    settings = replace(
        DemoSettings(),
        images=args.images,
        seed=args.seed,
        member_epochs=args.member_epochs,
        detector_epochs=args.detector_epochs,
        detect_size=args.detect_size,
    )
    manifest = build_demo_bundle(Path(args.out), Path(args.work), settings)
    from training.samples import write_demo_samples

    samples = write_demo_samples(args.samples or Path(args.out).parent / "samples")
    print(json.dumps(dict(manifest.metrics), indent=2, default=str))
    print(f"{len(samples)} sample images for spine-node demo written")
    return 0


def bundle_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train bundle`` arguments."""
    parser.add_argument("--out", type=Path, required=True, help="bundle directory")
    parser.add_argument("--name", default="spine-node")
    parser.add_argument("--version", required=True)
    parser.add_argument("--intended-use", default="research use; outputs are unverified")
    parser.add_argument("--demo", action="store_true")
    parser.add_argument(
        "--member",
        nargs="+",
        required=True,
        metavar="DIR",
        help="classifier output directories (member.json + foldK/best.pt), in ensemble order",
    )
    parser.add_argument(
        "--fold", type=int, default=0, help="which fold's weights to ship (default 0)"
    )
    parser.add_argument(
        "--ensemble", type=Path, required=True, help="JSON from spine-train ensemble"
    )
    parser.add_argument("--detector", type=Path, required=True, help="Ultralytics .pt")
    parser.add_argument(
        "--data", type=Path, help="data root: the gate is fitted on train.csv images"
    )
    parser.add_argument(
        "--gate-images", type=int, default=2000, help="at most this many gate images"
    )
    parser.add_argument("--grader", type=Path, help="Meyerding grader (.joblib)")
    parser.add_argument("--tta", type=int, default=5)
    parser.add_argument("--detect-size", type=int, default=640)
    parser.add_argument("--metrics", type=Path, help="JSON of held-out figures to record")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="prepared-image cache for the gate images (default: prepared-cache/ beside --out)",
    )
    parser.add_argument("--no-onnx", action="store_true")


def bundle_run(args: argparse.Namespace) -> int:
    """Run ``spine-train bundle``."""
    from spine_node.drift import ScoreReference
    from spine_node.imaging import PrepParams
    from training.train_classifier import member_spec

    fit = json.loads(Path(args.ensemble).read_text())
    members: list[tuple[MemberSpec, Path]] = []
    for d in args.member:
        info = json.loads((Path(d) / "member.json").read_text())
        cfg_doc = dict(info["config"])
        from training.train_classifier import AugmentParams, ClassifierConfig

        cfg_doc["augment"] = AugmentParams(
            **{**cfg_doc["augment"], "blur_sigma": tuple(cfg_doc["augment"]["blur_sigma"])}
        )
        cfg = ClassifierConfig(**cfg_doc)
        members.append((member_spec(cfg), Path(d) / f"fold{args.fold}" / "best.pt"))
    names = tuple(m[0].name for m in members)
    if tuple(fit["members"]) != names:
        logger.warning(
            "ensemble members %s differ from --member names %s; using the given order",
            fit["members"],
            names,
        )
    input_size = members[0][0].input_size
    params = PrepParams(triage_size=input_size, detect_size=args.detect_size)
    gate_images = None
    if args.data:
        from training import vindr

        records = vindr.load_records(Path(args.data), "train")[: args.gate_images]
        cache = args.cache_dir or Path(args.out).resolve().parent / "prepared-cache"
        ds = vindr.TriageDataset(records, params, cache)
        gate_images = np.stack([ds.array(i) for i in range(len(ds))])
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else {}
    from training.export import build_bundle

    build_bundle(
        Path(args.out),
        name=args.name,
        version=args.version,
        intended_use=args.intended_use,
        demo=args.demo,
        members=members,
        ensemble_weights=tuple(fit["weights"]),
        threshold=float(fit["threshold"]),
        tta_views=args.tta,
        detector_weights=args.detector,
        gate_images=gate_images,
        grader_file=args.grader,
        prep={k: v for k, v in asdict(params).items() if k != "max_pixels"},
        metrics={
            **metrics,
            "ensemble_validation": {k: fit[k] for k in ("auroc", "n_images") if k in fit},
        },
        score_reference=None
        if fit.get("score_reference") is None
        else ScoreReference.from_json(fit["score_reference"]),
        onnx=not args.no_onnx,
    )
    print(f"bundle written to {args.out}")
    return 0

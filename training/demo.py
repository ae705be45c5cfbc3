"""Build model bundles: ``spine-train bundle`` (from trained artefacts) and ``spine-train
demo-bundle`` (the phantom-trained demo bundle embedded in the package, end to end).

The demo bundle is built by ONE command::

    spine-train demo-bundle --out spine_node/demo_bundle

It generates a balanced phantom (seeded), trains the three triage members (the method's timm
families, shrunk through ``create_model`` kwargs) on fold 0 of a study-level stratified split,
trains a small YOLO11 (a custom tiny scale of ``yolo11.yaml``), fits the ensemble weights and
the Youden threshold on the fold's validation predictions made as the bundle serves (the shipped
fold-0 models with the same TTA views), fits the content gate on training-image embeddings (optionally with rendering variants:
:mod:`training.gate_images`),
trains the Meyerding grader and writes the bundle without touching the test split. It checks
bf16 against fp32 on the held-out split (``training.precision``: agreement of the same model at
two precisions, nothing fitted or chosen from it but whether bf16 may be served) and records the
checks in the manifest. Then it
evaluates the bundle ONCE on the held-out phantom test split through ``spine-train predict`` and
``evaluate`` (the node's own gated output, :func:`evaluate_demo_bundle`), which records the
evaluation in the bundle's ledger and model card, and writes the README from that record. The
manifest says ``demo: true`` and "demo, phantom-trained, not for clinical use".
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spine_node.models.bundle import Manifest, MemberSpec, load_manifest

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
    seed: int = 11
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
    version: str = "demo-4"
    #: 0: the demo's phantom-trained members cannot tell rendered spines from a chest film
    #: (benchmarks/gate_renderings.py); rendering variants would make the gate accept both.
    gate_renderings: int = 0
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


def train_demo_detector(
    s: DemoSettings,
    work_dir: Path,
    fold_train: Sequence[Any],
    fold_val: Sequence[Any],
    params: Any,
    cache: Path,
) -> Path:
    """Train the demo's tiny YOLO11 on fold 0 (or reuse a finished run with the same config).

    Returns
    -------
    pathlib.Path
        The run's ``best.pt``.
    """
    from training import vindr
    from training.detector_extras import DetectorExtras
    from training.train_detector import DetectorConfig, tiny_model_yaml, train_detector

    yolo = vindr.export_yolo(
        {"train": fold_train, "val": fold_val},
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
    out = work_dir / "detector"
    done = out / "detector.json"
    best = out / "train" / "weights" / "best.pt"
    wanted = json.loads(json.dumps(asdict(det_cfg), default=str))
    if done.is_file() and best.is_file() and json.loads(done.read_text()).get("config") == wanted:
        logger.info("reusing the finished detector run in %s (same settings)", out)
        return best
    return train_detector(det_cfg, yolo.data_yaml, out, from_scratch=True).best


def _clear_keeping_ledger(out_dir: Path) -> None:
    """Empty a bundle directory but keep its ledger of test-split evaluations."""
    from training.model_card import EVALUATIONS_NAME

    if not out_dir.exists():
        return
    for path in out_dir.iterdir():
        if path.name == EVALUATIONS_NAME:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------- demo build


def build_demo_bundle(
    out_dir: Path,
    work_dir: Path,
    settings: DemoSettings = DemoSettings(),
    *,
    detector_weights: Path | None = None,
    detector_source: str = "",
    precision_check: bool = True,
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
    detector_weights : pathlib.Path, optional
        An Ultralytics checkpoint to ship instead of training the detector (recorded in the
        manifest as ``metrics.detector_source``).
    detector_source : str
        Where ``detector_weights`` came from, in words (recorded).
    precision_check : bool
        Run the bf16 agreement check (step 8); without it the node serves fp32 (run
        ``spine-train check-precision`` on the bundle later).

    Returns
    -------
    Manifest
    """
    from spine_node.imaging import PrepParams
    from spine_node.models.triage import TriageMember, create_member
    from training import vindr
    from training.ensemble import FITTED_ON_SERVED, OofPredictions, fit_ensemble
    from training.export import build_bundle, reference_from_validation
    from training.meyerding import evaluate_on_phantom, save_grader, train_from_phantom
    from training.phantom import write_phantom_dataset
    from training.train_classifier import train_fold

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
    t = time.monotonic()
    # the test split is touched once, after the build (spine-train predict + evaluate)
    vindr.warm_cache(list(train_recs), params, cache, workers=None)  # parallel, once
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
    fitted_on = {
        "kind": FITTED_ON_SERVED,
        "description": (
            f"fold 0 validation images ({len(fold_val)}), the shipped fold-0 models, "
            f"{s.tta_views}-view TTA, the node's preparation and ensemble"
        ),
        "fold": 0,
        "tta_views": s.tta_views,
        "members": list(names),
        "n_images": len(fold_val),
    }

    # 4. detector ------------------------------------------------------------------------
    t = time.monotonic()
    if detector_weights is None:
        detector_best = train_demo_detector(s, work_dir, fold_train, fold_val, params, cache)
        detector_note = f"trained by this build on fold 0 of phantom seed {s.seed}"
    else:
        detector_best = Path(detector_weights)
        detector_note = f"not trained by this build: {detector_source or detector_best.name}"
        logger.info("detector: %s", detector_note)
    timings["detector_s"] = time.monotonic() - t

    # 5. grader -------------------------------------------------------------------------
    t = time.monotonic()
    grader, n_slips = train_from_phantom(data_dir, split="train", seed=s.seed)
    grader_file = save_grader(grader, work_dir / "grader.joblib")
    grader_test = evaluate_on_phantom(grader, data_dir, split="test")
    timings["grader_s"] = time.monotonic() - t

    # 6. figures known at build time (validation only; the test split comes after) ------
    metrics: dict[str, Any] = {
        "dataset": f"phantom (balanced, seed {s.seed}, {s.images} images {s.rows}x{s.columns})",
        "n_test_images": len(test_recs),
        "test_split": "evaluated once after the build by spine-train predict + evaluate: "
        "see MODEL_CARD.md and evaluations.json",
        "ensemble_fit": {
            "fitted_on": fitted_on,
            "weights": list(fit.weights),
            "threshold": fit.threshold,
            "auroc": fit.auroc,
            "sensitivity": fit.sensitivity,
            "specificity": fit.specificity,
            "n_images": fit.n_images,
        },
        "detector_source": detector_note,
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
        "settings": json.loads(json.dumps(asdict(s), default=list)),
    }

    # 7. bundle ----------------------------------------------------------------------------
    from training.gate_images import gate_images as rendered_gate_images

    gate_images = rendered_gate_images(
        [str(r.path) for r in fold_train],
        [train_set.array(i) for i in range(len(train_set))],
        params,
        renderings=s.gate_renderings,
        seed=s.seed,
    )
    _clear_keeping_ledger(Path(out_dir))
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
        detector_weights=detector_best,
        gate_images=gate_images,
        grader_file=grader_file,
        prep={k: v for k, v in asdict(params).items() if k != "max_pixels"},
        metrics={**metrics, "build_seconds": round(time.monotonic() - t_start, 1)},
        score_reference=reference,
        onnx=True,
    )

    # 8. bf16 agreement with fp32 on the held-out split, recorded in the manifest ----------
    from training.precision import check_bundle_precision

    if precision_check:
        t = time.monotonic()
        check_bundle_precision(Path(out_dir), data_dir, split="test")
        manifest = load_manifest(Path(out_dir))
        logger.info("precision checks recorded in %.0f s", time.monotonic() - t)
    write_readme(Path(out_dir), manifest)
    total = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    logger.info(
        "demo bundle: %.1f MB in %s, %.0f s", total / 1e6, out_dir, time.monotonic() - t_start
    )
    return manifest


def evaluate_demo_bundle(out_dir: Path, work_dir: Path) -> dict[str, Any]:
    """Evaluate the demo bundle ONCE on its held-out phantom test split, and record it.

    Runs what these two commands run (the node's own gated output, at the bundle's threshold,
    95 % bootstrap intervals over studies) and records the evaluation in the bundle's ledger
    and model card::

        spine-train predict --bundle OUT --data WORK/phantom --split test --out WORK/test-predictions
        spine-train evaluate --run WORK/test-predictions

    Returns
    -------
    dict
        The evaluation report (``spine-train evaluate --json``).
    """
    from training.evaluate import evaluate_and_record
    from training.predict import DETECTIONS_NAME, SCORES_NAME, predict_split

    data_dir = Path(work_dir) / "phantom"
    pred_dir = Path(work_dir) / "test-predictions"
    commands = predict_commands(Path(out_dir), data_dir, pred_dir)
    prediction = predict_split(Path(out_dir), data_dir, "test", pred_dir)
    return evaluate_and_record(
        prediction.annotations,
        scores=pred_dir / SCORES_NAME,
        predictions=pred_dir / DETECTIONS_NAME,
        bundle=Path(out_dir),
        split="test",
        prediction_run=prediction,
        command=" && ".join(commands),
    )


def predict_commands(out_dir: Path, data_dir: Path, pred_dir: Path) -> tuple[str, str]:
    """The ``spine-train predict`` and ``evaluate`` command lines of a demo evaluation."""
    return (
        f"spine-train predict --bundle {out_dir} --data {data_dir} --split test --out {pred_dir}",
        f"spine-train evaluate --run {pred_dir} --json",
    )


def write_readme(out_dir: Path, manifest: Manifest) -> Path:
    """Write ``README.md`` next to the manifest: how the bundle was built and its figures.

    The test figures are those of the bundle's latest recorded test-split evaluation
    (``evaluations.json``), with the commands that produced them.
    """
    from training.model_card import bundle_hash, read_evaluations

    m = dict(manifest.metrics)
    size = sum(
        p.stat().st_size
        for p in out_dir.iterdir()
        if p.is_file() and p.name.endswith((".pt", ".onnx", ".npz", ".joblib", ".json"))
    )
    weights = dict(zip([s.name for s in manifest.members], manifest.ensemble_weights, strict=True))
    settings = dict(m.get("settings", {}))
    fit = dict(m.get("ensemble_fit", {}))
    fitted_on = dict(fit.get("fitted_on", {}))
    digest = bundle_hash(out_dir)
    mine = [e for e in read_evaluations(out_dir) if e.bundle_hash == digest and e.split == "test"]
    lines = [
        f"# {manifest.name} {manifest.version}: {manifest.intended_use}",
        "",
        "Phantom-trained demo bundle embedded in the package. It shows the node working end to",
        "end; it has never seen a real radiograph and must not be used on patients.",
        "",
        f"Rebuild (phantom seed {settings.get('seed')}, same settings; CPU only; the build ends by",
        "evaluating the bundle once on its held-out phantom test split, as below):",
        "",
        "    spine-train demo-bundle --out spine_node/demo_bundle",
        "",
        *(
            [
                "This build did not train its detector (see below); to ship the same one, copy",
                "`detector.pt` out of the bundle and add `--detector-weights COPY`.",
                "",
            ]
            if "not trained" in str(m.get("detector_source", ""))
            else []
        ),
        f"Ensemble weights {weights} and threshold {manifest.threshold:.3f} were fitted on "
        f"{fitted_on.get('description', 'validation predictions')}.",
        f"Detector: {m.get('detector_source', 'trained by this build')}.",
        "",
    ]
    if not mine:
        lines += ["Not evaluated on a test split yet.", ""]
    else:
        e = mine[-1]
        f = dict(e.figures)

        def fig(key: str) -> str:
            value, ci = f.get(key), f.get(f"{key}_ci95")
            if not isinstance(value, int | float):
                return "n/a"
            if (
                isinstance(ci, list)
                and len(ci) == 2
                and all(isinstance(v, int | float) for v in ci)
            ):
                return f"{value:.3f} (95 % CI {ci[0]:.3f}-{ci[1]:.3f})"
            return f"{value:.3f}"

        ap = dict(f.get("ap50", {}))
        lines += [
            f"Held-out phantom test split (seed {settings.get('seed')}, {e.n_images} images, "
            f"split hash `{e.split_hash[:12]}`), evaluated once on {e.when} on the node's own "
            "gated output (gate, TTA, ensemble, threshold, hard-gated detector at confidence "
            f"{manifest.detector.conf}); images the node did not process "
            f"({f.get('n_not_processed', 0)}) count as negative calls with score 0; 95 % "
            "intervals from 1000 bootstrap resamples of studies. Command:",
            "",
            f"    {e.command}",
            "",
            "| measure | value |",
            "|---|---|",
            f"| triage AUROC | {fig('auroc')} |",
            f"| sensitivity at threshold {manifest.threshold:.3f} | {fig('sensitivity')} |",
            f"| specificity | {fig('specificity')} |",
            f"| F1 | {fig('f1')} |",
            f"| detector mAP@0.5 (COCO, maxDets 100) | {fig('map50')} |",
            f"| detector mAP@0.5:0.95 | {fig('map50_95')} |",
            "| AP@0.5 per class | "
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, int | float) else f"{k} n/a" for k, v in ap.items()
            )
            + " |",
            "",
        ]
    lines += [
        f"Meyerding grader accuracy {m.get('grader_test_accuracy', float('nan')):.3f} on "
        f"{m.get('grader_test_n', 0)} slips of the test split (computed by the build).",
        f"Bundle size {size / 1e6:.1f} MB; build time {m.get('build_seconds', 0):.0f} s.",
        "",
        "bf16 against fp32 on the held-out split (the node serves bf16 only when passed):",
        "",
        *(
            f"- {'passed' if c.passed else 'FAILED'}: {c.summary()}"
            for c in manifest.precision_checks
        ),
        "",
        "Model card and every test-split evaluation: `MODEL_CARD.md`, `evaluations.json`;",
        "settings and validation figures: `manifest.json` (`metrics`); bf16 agreement checks:",
        "`manifest.json` (`precision_checks`).",
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
        default=None,
        help="scratch directory: phantom, caches, trained members and detector, test "
        "predictions; a re-run with the same settings reuses them (default "
        ".cache/demo-work-SEED)",
    )
    parser.add_argument("--images", type=int, default=d.images)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--member-epochs", type=int, default=d.member_epochs)
    parser.add_argument("--detector-epochs", type=int, default=d.detector_epochs)
    parser.add_argument("--detect-size", type=int, default=d.detect_size)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--gate-renderings",
        type=int,
        default=d.gate_renderings,
        help="rendering variants per training image in the gate fit (training.gate_images)",
    )
    parser.add_argument(
        "--detector-weights",
        type=Path,
        help="ship this Ultralytics checkpoint instead of training the detector (recorded)",
    )
    parser.add_argument(
        "--detector-source",
        default="",
        help="where --detector-weights came from, in words (recorded in the manifest)",
    )
    parser.add_argument(
        "--skip-precision-check",
        action="store_true",
        help="skip the bf16 agreement check (the node then serves fp32; run "
        "spine-train check-precision later)",
    )
    parser.add_argument(
        "--no-evaluate",
        action="store_true",
        help="skip the one evaluation on the held-out phantom test split",
    )
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
        gate_renderings=args.gate_renderings,
    )
    work = Path(args.work) if args.work is not None else Path(f".cache/demo-work-{args.seed}")
    manifest = build_demo_bundle(
        Path(args.out),
        work,
        settings,
        detector_weights=args.detector_weights,
        detector_source=args.detector_source,
        precision_check=not args.skip_precision_check,
    )
    if not args.no_evaluate:
        report = evaluate_demo_bundle(Path(args.out), work)
        print(json.dumps(report, indent=2, default=str))
    write_readme(Path(args.out), manifest)
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
    parser.add_argument(
        "--gate-renderings",
        type=int,
        default=0,
        help="rendering variants per gate image (tone curve, window, posterisation, noise: "
        "training.gate_images); 0 (default) fits on the images as prepared. Check the choice "
        "with benchmarks/gate_renderings.py on the bundle's validation images",
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
    from training.ensemble import FITTED_ON_SERVED, load_member_dir

    fit = json.loads(Path(args.ensemble).read_text())
    members: list[tuple[MemberSpec, Path]] = [
        load_member_dir(Path(d), args.fold) for d in args.member
    ]
    names = tuple(m[0].name for m in members)
    fitted_on = dict(fit.get("fitted_on") or {})
    served = {
        "kind": FITTED_ON_SERVED,
        "fold": args.fold,
        "tta_views": args.tta,
        "members": list(names),
    }
    differs = {k: fitted_on.get(k) for k, v in served.items() if fitted_on.get(k) != v}
    if differs:
        print(
            f"spine-train bundle: refused: {args.ensemble} was not fitted the way this bundle "
            f"serves ({served}); it has {differs}. Fit with `spine-train ensemble --member "
            f"{' '.join(map(str, args.member))} --fold {args.fold} --tta {args.tta} --data ROOT`",
            file=sys.stderr,
        )
        return 2
    input_size = members[0][0].input_size
    params = PrepParams(triage_size=input_size, detect_size=args.detect_size)
    gate_images = None
    if args.data:
        from training import vindr

        records = vindr.load_records(Path(args.data), "train")[: args.gate_images]
        cache = args.cache_dir or Path(args.out).resolve().parent / "prepared-cache"
        ds = vindr.TriageDataset(records, params, cache)
        from training.gate_images import gate_images as rendered_gate_images

        gate_images = rendered_gate_images(
            [str(r.path) for r in records],
            [ds.array(i) for i in range(len(ds))],
            params,
            renderings=args.gate_renderings,
        )
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
            "ensemble_fit": {
                "fitted_on": fitted_on,
                **{
                    k: fit[k]
                    for k in (
                        "weights",
                        "threshold",
                        "auroc",
                        "sensitivity",
                        "specificity",
                        "n_images",
                    )
                    if k in fit
                },
            },
        },
        score_reference=None
        if fit.get("score_reference") is None
        else ScoreReference.from_json(fit["score_reference"]),
        onnx=not args.no_onnx,
    )
    print(f"bundle written to {args.out}")
    return 0

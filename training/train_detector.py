"""Train the YOLO11 lesion detector, fully offline.

The VinDr CSV and DICOM files are converted to Ultralytics' dataset layout by
``training.vindr`` (images through ``spine_node.imaging.prepare``), then
:class:`training.detector_extras.SpineDetectionTrainer` trains with the method's settings
(spec.md): SGD (momentum 0.9, weight decay 5e-4), lr0 0.01 with a cosine schedule, 3 warm-up
epochs, batch 12 with nominal batch 48, 55 epochs with mosaic closed for the last 30, loss gains
box 7.5 / cls 0.5 / dfl 1.5, mixup 0.1, HSV (0.015, 0.7, 0.4), fliplr 0.5 and multi-scale
480-768 px. Class-balanced sampling, rare-box copy-paste (0.2) and a soft-target class loss
(varifocal or quality focal) are switchable (``training.detector_extras``).

Offline: ``YOLO_OFFLINE`` is set, settings sync is off, ``plots=False`` (no font download),
Ultralytics' dataset font check is skipped, AMP is off unless asked for on CUDA (its check
downloads a model), and weights only come from a local file: ``--pretrained-file`` or
``<model stem>.pt`` in ``--pretrained-dir`` (``pretrained/yolo11l.pt`` for ``yolo11l.yaml``).
Training from random weights is refused unless ``--from-scratch`` is given.

The YOLO data set is exported from the shared prepared-image cache (``--cache-dir``, default
``prepared-cache/`` beside ``--out``; each DICOM file decoded once, in parallel) and reused
when it is already complete (a resumed run does not export again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest import mock

from spine_node.offline import configure_offline

configure_offline()

from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from training.detector_extras import (  # noqa: E402
    CLASS_LOSSES,
    DetectorExtras,
    SpineDetectionTrainer,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PRETRAINED_DIR",
    "DetectorConfig",
    "DetectorResult",
    "add_arguments",
    "expected_pretrained_file",
    "offline_ultralytics",
    "run",
    "tiny_model_yaml",
    "train_detector",
]

#: Default folder of local pretrained weights files.
DEFAULT_PRETRAINED_DIR = Path("pretrained")


def _default_workers() -> int:
    from training.vindr import default_workers

    return default_workers()


@dataclass(frozen=True)
class DetectorConfig:
    """Detector training settings (defaults: spec.md).

    ``scale_range`` is the multi-scale training range in pixels; ``None`` trains at ``imgsz``.
    """

    model: str = "yolo11l.yaml"
    imgsz: int = 640
    epochs: int = 55
    batch: int = 12
    nbs: int = 48
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    close_mosaic: int = 30
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    mixup: float = 0.1
    mosaic: float = 1.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    fliplr: float = 0.5
    scale: float = 0.5
    translate: float = 0.1
    scale_range: tuple[int, int] | None = (480, 768)
    patience: int = 100
    seed: int = 0
    workers: int = field(default_factory=_default_workers)
    amp: bool = False
    extras: DetectorExtras = field(default_factory=DetectorExtras)

    def __post_init__(self) -> None:
        for key in ("imgsz", "epochs", "batch", "nbs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if self.close_mosaic < 0:
            raise ValueError(f"close_mosaic must be >= 0, got {self.close_mosaic!r}")


def expected_pretrained_file(model: str, pretrained_dir: Path = DEFAULT_PRETRAINED_DIR) -> Path:
    """The local checkpoint expected for a model YAML: ``<pretrained_dir>/<stem>.pt``.

    ``yolo11l.yaml`` expects ``pretrained/yolo11l.pt`` (Ultralytics' COCO-pretrained YOLO11-L).
    """
    return Path(pretrained_dir) / f"{Path(model).stem}.pt"


def _start_weights(
    config: DetectorConfig,
    pretrained_file: Path | None,
    pretrained_dir: Path,
    from_scratch: bool,
) -> Path | None:
    """The checkpoint to start from, None for random weights (only with ``from_scratch``)."""
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file {pretrained_file} does not exist")
        return Path(pretrained_file)
    if Path(config.model).suffix == ".pt":  # the model file is itself a trained checkpoint
        return None
    expected = expected_pretrained_file(config.model, pretrained_dir)
    if expected.is_file():
        return expected
    if from_scratch:
        logger.warning("%s: training from random weights (from_scratch)", config.model)
        return None
    raise FileNotFoundError(
        f"no pretrained weights for {config.model}: expected the local file {expected} "
        "(Ultralytics' release checkpoint of that name); give --pretrained-file, or "
        "--from-scratch to train from random weights"
    )


@dataclass(frozen=True)
class DetectorResult:
    """Outcome of :func:`train_detector`."""

    best: Path
    last: Path
    run_dir: Path
    metrics: Mapping[str, float]
    sampling_weights: tuple[float, ...] | None
    extras_used: Mapping[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def offline_ultralytics() -> Iterator[None]:
    """Keep Ultralytics off the network while training: no settings sync, no font download."""
    configure_offline()
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync", False):
        SETTINGS.update({"sync": False})
    with mock.patch("ultralytics.data.utils.check_font", lambda *a, **k: None):
        yield


def tiny_model_yaml(
    path: Path, *, depth: float = 0.33, width: float = 0.125, max_channels: int = 256
) -> Path:
    """Write a YOLO11 model YAML with one custom (small) scale, e.g. for the demo bundle.

    Parameters
    ----------
    path : pathlib.Path
        Where to write; its name must not look like ``yolo11n.yaml`` (the scale would be guessed
        from it).
    depth, width : float
        Depth and width multipliers.
    max_channels : int
        Channel cap.
    """
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    base = yaml_model_load("yolo11.yaml")
    doc = {k: v for k, v in base.items() if k not in {"scales", "scale", "yaml_file", "ch"}}
    doc["scales"] = {"t": [depth, width, max_channels]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _overrides(
    config: DetectorConfig, data_yaml: Path, out_dir: Path, device: str, pretrained: Path | None
) -> dict[str, Any]:
    return {
        "model": config.model,
        "data": str(data_yaml),
        "task": "detect",
        "epochs": config.epochs,
        "imgsz": config.imgsz,
        "batch": config.batch,
        "nbs": config.nbs,
        "optimizer": "SGD",
        "lr0": config.lr0,
        "lrf": config.lrf,
        "cos_lr": True,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "warmup_epochs": config.warmup_epochs,
        "close_mosaic": config.close_mosaic,
        "box": config.box,
        "cls": config.cls,
        "dfl": config.dfl,
        "mixup": config.mixup,
        "mosaic": config.mosaic,
        "hsv_h": config.hsv_h,
        "hsv_s": config.hsv_s,
        "hsv_v": config.hsv_v,
        "fliplr": config.fliplr,
        "flipud": 0.0,
        "scale": config.scale,
        "translate": config.translate,
        "copy_paste": 0.0,  # Ultralytics' copy-paste needs segments; ours is box-level (extras)
        "multi_scale": 0.0,  # the range is applied by SpineDetectionTrainer (scale_range)
        "patience": config.patience,
        "seed": config.seed,
        "deterministic": True,
        "workers": config.workers,
        "device": device,
        "amp": bool(config.amp and device != "cpu"),
        "plots": False,
        "val": True,
        "pretrained": str(pretrained) if pretrained else False,
        "project": str(out_dir),
        "name": "train",
        "exist_ok": True,
        "verbose": False,
        "cache": False,
    }


def train_detector(
    config: DetectorConfig,
    data_yaml: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    pretrained_file: Path | None = None,
    pretrained_dir: Path = DEFAULT_PRETRAINED_DIR,
    from_scratch: bool = False,
    resume: bool = False,
) -> DetectorResult:
    """Train the detector on an Ultralytics dataset and return the weights it wrote.

    Parameters
    ----------
    config : DetectorConfig
        Training settings.
    data_yaml : pathlib.Path
        Ultralytics dataset YAML (from ``training.vindr``).
    out_dir : pathlib.Path
        Output directory (``out_dir/train/weights/{best,last}.pt``).
    device : str
        ``"cpu"``, ``"cuda"`` or a CUDA index.
    pretrained_file : pathlib.Path, optional
        Local ``.pt`` checkpoint to start from (no download).
    pretrained_dir : pathlib.Path
        Searched for :func:`expected_pretrained_file` when no file is given.
    from_scratch : bool
        Allow random initial weights when no checkpoint is found.
    resume : bool
        Continue from ``out_dir/train/weights/last.pt``.

    Returns
    -------
    DetectorResult

    Raises
    ------
    FileNotFoundError
        When no pretrained checkpoint is found and ``from_scratch`` is false (the message
        names the file expected), or when resuming without ``last.pt``.
    """
    out_dir = Path(out_dir).resolve()
    extras = config.extras
    if config.scale_range is not None and extras.scale_range != config.scale_range:
        extras = DetectorExtras(**{**asdict(extras), "scale_range": config.scale_range})
    last = out_dir / "train" / "weights" / "last.pt"
    start = (
        None if resume else _start_weights(config, pretrained_file, pretrained_dir, from_scratch)
    )
    overrides = _overrides(config, Path(data_yaml).resolve(), out_dir, device, start)
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"cannot resume: {last} does not exist")
        overrides["resume"] = str(last)
        overrides["model"] = str(last)
    with offline_ultralytics():
        trainer = SpineDetectionTrainer(overrides=overrides, extras=extras, seed=config.seed)
        trainer.train()
    raw_metrics: dict[str, Any] = dict(trainer.metrics or {})
    metrics = {k: float(v) for k, v in raw_metrics.items()}
    extras_used = {
        "criterion": type(
            getattr(unwrap_model(cast(Any, trainer.model)), "criterion", None)
        ).__name__,
        "train_dataset": type(trainer.train_loader.dataset).__name__,
        "sampler": type(trainer.train_loader.sampler).__name__,
    }
    weights = Path(trainer.save_dir) / "weights"
    weights_out = trainer.sampling_weights
    result = DetectorResult(
        best=weights / "best.pt",
        last=weights / "last.pt",
        run_dir=Path(trainer.save_dir),
        metrics=metrics,
        sampling_weights=tuple(float(w) for w in weights_out) if weights_out is not None else None,
        extras_used=extras_used,
    )
    (out_dir / "detector.json").write_text(
        json.dumps(
            {"config": asdict(config), "metrics": metrics, "best": str(result.best)},
            indent=2,
            default=str,
        )
        + "\n"
    )
    return result


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train detector`` arguments."""
    d = DetectorConfig()
    parser.add_argument("--data", type=Path, required=True, help="VinDr-layout data root")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--model", default=d.model, help="model YAML or local .pt (default yolo11l.yaml)"
    )
    parser.add_argument(
        "--fold", type=int, default=0, help="validation fold of train.csv (default 0)"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--imgsz", type=int, default=d.imgsz)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--nbs", type=int, default=d.nbs)
    parser.add_argument("--lr0", type=float, default=d.lr0)
    parser.add_argument("--close-mosaic", type=int, default=d.close_mosaic)
    parser.add_argument("--mixup", type=float, default=d.mixup)
    parser.add_argument(
        "--scale-range",
        default="480,768",
        help="multi-scale range MIN,MAX in px, or 'off' (default 480,768)",
    )
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument(
        "--balanced-sampling", action="store_true", help="class-balanced image sampling"
    )
    parser.add_argument(
        "--copy-paste",
        type=float,
        default=0.0,
        help="rare-box copy-paste probability (method: 0.2)",
    )
    parser.add_argument(
        "--class-loss",
        default="bce",
        choices=CLASS_LOSSES,
        help="class term: bce (Ultralytics'), varifocal (Zhang et al. 2021, gamma 2, alpha 0.75)"
        " or quality_focal (Li et al. 2020, beta 2); both made for the soft IoU targets",
    )
    parser.add_argument(
        "--pretrained-file", type=Path, help="local .pt to start from (no download)"
    )
    parser.add_argument(
        "--pretrained-dir",
        type=Path,
        default=DEFAULT_PRETRAINED_DIR,
        help="folder searched for <model stem>.pt, e.g. yolo11l.pt (default ./pretrained)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="allow random initial weights when no pretrained checkpoint is found",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="prepared-image cache (default: prepared-cache/ beside --out)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or a CUDA index")
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision on CUDA (its check needs a model file)"
    )
    parser.add_argument(
        "--workers", type=int, default=d.workers, help="loader and preparation processes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")


def _scale_range(text: str) -> tuple[int, int] | None:
    if text.strip().lower() in {"off", "none", ""}:
        return None
    lo, _, hi = text.partition(",")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise SystemExit(
            f"spine-train detector: --scale-range must be MIN,MAX or off, got {text!r}"
        ) from None


def config_from_args(args: argparse.Namespace) -> DetectorConfig:
    """Build the :class:`DetectorConfig` of parsed CLI arguments."""
    rng = _scale_range(args.scale_range)
    return DetectorConfig(
        model=args.model,
        imgsz=args.imgsz,
        epochs=args.epochs,
        batch=args.batch,
        nbs=args.nbs,
        lr0=args.lr0,
        close_mosaic=args.close_mosaic,
        mixup=args.mixup,
        scale_range=rng,
        patience=args.patience,
        seed=args.seed,
        workers=args.workers,
        amp=args.amp,
        extras=DetectorExtras(
            balanced_sampling=args.balanced_sampling,
            copy_paste=args.copy_paste,
            class_loss=args.class_loss,
            scale_range=rng,
        ),
    )


def build_yolo_dataset(
    data_dir: Path,
    out_dir: Path,
    *,
    fold: int,
    folds: int,
    imgsz: int,
    seed: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> Path:
    """Convert one study-level fold of ``train.csv`` to Ultralytics' layout; returns its YAML.

    Images go through ``spine_node.imaging.prepare`` (letterboxed to ``imgsz``), the fold's
    validation studies become the ``val`` split. The test split is not written. With
    ``cache_dir`` the images come from the prepared-image cache (filled by ``workers``
    processes); an export that is already complete is reused.
    """
    from spine_node.imaging import PrepParams
    from training import vindr

    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold!r}")
    records = vindr.load_records(Path(data_dir), "train")
    train_ids, val_ids = vindr.study_stratified_kfold(records, folds, seed)[fold]
    by_id = {r.image_id: r for r in records}
    export = vindr.export_yolo(
        {"train": [by_id[i] for i in train_ids], "val": [by_id[i] for i in val_ids]},
        Path(out_dir),
        params=PrepParams(detect_size=imgsz),
        cache_dir=cache_dir,
        workers=workers,
    )
    return Path(export.data_yaml)


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train detector``."""
    config = config_from_args(args)
    data_yaml = build_yolo_dataset(
        args.data,
        Path(args.out) / "dataset",
        fold=args.fold,
        folds=args.folds,
        imgsz=args.imgsz,
        seed=args.seed,
        cache_dir=args.cache_dir or Path(args.out).resolve().parent / "prepared-cache",
        workers=args.workers,
    )
    result = train_detector(
        config,
        data_yaml,
        Path(args.out),
        device=args.device,
        pretrained_file=args.pretrained_file,
        pretrained_dir=args.pretrained_dir,
        from_scratch=args.from_scratch,
        resume=args.resume,
    )
    shutil.copy2(result.best, Path(args.out) / "detector.pt")
    print(json.dumps({"best": str(result.best), "metrics": dict(result.metrics)}, indent=2))
    return 0

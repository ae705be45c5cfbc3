"""Train one triage member (DERNet) on one study-level stratified fold.

Defaults are the method's (spec.md): AdamW(lr 1e-4, wd 1e-4), cosine schedule with T_max 60,
60 epochs, early stopping with patience 10 on validation AUROC, batch 32/24/32
(DenseNet/EfficientNetV2/ResNet), BCE with logits, augmentation hflip 0.5, rotation +-15 deg,
brightness/contrast 0.2, Gaussian blur. Members are built by
``spine_node.models.triage.create_member`` and wrapped in ``TriageMember`` (grey [0, 1] in, the
member's own normalisation inside) so training and serving run the same graph; images come from
``spine_node.imaging.prepare`` through ``training.vindr``'s cached dataset.

Per fold, the output directory holds ``last.pt`` (model, optimiser, scheduler, epoch, early-stop
state, RNG states: ``--resume`` continues from it), ``best.pt`` (state_dict of the best epoch),
``history.json`` and ``oof_fold{K}.csv`` (image_id, score, label, fold) with the best model's
validation predictions -- the only input the ensemble fit may use.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as tvf
from tqdm import tqdm

from spine_node.models.bundle import MemberSpec
from spine_node.models.triage import TriageMember, create_member

logger = logging.getLogger(__name__)

__all__ = [
    "ARCH_DEFAULTS",
    "AugmentParams",
    "ClassifierConfig",
    "FoldResult",
    "add_arguments",
    "augment_batch",
    "member_spec",
    "predict",
    "run",
    "train_fold",
]

#: Member name and batch size per architecture (spec.md: 32 / 24 / 32).
ARCH_DEFAULTS: Mapping[str, tuple[str, int]] = {
    "densenet121": ("densenet", 32),
    "tf_efficientnetv2_s": ("efficientnet", 24),
    "resnet50": ("resnet", 32),
}
_PENDING_SHA = "0" * 64


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation (applied on the fly to prepared [0, 1] grey images)."""

    hflip: float = 0.5
    rotation_deg: float = 15.0
    brightness: float = 0.2
    contrast: float = 0.2
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides one member's training run.

    Attributes
    ----------
    arch : str
        timm architecture.
    name : str
        Member name in the bundle.
    kwargs : Mapping[str, Any]
        Extra ``timm.create_model`` kwargs (the demo bundle shrinks members this way).
    input_size : int
        Square triage input (384 in the method).
    epochs, batch_size, lr, weight_decay, t_max, patience : numbers
        Optimisation settings.
    seed : int
        Seed of every random generator.
    num_workers : int
        DataLoader workers.
    augment : AugmentParams
        Augmentation settings.
    """

    arch: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: int = 384
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    t_max: int = 60
    patience: int = 10
    seed: int = 0
    num_workers: int = 0
    augment: AugmentParams = field(default_factory=AugmentParams)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "t_max", "patience", "input_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass(frozen=True)
class FoldResult:
    """Outcome of :func:`train_fold`."""

    fold: int
    best_epoch: int
    best_auroc: float
    epochs_run: int
    best_weights: Path
    oof_csv: Path
    spec: MemberSpec


def member_spec(config: ClassifierConfig, *, weights: str = "pending.pt") -> MemberSpec:
    """The ``MemberSpec`` of a config, with the architecture's own pretrained mean/std."""
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(config.arch)
    mean = tuple(getattr(pretrained_cfg, "mean", (0.485, 0.456, 0.406)))
    std = tuple(getattr(pretrained_cfg, "std", (0.229, 0.224, 0.225)))
    return MemberSpec(
        name=config.name,
        arch=config.arch,
        kwargs=dict(config.kwargs),
        weights=weights,
        sha256=_PENDING_SHA,
        input_size=config.input_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- augmentation


def augment_batch(
    x: torch.Tensor, params: AugmentParams, generator: torch.Generator
) -> torch.Tensor:
    """Augment a batch of grey images ``(N, 1, H, W)`` in [0, 1]; returns a new tensor.

    Horizontal flip, rotation, brightness/contrast jitter and Gaussian blur, drawn per image
    from ``generator`` (so a seeded run is reproducible).
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be (N, 1, H, W), got {tuple(x.shape)}")
    out = []

    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=generator))

    for img in x:
        if u(0, 1) < params.hflip:
            img = tvf.horizontal_flip(img)
        if params.rotation_deg > 0:
            angle = u(-params.rotation_deg, params.rotation_deg)
            img = tvf.rotate(img, angle, interpolation=tvf.InterpolationMode.BILINEAR, fill=0.0)
        if params.brightness > 0:
            img = img * u(1 - params.brightness, 1 + params.brightness)
        if params.contrast > 0:
            mean = img.mean()
            img = (img - mean) * u(1 - params.contrast, 1 + params.contrast) + mean
        if params.blur_p > 0 and u(0, 1) < params.blur_p:
            sigma = u(*params.blur_sigma)
            k = max(3, 2 * math.ceil(3 * sigma) + 1)
            img = tvf.gaussian_blur(img, [k, k], [sigma, sigma])
        out.append(img.clamp(0.0, 1.0))
    return torch.stack(out)


# --------------------------------------------------------------------------- loop


def _collate(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, ids = [], [], []
    for item in batch:
        image, label = item[0], item[1]
        image_id = item[2] if len(item) > 2 else ""
        t = torch.as_tensor(np.asarray(image, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        images.append(t)
        labels.append(float(label))
        ids.append(str(image_id))
    return torch.stack(images), torch.tensor(labels, dtype=torch.float32), ids


def predict(
    member: nn.Module,
    dataset: Dataset[Any],
    *,
    batch_size: int,
    device: torch.device,
    desc: str = "predict",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return ``(image_ids, probabilities, labels)`` of ``member`` over ``dataset``.

    Image ids come from the items' third element or, for ``training.vindr.TriageDataset``,
    from its ``records``.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    ids: list[str] = []
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    member.eval()
    with torch.inference_mode():
        for x, y, batch_ids in tqdm(loader, desc=desc, leave=False, disable=None):
            logit, _ = member(x.to(device))
            probs.append(torch.sigmoid(logit.float()).cpu().numpy())
            labels.append(y.numpy())
            ids.extend(batch_ids)
    records = getattr(dataset, "records", None)
    if records is not None and not any(ids):
        ids = [str(r.image_id) for r in records]
    return ids, np.concatenate(probs), np.concatenate(labels)


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augment": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["augment"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_fold(
    config: ClassifierConfig,
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    out_dir: Path,
    *,
    fold: int = 0,
    device: str = "cpu",
    pretrained_file: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FoldResult:
    """Train one member on one fold and write its checkpoints and out-of-fold predictions.

    Parameters
    ----------
    config : ClassifierConfig
        Training settings.
    train_set, val_set : torch.utils.data.Dataset
        Items ``(image (1, H, W) or (H, W) float32 [0, 1], label 0/1[, image_id])``, e.g.
        ``training.vindr.TriageDataset``.
    out_dir : pathlib.Path
        Fold output directory.
    fold : int
        Fold number (recorded in the OOF file).
    device : str
        ``"cpu"`` or ``"cuda"``.
    pretrained_file : pathlib.Path, optional
        Local ImageNet weights for the backbone.
    resume : bool
        Continue from ``out_dir/last.pt`` when it exists.
    on_epoch : callable, optional
        Called with ``(epoch, val_auroc)`` after each epoch.

    Returns
    -------
    FoldResult
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)

    spec = member_spec(config)
    model = create_member(spec, pretrained_file=None if resume else pretrained_file)
    member = TriageMember(model, spec.mean, spec.std).to(dev)
    optimizer = torch.optim.AdamW(
        member.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.t_max)
    criterion = nn.BCEWithLogitsLoss()

    start_epoch, best_auroc, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    history: list[dict[str, float]] = []
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.is_file():
        ckpt = torch.load(last_path, map_location=dev, weights_only=False)
        if _resumable(ckpt.get("config")) != _resumable(_config_json(config)):
            raise ValueError(f"{last_path} was written with different settings; not resuming")
        member.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"]) + 1
        best_auroc, best_epoch, bad_epochs = (
            ckpt["best_auroc"],
            ckpt["best_epoch"],
            ckpt["bad_epochs"],
        )
        history = list(ckpt.get("history", []))
        _set_rng_state(ckpt["rng"], generator)
        loader_gen.set_state(ckpt["loader_rng"])
        logger.info("fold %d: resuming %s at epoch %d", fold, config.name, start_epoch)

    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=loader_gen,
        num_workers=config.num_workers,
        collate_fn=_collate,
        drop_last=len(cast(Sized, train_set))
        > config.batch_size,  # BatchNorm needs > 1 image per batch
    )
    stopped = bad_epochs >= config.patience
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if stopped:
            break
        member.train()
        t0 = time.monotonic()
        losses = []
        for x, y, _ in tqdm(
            train_loader, desc=f"{config.name} fold {fold} epoch {epoch}", leave=False, disable=None
        ):
            x = augment_batch(x, config.augment, generator).to(dev)
            logit, _ = member(x)
            loss = criterion(logit, y.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        scheduler.step()
        _, probs, labels = predict(
            member, val_set, batch_size=config.batch_size, device=dev, desc="validate"
        )
        auc = _auroc(labels, probs)
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "val_auroc": auc,
            }
        )
        improved = not math.isnan(auc) and auc > best_auroc
        if improved or best_epoch == 0:
            best_auroc = auc if not math.isnan(auc) else best_auroc
            best_epoch, bad_epochs = epoch, 0
            torch.save(member.model.state_dict(), best_path)
        else:
            bad_epochs += 1
        logger.info(
            "%s fold %d epoch %d/%d: loss %.4f val AUROC %.4f (best %.4f @ %d) %.0fs",
            config.name,
            fold,
            epoch,
            config.epochs,
            history[-1]["loss"],
            auc,
            best_auroc,
            best_epoch,
            time.monotonic() - t0,
        )
        torch.save(
            {
                "config": _config_json(config),
                "model": member.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_auroc": best_auroc,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "history": history,
                "rng": _rng_state(generator),
                "loader_rng": loader_gen.get_state(),
            },
            last_path,
        )
        if on_epoch is not None:
            on_epoch(epoch, auc)
        if bad_epochs >= config.patience:
            logger.info("%s fold %d: early stop after epoch %d", config.name, fold, epoch)
            stopped = True

    member.model.load_state_dict(torch.load(best_path, map_location=dev, weights_only=True))
    ids, probs, labels = predict(
        member, val_set, batch_size=config.batch_size, device=dev, desc="oof"
    )
    oof_csv = out_dir / f"oof_fold{fold}.csv"
    with oof_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "score", "label", "fold"])
        for iid, p, lab in zip(ids, probs, labels, strict=True):
            writer.writerow([iid, f"{float(p):.6f}", int(lab), fold])
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return FoldResult(
        fold=fold,
        best_epoch=best_epoch,
        best_auroc=float(best_auroc),
        epochs_run=len(history),
        best_weights=best_path,
        oof_csv=oof_csv,
        spec=spec,
    )


def _config_json(config: ClassifierConfig) -> dict[str, Any]:
    return dict(json.loads(json.dumps(asdict(config), default=list)))


def _resumable(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Settings that must match to resume (more epochs may be asked for)."""
    return {k: v for k, v in (config or {}).items() if k != "epochs"}


# --------------------------------------------------------------------------- data + CLI


def fold_datasets(
    data_dir: Path,
    *,
    fold: int,
    folds: int,
    input_size: int,
    seed: int,
    cache_dir: Path | None = None,
) -> tuple[Dataset[Any], Dataset[Any]]:
    """Training and validation datasets of one study-level stratified fold of ``train.csv``."""
    from spine_node.imaging import PrepParams
    from training import vindr

    records = vindr.load_records(Path(data_dir), "train")
    train_ids, val_ids = vindr.study_stratified_kfold(records, folds, seed)[fold]
    by_id = {r.image_id: r for r in records}
    params = PrepParams(triage_size=input_size)
    cache = cache_dir or Path(data_dir) / ".cache" / "prepared"
    return (
        vindr.TriageDataset([by_id[i] for i in train_ids], params, cache),
        vindr.TriageDataset([by_id[i] for i in val_ids], params, cache),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train classifier`` arguments."""
    parser.add_argument(
        "--arch",
        required=True,
        help="timm architecture (densenet121, tf_efficientnetv2_s, resnet50)",
    )
    parser.add_argument("--name", help="member name (default from the architecture)")
    parser.add_argument("--data", type=Path, required=True, help="VinDr-layout data root")
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (one sub-directory per fold)"
    )
    parser.add_argument("--fold", type=int, action="append", help="fold(s) to train (default: all)")
    parser.add_argument(
        "--folds", type=int, default=5, help="number of study-level folds (default 5)"
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--batch-size", type=int, help="default 32/24/32 for densenet/efficientnet/resnet"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--t-max", type=int, default=60, help="cosine schedule period in epochs")
    parser.add_argument(
        "--patience", type=int, default=10, help="early stopping on validation AUROC"
    )
    parser.add_argument("--input-size", type=int, default=384)
    parser.add_argument(
        "--model-kwargs", default="{}", help="JSON of extra timm.create_model kwargs"
    )
    parser.add_argument(
        "--pretrained-file", type=Path, help="local ImageNet weights (no hub access)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")


def config_from_args(args: argparse.Namespace) -> ClassifierConfig:
    """Build the :class:`ClassifierConfig` of parsed CLI arguments."""
    name, batch = ARCH_DEFAULTS.get(args.arch, (args.arch.split("_")[0], 32))
    return ClassifierConfig(
        arch=args.arch,
        name=args.name or name,
        kwargs=json.loads(args.model_kwargs),
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size or batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        t_max=args.t_max,
        patience=args.patience,
        seed=args.seed,
        num_workers=args.workers,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train classifier``."""
    config = config_from_args(args)
    folds = args.fold if args.fold else list(range(args.folds))
    bad = [k for k in folds if not 0 <= k < args.folds]
    if bad:
        raise SystemExit(f"spine-train classifier: --fold must be in [0, {args.folds}), got {bad}")
    summary = []
    for k in folds:
        train_set, val_set = fold_datasets(
            args.data, fold=k, folds=args.folds, input_size=config.input_size, seed=args.seed
        )
        result = train_fold(
            replace(config, seed=args.seed + k),
            train_set,
            val_set,
            Path(args.out) / f"fold{k}",
            fold=k,
            device=args.device,
            pretrained_file=args.pretrained_file,
            resume=args.resume,
        )
        # the ensemble reads every fold's OOF file from one directory
        (Path(args.out) / result.oof_csv.name).write_bytes(result.oof_csv.read_bytes())
        summary.append({"fold": k, "best_epoch": result.best_epoch, "val_auroc": result.best_auroc})
    (Path(args.out) / "member.json").write_text(
        json.dumps({"config": _config_json(config), "folds": summary}, indent=2) + "\n"
    )
    print(json.dumps(summary, indent=2))
    return 0

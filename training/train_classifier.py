"""Train one triage member (DERNet) on one study-level stratified fold.

Defaults are the method's (spec.md): AdamW(lr 1e-4, wd 1e-4), cosine schedule with T_max 60,
60 epochs, early stopping with patience 10 on validation AUROC, batch 32/24/32
(DenseNet/EfficientNetV2/ResNet), BCE with logits, augmentation hflip 0.5, rotation +-15 deg,
brightness/contrast 0.2, Gaussian blur. Members are built by
``spine_node.models.triage.create_member`` and wrapped in ``TriageMember`` (grey [0, 1] in, the
member's own normalisation inside) so training and serving run the same graph; images come from
``spine_node.imaging.prepare`` through ``training.vindr``'s cached dataset.

Efficiency (issue 11): a torch ``DataLoader`` with parallel workers (default
``min(8, CPUs)``) reads the prepared-image cache and augments each image in the worker (its
random stream seeded by ``(seed, epoch, index)``, so results do not depend on the number of
workers); mixed precision on CUDA (bf16 where supported, else fp16 with a ``GradScaler``);
channels_last; the loss is accumulated on the device and synchronised once per epoch.

Training from random weights is refused unless asked for (``from_scratch``): the expected
local ImageNet file of each architecture is named by :func:`pretrained_filename`.

Per fold, the output directory holds ``last.pt`` (model, optimiser, scheduler, epoch, early-stop
state, RNG states: ``--resume`` continues from it), ``best.pt`` (state_dict of the best epoch),
``history.json`` and ``oof_fold{K}.csv`` (image_id, score, label, fold) with the best model's
validation predictions -- the only input the ensemble fit may use.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import random
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
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
from training.vindr import default_workers

logger = logging.getLogger(__name__)

__all__ = [
    "AMP_MODES",
    "ARCH_DEFAULTS",
    "AUGMENT_ON",
    "AugmentParams",
    "AugmentedDataset",
    "ClassifierConfig",
    "FoldResult",
    "add_arguments",
    "augment_batch",
    "augment_batch_device",
    "augment_image",
    "member_spec",
    "predict",
    "pretrained_filename",
    "require_pretrained",
    "run",
    "train_fold",
]

#: Mixed-precision modes: ``auto`` is bf16 on CUDA where supported, else fp16; off on CPU.
AMP_MODES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")
#: Where augmentation runs: ``loader`` (per image in the loader workers), ``device`` (batched on
#: the training device, :func:`augment_batch_device`), ``auto`` (device on CUDA, else loader).
AUGMENT_ON: tuple[str, ...] = ("auto", "loader", "device")
#: Default folder of local pretrained weights files (see :func:`pretrained_filename`).
DEFAULT_PRETRAINED_DIR = Path("pretrained")

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
        DataLoader workers (default ``min(8, CPUs)``; 0 loads in the main process).
    amp : str
        Mixed precision, one of :data:`AMP_MODES`.
    channels_last : bool
        Model and inputs in channels_last memory format.
    augment_on : str
        Where augmentation runs, one of :data:`AUGMENT_ON`.
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
    num_workers: int = field(default_factory=default_workers)
    amp: str = "auto"
    channels_last: bool = True
    augment_on: str = "auto"
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
        n = self.num_workers
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {n!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {self.augment_on!r}")


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


def pretrained_filename(arch: str) -> str:
    """File name under which the local ImageNet weights of ``arch`` are expected.

    timm's default pretrained tag of the architecture as ``<arch>.<tag>.safetensors``, e.g.
    ``densenet121.ra_in1k.safetensors``: the ``model.safetensors`` of the Hugging Face
    repository ``timm/<arch>.<tag>`` saved under that name (nothing is downloaded at run time).
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    stem = str(hub_id).rsplit("/", 1)[-1] if hub_id else arch
    return f"{stem}.safetensors"


def require_pretrained(
    arch: str,
    pretrained_file: Path | None,
    *,
    pretrained_dir: Path = DEFAULT_PRETRAINED_DIR,
    from_scratch: bool = False,
) -> Path | None:
    """The local pretrained weights to start ``arch`` from, or None when training from scratch.

    Parameters
    ----------
    arch : str
        timm architecture.
    pretrained_file : pathlib.Path or None
        Explicit weights file; must exist.
    pretrained_dir : pathlib.Path
        Folder searched for :func:`pretrained_filename` when no file is given.
    from_scratch : bool
        Allow random initial weights when no file is found.

    Raises
    ------
    FileNotFoundError
        When ``pretrained_file`` does not exist, or when no weights are found and
        ``from_scratch`` is false (the message names the file expected).
    """
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file {pretrained_file} does not exist")
        return Path(pretrained_file)
    expected = Path(pretrained_dir) / pretrained_filename(arch)
    if expected.is_file():
        return expected
    if from_scratch:
        logger.warning("%s: training from random weights (from_scratch)", arch)
        return None
    repo = expected.name.removesuffix(".safetensors")
    raise FileNotFoundError(
        f"no pretrained weights for {arch}: expected the local file {expected} (model.safetensors "
        f"of https://huggingface.co/timm/{urllib.parse.quote(repo)}); give --pretrained-file, "
        "or --from-scratch to train from random weights"
    )


# --------------------------------------------------------------------------- augmentation


def augment_image(
    img: torch.Tensor, params: AugmentParams, generator: torch.Generator
) -> torch.Tensor:
    """Augment one grey image ``(1, H, W)`` in [0, 1]; returns a new tensor.

    Horizontal flip, rotation, brightness/contrast jitter and Gaussian blur, drawn from
    ``generator``.
    """
    if img.ndim != 3 or img.shape[0] != 1:
        raise ValueError(f"img must be (1, H, W), got {tuple(img.shape)}")

    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=generator))

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
    return img.clamp(0.0, 1.0)


def augment_batch(
    x: torch.Tensor, params: AugmentParams, generator: torch.Generator
) -> torch.Tensor:
    """Augment a batch of grey images ``(N, 1, H, W)`` in [0, 1]; returns a new tensor.

    :func:`augment_image` on each image in turn, all drawn from ``generator``.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be (N, 1, H, W), got {tuple(x.shape)}")
    return torch.stack([augment_image(img, params, generator) for img in x])


def augment_batch_device(
    x: torch.Tensor, params: AugmentParams, generator: torch.Generator
) -> torch.Tensor:
    """Augment a batch ``(N, 1, H, W)`` in [0, 1] with batched tensor operations (on the GPU).

    The transforms and ranges of :func:`augment_image` (horizontal flip, rotation, brightness,
    contrast, Gaussian blur with reflected borders), computed for the whole batch at once on
    ``x``'s device: flip and rotation as one ``affine_grid``/``grid_sample`` (bilinear, zero
    fill), blur as a separable grouped convolution with per-image kernels. The random draws
    come from ``generator`` (a CPU generator) so a seeded run is reproducible on any device.
    """
    from torch.nn import functional as fn

    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be (N, 1, H, W), got {tuple(x.shape)}")
    n, dev = x.shape[0], x.device
    r = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    flip = torch.where(r[:, 0] < params.hflip, -1.0, 1.0)
    angle = torch.deg2rad((2 * r[:, 1] - 1) * params.rotation_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, zero], 1), torch.stack([sin * flip, cos, zero], 1)], 1
    )
    x = x.float()
    grid = fn.affine_grid(theta.to(dev, torch.float32), list(x.shape), align_corners=False)
    out = fn.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shape = (n, 1, 1, 1)
    bright = 1 + (2 * r[:, 2] - 1) * params.brightness
    out = out * bright.to(dev, torch.float32).view(shape)
    contrast = (1 + (2 * r[:, 3] - 1) * params.contrast).to(dev, torch.float32).view(shape)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    blur = r[:, 4] < params.blur_p
    if params.blur_p > 0 and bool(blur.any()):
        lo, hi = params.blur_sigma
        sigma = lo + (hi - lo) * r[:, 5]
        half = max(1, math.ceil(3 * hi))
        t = torch.arange(-half, half + 1, dtype=torch.float64)
        kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kernel = kernel * (t[None, :].abs() <= torch.ceil(3 * sigma)[:, None])  # tvf's support
        kernel = kernel / kernel.sum(1, keepdim=True)
        delta = (t == 0).to(torch.float64).expand(n, -1)
        kernel = torch.where(blur[:, None], kernel, delta).to(dev, torch.float32)
        y = out.transpose(0, 1)  # (1, N, H, W): one group per image
        y = fn.conv2d(
            fn.pad(y, (half, half, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n
        )
        y = fn.conv2d(
            fn.pad(y, (0, 0, half, half), mode="reflect"), kernel[:, None, :, None], groups=n
        )
        out = y.transpose(0, 1)
    return out.clamp(0.0, 1.0)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


class AugmentedDataset(Dataset[tuple[Any, ...]]):
    """A dataset whose images are augmented where they are loaded (in the loader workers).

    Item ``index`` of epoch ``epoch`` is augmented with a generator seeded by
    ``(seed, epoch, index)``: reproducible, independent of the number of workers and of the
    order the workers run in, and a resumed run draws what an uninterrupted one would.

    Parameters
    ----------
    base : torch.utils.data.Dataset
        Items ``(image (1, H, W) or (H, W) float32 [0, 1], label[, image_id])``.
    params : AugmentParams
        Augmentation settings.
    seed : int
        Run seed.
    """

    def __init__(self, base: Dataset[Any], params: AugmentParams, seed: int) -> None:
        if not isinstance(params, AugmentParams):
            raise TypeError(f"params must be AugmentParams, got {type(params).__name__}")
        self.base = base
        self.params = params
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation the next iterator draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(cast(Sized, self.base))

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.base[index]
        image = torch.as_tensor(np.asarray(item[0], dtype=np.float32))
        if image.ndim == 2:
            image = image[None]
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        return (augment_image(image, self.params, generator), *item[1:])


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


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an :data:`AMP_MODES` mode on ``device`` (None: full precision)."""
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def predict(
    member: nn.Module,
    dataset: Dataset[Any],
    *,
    batch_size: int,
    device: torch.device,
    desc: str = "predict",
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return ``(image_ids, probabilities, labels)`` of ``member`` over ``dataset``.

    Image ids come from the items' third element or, for ``training.vindr.TriageDataset``,
    from its ``records``. Probabilities stay on the device until the end (one sync).
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ids: list[str] = []
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    member.eval()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
    ):
        for x, y, batch_ids in tqdm(loader, desc=desc, leave=False, disable=None):
            logit, _ = member(x.to(device, non_blocking=True, memory_format=fmt))
            probs.append(torch.sigmoid(logit.float()))
            labels.append(y)
            ids.extend(batch_ids)
    records = getattr(dataset, "records", None)
    if records is not None and not any(ids):
        ids = [str(r.image_id) for r in records]
    if not probs:
        return ids, np.zeros(0, np.float32), np.zeros(0, np.float32)
    return ids, torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy()


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
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
    from_scratch: bool = False,
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
        Local ImageNet weights for the backbone (default: :func:`pretrained_filename` in
        ``pretrained/`` when it exists).
    from_scratch : bool
        Start from random weights when no pretrained file is found (else FileNotFoundError).
    resume : bool
        Continue from ``out_dir/last.pt`` when it exists.
    on_epoch : callable, optional
        Called with ``(epoch, val_auroc)`` after each epoch.

    Returns
    -------
    FoldResult

    Raises
    ------
    FileNotFoundError
        When no pretrained weights are found and ``from_scratch`` is false.
    """
    with _sigchld_kept():
        return _train_fold(
            config,
            train_set,
            val_set,
            Path(out_dir),
            fold=fold,
            device=device,
            pretrained_file=pretrained_file,
            from_scratch=from_scratch,
            resume=resume,
            on_epoch=on_epoch,
        )


@contextlib.contextmanager
def _sigchld_kept() -> Iterator[None]:
    """Leave the process's SIGCHLD handler as it was found.

    torch's DataLoader installs a process-wide Python SIGCHLD handler with its first worker
    and never removes it; a long-lived process that goes on to start other children (the
    detector's loaders, evaluation, a test suite) then runs it on every child's exit, which
    killed a test process here. Loaders still notice dead workers without it (torch also polls
    their liveness).
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGCHLD) if main else None
    try:
        yield
    finally:
        if before is not None:  # None: not set from Python, nothing to put back
            signal.signal(signal.SIGCHLD, before)


def _train_fold(
    config: ClassifierConfig,
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    out_dir: Path,
    *,
    fold: int,
    device: str,
    pretrained_file: Path | None,
    from_scratch: bool,
    resume: bool,
    on_epoch: Callable[[int, float], None] | None,
) -> FoldResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    resuming = resume and last_path.is_file()
    start_file = (
        None
        if resuming
        else require_pretrained(config.arch, pretrained_file, from_scratch=from_scratch)
    )

    spec = member_spec(config)
    model = create_member(spec, pretrained_file=start_file)
    amp_dtype = _amp_dtype(config.amp, dev)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    member = TriageMember(model, spec.mean, spec.std).to(dev).to(memory_format=fmt)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    optimizer = torch.optim.AdamW(
        member.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.t_max)
    criterion = nn.BCEWithLogitsLoss()

    start_epoch, best_auroc, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    history: list[dict[str, float]] = []
    if resuming:
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
        _set_rng_state(ckpt["rng"])
        loader_gen.set_state(ckpt["loader_rng"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        logger.info("fold %d: resuming %s at epoch %d", fold, config.name, start_epoch)

    on_device = config.augment_on == "device" or (
        config.augment_on == "auto" and dev.type == "cuda"
    )
    augmented = AugmentedDataset(train_set, config.augment, config.seed)
    train_loader = DataLoader(
        train_set if on_device else augmented,
        batch_size=config.batch_size,
        shuffle=True,
        generator=loader_gen,
        num_workers=config.num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        drop_last=len(augmented) > config.batch_size,  # BatchNorm needs > 1 image per batch
    )
    stopped = bad_epochs >= config.patience
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if stopped:
            break
        member.train()
        augmented.set_epoch(epoch)  # read by the workers this epoch's iterator starts
        device_gen = torch.Generator().manual_seed(_item_seed(config.seed, epoch, 2**32))
        t0 = time.monotonic()
        loss_sum = torch.zeros((), device=dev)
        seen = 0
        for x, y, _ in tqdm(
            train_loader, desc=f"{config.name} fold {fold} epoch {epoch}", leave=False, disable=None
        ):
            x = x.to(dev, non_blocking=True)
            if on_device:
                x = augment_batch_device(x, config.augment, device_gen)
            x = x.contiguous(memory_format=fmt)
            y = y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logit, _ = member(x)
            loss = criterion(logit.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * x.shape[0]  # stays on the device: no per-step sync
            seen += int(x.shape[0])
        train_s = time.monotonic() - t0
        scheduler.step()
        _, probs, labels = predict(
            member,
            val_set,
            batch_size=config.batch_size,
            device=dev,
            desc="validate",
            num_workers=config.num_workers,
            amp_dtype=amp_dtype,
            channels_last=config.channels_last,
        )
        auc = _auroc(labels, probs)
        history.append(
            {
                "epoch": epoch,
                "loss": float(loss_sum) / seen if seen else float("nan"),  # one sync per epoch
                "val_auroc": auc,
                "train_s": round(train_s, 3),
                "train_images_per_s": round(seen / train_s, 3) if train_s > 0 else float("nan"),
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
                "rng": _rng_state(),
                "loader_rng": loader_gen.get_state(),
                "scaler": scaler.state_dict(),
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
        member,
        val_set,
        batch_size=config.batch_size,
        device=dev,
        desc="oof",
        num_workers=config.num_workers,
        amp_dtype=amp_dtype,
        channels_last=config.channels_last,
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


#: Settings that may change between a run and its resumption (they do not change what is learnt,
#: or, for ``epochs``, only ask for more of it).
_RUNTIME_KEYS = frozenset({"epochs", "num_workers", "amp", "channels_last", "augment_on"})


def _resumable(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Settings that must match to resume."""
    return {k: v for k, v in (config or {}).items() if k not in _RUNTIME_KEYS}


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
    """Training and validation datasets of one study-level stratified fold of ``train.csv``.

    Prepared images are cached in ``cache_dir`` (None: no cache); the data root is only read.
    """
    from spine_node.imaging import PrepParams
    from training import vindr

    records = vindr.load_records(Path(data_dir), "train")
    train_ids, val_ids = vindr.study_stratified_kfold(records, folds, seed)[fold]
    by_id = {r.image_id: r for r in records}
    params = PrepParams(triage_size=input_size)
    return (
        vindr.TriageDataset([by_id[i] for i in train_ids], params, cache_dir),
        vindr.TriageDataset([by_id[i] for i in val_ids], params, cache_dir),
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
    parser.add_argument(
        "--pretrained-dir",
        type=Path,
        default=DEFAULT_PRETRAINED_DIR,
        help="folder searched for <arch>.<timm tag>.safetensors when no --pretrained-file "
        "(default ./pretrained)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="allow random initial weights when no pretrained file is found",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="prepared-image cache (default: prepared-cache/ beside --out; the data root may "
        "be read-only)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="loader and preparation processes (default min(8, CPUs))",
    )
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision")
    parser.add_argument(
        "--no-channels-last", action="store_true", help="keep the contiguous memory format"
    )
    parser.add_argument(
        "--augment-on",
        default="auto",
        choices=AUGMENT_ON,
        help="augmentation in the loader workers or batched on the device (auto: device on CUDA)",
    )
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
        amp=args.amp,
        channels_last=not args.no_channels_last,
        augment_on=args.augment_on,
    )


def default_cache_dir(out: Path) -> Path:
    """The prepared-image cache beside an output directory: ``<out>/../prepared-cache``."""
    return Path(out).resolve().parent / "prepared-cache"


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train classifier``."""
    config = config_from_args(args)
    folds = args.fold if args.fold else list(range(args.folds))
    bad = [k for k in folds if not 0 <= k < args.folds]
    if bad:
        raise SystemExit(f"spine-train classifier: --fold must be in [0, {args.folds}), got {bad}")
    all_resumed = args.resume and all(
        (Path(args.out) / f"fold{k}" / "last.pt").is_file() for k in folds
    )
    pretrained = (
        None
        if all_resumed
        else require_pretrained(
            config.arch,
            args.pretrained_file,
            pretrained_dir=args.pretrained_dir,
            from_scratch=args.from_scratch,
        )
    )
    cache_dir = args.cache_dir or default_cache_dir(args.out)
    from spine_node.imaging import PrepParams
    from training import vindr

    # every training image decoded once, in parallel, before the first fold
    vindr.warm_cache(
        vindr.load_records(Path(args.data), "train"),
        PrepParams(triage_size=config.input_size),
        cache_dir,
        workers=args.workers,
    )
    summary = []
    for k in folds:
        train_set, val_set = fold_datasets(
            args.data,
            fold=k,
            folds=args.folds,
            input_size=config.input_size,
            seed=args.seed,
            cache_dir=cache_dir,
        )
        result = train_fold(
            replace(config, seed=args.seed + k),
            train_set,
            val_set,
            Path(args.out) / f"fold{k}",
            fold=k,
            device=args.device,
            pretrained_file=pretrained,
            from_scratch=args.from_scratch,
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

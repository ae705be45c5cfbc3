"""Detector training extras that stock Ultralytics does not do for boxes.

Three switchable additions, each hooked into Ultralytics 8.4 at a documented seam:

* **Class-balanced image sampling** -- every training image gets a sampling weight from
  ``1 / sqrt(class frequency)`` of its boxes (the rarest of its classes decides; images without
  boxes count as their own "background" class). The training dataloader draws images with a
  :class:`torch.utils.data.WeightedRandomSampler` instead of shuffling
  (:meth:`SpineDetectionTrainer.get_dataloader`).
* **Box-level copy-paste of rare lesions** -- crops of rare-class boxes are pasted into other
  training images, with their labels, with probability ``p`` per loaded image
  (:class:`CopyPasteYOLODataset`, overriding ``get_image_and_label`` so mosaic tiles get it too).
  Ultralytics' own ``copy_paste`` needs segments and does nothing for box-only data.
* **Focal loss** -- the BCE classification term of ``v8DetectionLoss`` is replaced by a sigmoid
  focal loss (gamma 2, alpha 0.25) on the same task-aligned soft targets
  (:class:`FocalDetectionLoss`). The criterion is installed on the training model only; the EMA
  model written to ``best.pt`` stays a stock ``DetectionModel`` (Ultralytics strips ``criterion``
  when saving), so serving never needs this module.

:class:`SpineDetectionTrainer` also implements multi-scale training over an explicit pixel range
(480-768 in the method) rather than Ultralytics' symmetric ``multi_scale`` fraction.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
import torch
from torch import nn

from spine_node.offline import configure_offline

configure_offline()

from ultralytics.data.build import InfiniteDataLoader, seed_worker  # noqa: E402
from ultralytics.data.dataset import YOLODataset  # noqa: E402
from ultralytics.data.utils import get_split_fraction  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils import colorstr  # noqa: E402
from ultralytics.utils.instance import Instances  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "CopyPasteYOLODataset",
    "DetectorExtras",
    "FocalBCE",
    "FocalDetectionLoss",
    "SpineDetectionTrainer",
    "class_frequencies",
    "focal_bce",
    "image_sampling_weights",
    "rare_classes",
]


@dataclass(frozen=True)
class DetectorExtras:
    """Which extras are on, and their parameters.

    Attributes
    ----------
    balanced_sampling : bool
        Draw training images with weights from ``1/sqrt(class frequency)``.
    copy_paste : float
        Probability per loaded training image of pasting rare-lesion box crops (0 = off; 0.2 in
        the method).
    copy_paste_classes : tuple of int or None
        Class ids treated as rare; ``None`` picks them from frequencies (:func:`rare_classes`).
    copy_paste_max : int
        Most crops pasted into one image.
    focal : bool
        Replace the BCE classification loss with a focal loss.
    focal_gamma, focal_alpha : float
        Focal loss parameters (2.0 and 0.25 in the method).
    scale_range : tuple of int or None
        ``(min, max)`` training image size in pixels for multi-scale training (``None`` = off).
    """

    balanced_sampling: bool = False
    copy_paste: float = 0.0
    copy_paste_classes: tuple[int, ...] | None = None
    copy_paste_max: int = 3
    focal: bool = False
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    scale_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ValueError(f"copy_paste must be in [0, 1], got {self.copy_paste!r}")
        if self.copy_paste_max < 1:
            raise ValueError(f"copy_paste_max must be >= 1, got {self.copy_paste_max!r}")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma!r}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {self.focal_alpha!r}")
        if self.scale_range is not None:
            lo, hi = self.scale_range
            if not 32 <= lo <= hi:
                raise ValueError(
                    f"scale_range must be (min, max) with 32 <= min <= max, got {lo, hi}"
                )


# --------------------------------------------------------------------------- focal loss


def focal_bce(
    logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0, alpha: float = 0.25
) -> torch.Tensor:
    """Element-wise sigmoid focal loss for (soft) targets in [0, 1].

    ``FL = alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)`` with ``p = sigmoid(logits)``,
    ``p_t = t p + (1 - t)(1 - p)`` and ``alpha_t = t alpha + (1 - t)(1 - alpha)`` (Lin et al.
    2017). With ``gamma = 0`` and ``alpha = 0.5`` it is half the BCE.

    Parameters
    ----------
    logits, targets : torch.Tensor
        Same shape; targets may be soft (Ultralytics uses IoU-aligned scores).
    gamma : float
        Focusing parameter.
    alpha : float
        Weight of the positive term; ``alpha < 0`` disables the alpha factor.

    Returns
    -------
    torch.Tensor
        Loss per element (no reduction).
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {logits.shape} and {targets.shape}"
        )
    ce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = logits.sigmoid()
    p_t = targets * prob + (1.0 - targets) * (1.0 - prob)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (targets * alpha + (1.0 - targets) * (1.0 - alpha))
    return loss


class FocalBCE(nn.Module):
    """Drop-in for ``nn.BCEWithLogitsLoss(reduction="none")`` computing :func:`focal_bce`."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the element-wise focal loss."""
        return focal_bce(logits, targets, gamma=self.gamma, alpha=self.alpha)


class FocalDetectionLoss(v8DetectionLoss):
    """``v8DetectionLoss`` whose classification term is a focal loss instead of BCE.

    Ultralytics computes ``self.bce(pred_scores, target_scores)`` element-wise and normalises by
    the sum of target scores; only that element-wise function changes here.
    """

    def __init__(
        self, model: nn.Module, *, gamma: float = 2.0, alpha: float = 0.25, tal_topk: int = 10
    ) -> None:
        super().__init__(model, tal_topk=tal_topk)
        self.bce = FocalBCE(gamma, alpha)  # type: ignore[assignment]


# --------------------------------------------------------------------------- sampling weights


def class_frequencies(classes_per_image: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Count boxes per class over a training set.

    Parameters
    ----------
    classes_per_image : sequence of numpy.ndarray
        Class ids of each image's boxes (any shape; flattened).
    nc : int
        Number of classes.

    Returns
    -------
    numpy.ndarray
        ``(nc,)`` float64 box counts.
    """
    if nc < 1:
        raise ValueError(f"nc must be >= 1, got {nc!r}")
    counts = np.zeros(nc, dtype=np.float64)
    for cls in classes_per_image:
        ids = np.asarray(cls, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= nc):
            raise ValueError(f"class ids must be in [0, {nc}), got {ids.tolist()}")
        counts += np.bincount(ids, minlength=nc)[:nc]
    return counts


def image_sampling_weights(classes_per_image: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Sampling weight per image from ``1 / sqrt(class frequency)`` of its boxes.

    The frequency of a class is its number of boxes in the training set. An image weighs as
    much as its rarest class (``max`` over its boxes of ``1/sqrt(freq)``); images without boxes
    form a "background" class whose frequency is the number of such images.

    Parameters
    ----------
    classes_per_image : sequence of numpy.ndarray
        Class ids of each image's boxes.
    nc : int
        Number of classes.

    Returns
    -------
    numpy.ndarray
        ``(n_images,)`` float64 weights normalised to mean 1.
    """
    if len(classes_per_image) == 0:
        raise ValueError("classes_per_image must not be empty")
    counts = class_frequencies(classes_per_image, nc)
    n_background = sum(1 for c in classes_per_image if np.asarray(c).size == 0)
    weights = np.empty(len(classes_per_image), dtype=np.float64)
    for i, cls in enumerate(classes_per_image):
        ids = np.asarray(cls, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            weights[i] = 1.0 / math.sqrt(n_background)
        else:
            weights[i] = float(np.max(1.0 / np.sqrt(counts[ids])))
    return weights / weights.mean()


def rare_classes(counts: np.ndarray, *, ratio: float = 0.25) -> tuple[int, ...]:
    """Classes with at least one box and at most ``ratio`` times the most frequent class's count.

    Parameters
    ----------
    counts : numpy.ndarray
        Box count per class.
    ratio : float
        Cut-off relative to the largest count.

    Returns
    -------
    tuple of int
        Rare class ids, ascending.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0 or counts.max() <= 0:
        return ()
    cut = ratio * counts.max()
    return tuple(int(i) for i in np.flatnonzero((counts > 0) & (counts <= cut)))


# --------------------------------------------------------------------------- copy-paste


@dataclass(frozen=True)
class _Crop:
    pixels: np.ndarray  # (h, w, C) uint8 at the source image's original resolution
    cls: int


def _feather_mask(h: int, w: int) -> np.ndarray:
    """Alpha mask that is 1 inside and ramps to 0 over ~10% of the border (no hard paste edge)."""
    ry = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1) / max(1.0, 0.1 * h)
    rx = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1) / max(1.0, 0.1 * w)
    return np.clip(np.minimum(ry[:, None], rx[None, :]), 0.0, 1.0).astype(np.float32)


def _overlap_fraction(box: np.ndarray, boxes: np.ndarray) -> float:
    """Largest fraction of ``box`` covered by any of ``boxes`` (all xyxy pixels)."""
    if boxes.size == 0:
        return 0.0
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    area = max(float((box[2] - box[0]) * (box[3] - box[1])), 1e-9)
    return float((ix * iy).max() / area)


class CopyPasteYOLODataset(YOLODataset):
    """YOLO dataset that pastes rare-lesion box crops, with their labels, into loaded images.

    A bank of crops of every box of the rare classes is read once from the training images at
    their original resolution. Each call of :meth:`get_image_and_label` (the main image and every
    mosaic/mixup tile) pastes, with probability ``p``, between 1 and ``max_paste`` crops, scaled
    by the loaded image's resize ratio, at random places that cover at most 30% of any existing
    box, blended with a feathered edge, and appends their boxes and classes.

    Parameters
    ----------
    *args, **kwargs
        As for ``YOLODataset``.
    copy_paste_p : float
        Probability of pasting into a loaded image.
    copy_paste_classes : sequence of int or None
        Rare class ids; ``None`` uses :func:`rare_classes` on the training box counts.
    copy_paste_max : int
        Most crops per image.
    copy_paste_seed : int
        Seed of the paste random generator.
    max_bank : int
        Most crops kept in the bank.
    """

    def __init__(
        self,
        *args: Any,
        copy_paste_p: float = 0.2,
        copy_paste_classes: Sequence[int] | None = None,
        copy_paste_max: int = 3,
        copy_paste_seed: int = 0,
        max_bank: int = 4000,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= copy_paste_p <= 1.0:
            raise ValueError(f"copy_paste_p must be in [0, 1], got {copy_paste_p!r}")
        self.copy_paste_p = float(copy_paste_p)
        self.copy_paste_max = int(copy_paste_max)
        self._rng = random.Random(copy_paste_seed)
        nc = len(self.data["names"])
        counts = class_frequencies([lb["cls"] for lb in self.labels], nc)
        chosen = rare_classes(counts) if copy_paste_classes is None else tuple(copy_paste_classes)
        self.rare_classes: tuple[int, ...] = tuple(sorted(set(int(c) for c in chosen)))
        self.crop_bank: list[_Crop] = self._build_bank(max_bank)
        logger.info(
            "copy-paste: p=%.2f, rare classes %s, %d crops in the bank",
            self.copy_paste_p,
            self.rare_classes,
            len(self.crop_bank),
        )

    def _build_bank(self, max_bank: int) -> list[_Crop]:
        bank: list[_Crop] = []
        for lb in self.labels:
            cls = np.asarray(lb["cls"]).reshape(-1).astype(int)
            keep = np.isin(cls, self.rare_classes)
            if not keep.any():
                continue
            image = cv2.imread(lb["im_file"], self.cv2_flag)
            if image is None:
                raise FileNotFoundError(f"copy-paste: cannot read {lb['im_file']}")
            if image.ndim == 2:
                image = image[..., None]
            h0, w0 = image.shape[:2]
            for c, (x, y, w, h) in zip(cls[keep], np.asarray(lb["bboxes"])[keep], strict=True):
                x0, x1 = int(np.rint((x - w / 2) * w0)), int(np.rint((x + w / 2) * w0))
                y0, y1 = int(np.rint((y - h / 2) * h0)), int(np.rint((y + h / 2) * h0))
                x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w0), min(y1, h0)
                if x1 - x0 >= 4 and y1 - y0 >= 4:
                    bank.append(_Crop(image[y0:y1, x0:x1].copy(), int(c)))
                if len(bank) >= max_bank:
                    return bank
        return bank

    def get_image_and_label(self, index: int) -> dict[str, Any]:
        """Load one image and its labels, then maybe paste rare-lesion crops into it."""
        label = super().get_image_and_label(index)
        if self.crop_bank and self._rng.random() < self.copy_paste_p:
            label = self.paste(label, self._rng.randint(1, self.copy_paste_max))
        return label

    def paste(self, label: dict[str, Any], n: int) -> dict[str, Any]:
        """Paste ``n`` random crops from the bank into ``label`` (a ``get_image_and_label`` dict).

        Parameters
        ----------
        label : dict
            Ultralytics label dict with ``img`` (resized, HWC uint8), ``ori_shape``,
            ``resized_shape``, ``cls`` and ``instances`` (normalised xywh).
        n : int
            Number of crops to try to paste.

        Returns
        -------
        dict
            The same dict with a pasted copy of the image and the extra boxes/classes.
        """
        img = np.array(
            label["img"], copy=True
        )  # the dataset may cache the array: never paste in place
        h, w = img.shape[:2]
        r = label["resized_shape"][0] / max(label["ori_shape"][0], 1)
        instances: Instances = label["instances"]
        instances.convert_bbox("xywh")
        xywh: np.ndarray = np.array(instances.bboxes, dtype=np.float32).reshape(-1, 4)
        if not instances.normalized:
            xywh = xywh / np.array([w, h, w, h], dtype=np.float32)
        cls = np.asarray(label["cls"], dtype=np.float32).reshape(-1, 1)
        existing = np.stack(
            [
                (xywh[:, 0] - xywh[:, 2] / 2) * w,
                (xywh[:, 1] - xywh[:, 3] / 2) * h,
                (xywh[:, 0] + xywh[:, 2] / 2) * w,
                (xywh[:, 1] + xywh[:, 3] / 2) * h,
            ],
            axis=1,
        )
        new_boxes: list[np.ndarray] = []
        new_cls: list[int] = []
        for _ in range(n):
            crop = self.crop_bank[self._rng.randrange(len(self.crop_bank))]
            ch, cw = crop.pixels.shape[:2]
            th, tw = max(2, round(ch * r)), max(2, round(cw * r))
            if th >= h or tw >= w:
                continue
            for _try in range(10):
                x0, y0 = self._rng.randint(0, w - tw), self._rng.randint(0, h - th)
                box = np.array([x0, y0, x0 + tw, y0 + th], dtype=np.float32)
                taken = np.concatenate([existing, np.array(new_boxes).reshape(-1, 4)])
                # neither covers much of an existing box nor is much covered by one
                if _overlap_fraction(box, taken) <= 0.3 and all(
                    _overlap_fraction(b, box[None]) <= 0.3 for b in taken
                ):
                    break
            else:
                continue
            patch = cv2.resize(crop.pixels, (tw, th), interpolation=cv2.INTER_LINEAR)
            if patch.ndim == 2:
                patch = patch[..., None]
            if patch.shape[2] != img.shape[2]:
                patch = np.repeat(patch[..., :1], img.shape[2], axis=2)
            alpha = _feather_mask(th, tw)[..., None]
            region = img[y0 : y0 + th, x0 : x0 + tw].astype(np.float32)
            img[y0 : y0 + th, x0 : x0 + tw] = np.clip(
                alpha * patch.astype(np.float32) + (1 - alpha) * region, 0, 255
            ).astype(img.dtype)
            new_boxes.append(box)
            new_cls.append(crop.cls)
        if not new_boxes:
            return label
        nb = np.array(new_boxes, dtype=np.float32)
        nb_xywh = np.stack(
            [
                (nb[:, 0] + nb[:, 2]) / 2 / w,
                (nb[:, 1] + nb[:, 3]) / 2 / h,
                (nb[:, 2] - nb[:, 0]) / w,
                (nb[:, 3] - nb[:, 1]) / h,
            ],
            axis=1,
        )
        label["img"] = img
        label["cls"] = np.concatenate([cls, np.array(new_cls, dtype=np.float32).reshape(-1, 1)])
        label["instances"] = Instances(
            np.concatenate([xywh, nb_xywh]).astype(np.float32),
            segments=np.zeros((0, 1000, 2), dtype=np.float32),
            keypoints=None,
            bbox_format="xywh",
            normalized=True,
        )
        return label


# --------------------------------------------------------------------------- trainer


class SpineDetectionTrainer(DetectionTrainer):
    """``DetectionTrainer`` with the switchable :class:`DetectorExtras`.

    Parameters
    ----------
    overrides : dict
        Ultralytics training arguments.
    extras : DetectorExtras
        Which extras to use.
    seed : int
        Seed for the copy-paste generator and the weighted sampler.
    """

    def __init__(
        self,
        overrides: dict[str, Any] | None = None,
        *,
        extras: DetectorExtras | None = None,
        seed: int = 0,
        _callbacks: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(overrides=overrides, _callbacks=_callbacks)
        self.extras = extras or DetectorExtras()
        self.extras_seed = int(seed)
        self.sampling_weights: np.ndarray | None = None
        if self.extras.focal:
            self.add_callback("on_pretrain_routine_end", _install_focal_loss)

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        """Build the YOLO dataset; the training set pastes rare boxes when copy-paste is on."""
        if mode != "train" or self.extras.copy_paste <= 0:
            return super().build_dataset(img_path, mode, batch)
        cfg = self.args
        model: Any = unwrap_model(cast(Any, self.model))
        gs = max(int(model.stride.max()), 32)
        return CopyPasteYOLODataset(
            img_path=img_path,
            imgsz=cfg.imgsz,
            batch_size=batch,
            augment=True,
            hyp=cfg,
            rect=bool(cfg.rect),
            cache=cfg.cache or None,
            single_cls=cfg.single_cls or False,
            stride=gs,
            pad=0.0,
            prefix=colorstr("train: "),
            task=cfg.task,
            classes=cfg.classes,
            data=self.data,
            fraction=get_split_fraction(cfg.fraction, "train"),
            copy_paste_p=self.extras.copy_paste,
            copy_paste_classes=self.extras.copy_paste_classes,
            copy_paste_max=self.extras.copy_paste_max,
            copy_paste_seed=self.extras_seed,
        )

    def get_dataloader(
        self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"
    ) -> Any:
        """Training loader draws images by class-balanced weights when balanced sampling is on."""
        if mode != "train" or not self.extras.balanced_sampling:
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        if rank not in {-1, 0}:
            raise ValueError("balanced sampling supports single-process training only")
        dataset = self.build_dataset(dataset_path, mode, batch_size)
        nc = len(self.data["names"])
        weights = image_sampling_weights([lb["cls"] for lb in dataset.labels], nc)
        self.sampling_weights = weights
        generator = torch.Generator()
        generator.manual_seed(self.extras_seed)
        sampler = torch.utils.data.WeightedRandomSampler(
            weights.tolist(),
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
        batch = min(batch_size, len(dataset))
        batches = math.ceil(len(dataset) / max(batch, 1))
        workers = min(os.cpu_count() or 1, self.args.workers, 0 if batches <= 1 else batches)
        logger.info(
            "balanced sampling: weights from 1/sqrt(class frequency), %d images", len(dataset)
        )
        return InfiniteDataLoader(
            dataset=dataset,
            batch_size=batch,
            shuffle=False,
            num_workers=workers,
            sampler=sampler,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=False,
            collate_fn=getattr(dataset, "collate_fn", None),
            worker_init_fn=seed_worker,
            drop_last=False,
        )

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Normalise the batch; with ``scale_range`` resize it to a random stride multiple in range."""
        batch = super().preprocess_batch(batch)
        rng = self.extras.scale_range
        model: Any = self.model
        if rng is None or not model.training:
            return batch
        stride = int(self.stride)
        lo = max(stride, math.ceil(rng[0] / stride) * stride)
        hi = max(lo, rng[1] // stride * stride)
        size = random.randrange(lo, hi + 1, stride)
        imgs = batch["img"]
        scale = size / max(imgs.shape[2:])
        if scale != 1:
            shape = [math.ceil(x * scale / stride) * stride for x in imgs.shape[2:]]
            batch["img"] = nn.functional.interpolate(
                imgs, size=shape, mode="bilinear", align_corners=False
            )
        return batch


def _install_focal_loss(trainer: SpineDetectionTrainer) -> None:
    """Callback: put the focal criterion on the training model (after the EMA copy was made)."""
    model: Any = unwrap_model(cast(Any, trainer.model))
    model.criterion = FocalDetectionLoss(
        model, gamma=trainer.extras.focal_gamma, alpha=trainer.extras.focal_alpha
    )
    logger.info(
        "focal loss: gamma=%.2f alpha=%.2f replaces the BCE class term",
        trainer.extras.focal_gamma,
        trainer.extras.focal_alpha,
    )

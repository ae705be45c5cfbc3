"""Detector training extras that stock Ultralytics does not do for boxes.

Three switchable additions, each hooked into Ultralytics 8.4 at a documented seam:

* **Class-balanced image sampling** -- every training image gets a sampling weight from
  ``1 / sqrt(class frequency)``, where the frequency of a class is the number of training
  images in which it is present (image-level presence throughout: the sampler draws images,
  so images are what is counted; the rarest class present in an image decides; images without
  boxes are their own "background" class, counted the same way). The training dataloader
  draws images with a :class:`torch.utils.data.WeightedRandomSampler` instead of shuffling
  (:meth:`SpineDetectionTrainer.get_dataloader`).
* **Box-level copy-paste of rare lesions** -- crops of rare-class boxes are pasted into other
  training images, with their labels, with probability ``p`` per loaded image
  (:class:`CopyPasteYOLODataset`, overriding ``get_image_and_label`` so mosaic tiles get it too).
  Ultralytics' own ``copy_paste`` needs segments and does nothing for box-only data. Each
  loader worker draws from its own random stream (seeded from the run seed and the worker's
  torch seed, :func:`worker_random`), not from one stream copied into every worker.
* **A classification loss made for soft targets** -- Ultralytics' task-aligned assigner gives
  IoU-aligned soft targets in [0, 1]; a binary focal loss treats them as hard labels. The BCE
  class term of ``v8DetectionLoss`` can be replaced by the varifocal loss (Zhang et al. 2021,
  "VarifocalNet: An IoU-aware Dense Object Detector", CVPR) or the quality focal loss (Li et
  al. 2020, "Generalized Focal Loss", NeurIPS), both defined for soft IoU targets
  (:class:`SoftTargetDetectionLoss`). The criterion is installed on the training model only; the
  EMA model written to ``best.pt`` stays a stock ``DetectionModel`` (Ultralytics strips
  ``criterion`` when saving), so serving never needs this module.

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
    "CLASS_LOSSES",
    "CopyPasteYOLODataset",
    "DetectorExtras",
    "SoftClassLoss",
    "SoftTargetDetectionLoss",
    "SpineDetectionTrainer",
    "class_frequencies",
    "class_image_counts",
    "image_sampling_weights",
    "quality_focal_loss",
    "rare_classes",
    "varifocal_loss",
    "worker_random",
]

#: Classification losses of the detector: stock BCE, varifocal (Zhang et al. 2021) or quality
#: focal (Li et al. 2020).
CLASS_LOSSES: tuple[str, ...] = ("bce", "varifocal", "quality_focal")


@dataclass(frozen=True)
class DetectorExtras:
    """Which extras are on, and their parameters.

    Attributes
    ----------
    balanced_sampling : bool
        Draw training images with weights from ``1/sqrt(class frequency)`` (frequency: images
        in which the class is present).
    copy_paste : float
        Probability per loaded training image of pasting rare-lesion box crops (0 = off; 0.2 in
        the method).
    copy_paste_classes : tuple of int or None
        Class ids treated as rare; ``None`` picks them from frequencies (:func:`rare_classes`).
    copy_paste_max : int
        Most crops pasted into one image.
    class_loss : str
        Classification loss, one of :data:`CLASS_LOSSES` (``"bce"``: Ultralytics' own).
    class_loss_gamma : float
        Focusing exponent: gamma of the varifocal loss, beta of the quality focal loss (2.0 in
        both papers).
    class_loss_alpha : float
        Weight of the negatives in the varifocal loss (0.75 in the paper); unused by QFL.
    scale_range : tuple of int or None
        ``(min, max)`` training image size in pixels for multi-scale training (``None`` = off).
    """

    balanced_sampling: bool = False
    copy_paste: float = 0.0
    copy_paste_classes: tuple[int, ...] | None = None
    copy_paste_max: int = 3
    class_loss: str = "bce"
    class_loss_gamma: float = 2.0
    class_loss_alpha: float = 0.75
    scale_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ValueError(f"copy_paste must be in [0, 1], got {self.copy_paste!r}")
        if self.copy_paste_max < 1:
            raise ValueError(f"copy_paste_max must be >= 1, got {self.copy_paste_max!r}")
        if self.class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {CLASS_LOSSES}, got {self.class_loss!r}")
        if self.class_loss_gamma < 0:
            raise ValueError(f"class_loss_gamma must be >= 0, got {self.class_loss_gamma!r}")
        if not 0.0 <= self.class_loss_alpha <= 1.0:
            raise ValueError(f"class_loss_alpha must be in [0, 1], got {self.class_loss_alpha!r}")
        if self.scale_range is not None:
            lo, hi = self.scale_range
            if not 32 <= lo <= hi:
                raise ValueError(
                    f"scale_range must be (min, max) with 32 <= min <= max, got {lo, hi}"
                )


# --------------------------------------------------------------------------- soft-target losses


def _check_pair(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {logits.shape} and {targets.shape}"
        )


def varifocal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0, alpha: float = 0.75
) -> torch.Tensor:
    """Element-wise varifocal loss for soft (IoU-aware) targets in [0, 1].

    ``VFL(p, q) = -q (q log p + (1 - q) log(1 - p))`` where ``q > 0`` and
    ``-alpha p^gamma log(1 - p)`` where ``q = 0``, with ``p = sigmoid(logits)``: positives are
    weighted by their target quality, only negatives are focally down-weighted (Zhang, Wang,
    Dayoub, Sünderhauf 2021, "VarifocalNet: An IoU-aware Dense Object Detector", CVPR, eq. 2).

    Parameters
    ----------
    logits, targets : torch.Tensor
        Same shape; ``targets`` is the soft quality score ``q`` (0 for negatives).
    gamma : float
        Focusing exponent of the negatives.
    alpha : float
        Weight of the negatives.

    Returns
    -------
    torch.Tensor
        float32 loss per element (no reduction).
    """
    _check_pair(logits, targets)
    x, q = logits.float(), targets.float()
    ce = nn.functional.binary_cross_entropy_with_logits(x, q, reduction="none")
    weight = torch.where(q > 0, q, alpha * x.sigmoid().pow(gamma))
    return ce * weight


def quality_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, beta: float = 2.0
) -> torch.Tensor:
    """Element-wise quality focal loss for soft targets in [0, 1].

    ``QFL(p, y) = -|y - p|^beta ((1 - y) log(1 - p) + y log p)`` with ``p = sigmoid(logits)``:
    the cross-entropy against the soft target, scaled by the distance to it (Li et al. 2020,
    "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense
    Object Detection", NeurIPS, eq. 5). With ``beta = 0`` it is the BCE.

    Parameters
    ----------
    logits, targets : torch.Tensor
        Same shape; ``targets`` is the soft quality score ``y``.
    beta : float
        Focusing exponent.

    Returns
    -------
    torch.Tensor
        float32 loss per element (no reduction).
    """
    _check_pair(logits, targets)
    x, y = logits.float(), targets.float()
    ce = nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    return ce * (y - x.sigmoid()).abs().pow(beta)


class SoftClassLoss(nn.Module):
    """Drop-in for ``nn.BCEWithLogitsLoss(reduction="none")``: varifocal or quality focal loss.

    Parameters
    ----------
    kind : str
        ``"varifocal"`` or ``"quality_focal"``.
    gamma : float
        Focusing exponent (VFL gamma, QFL beta).
    alpha : float
        Negative weight (VFL only).
    """

    def __init__(self, kind: str, gamma: float = 2.0, alpha: float = 0.75) -> None:
        super().__init__()
        if kind not in CLASS_LOSSES[1:]:
            raise ValueError(f"kind must be one of {CLASS_LOSSES[1:]}, got {kind!r}")
        self.kind = kind
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the element-wise loss."""
        if self.kind == "varifocal":
            return varifocal_loss(logits, targets, gamma=self.gamma, alpha=self.alpha)
        return quality_focal_loss(logits, targets, beta=self.gamma)


class SoftTargetDetectionLoss(v8DetectionLoss):
    """``v8DetectionLoss`` whose classification term is a soft-target loss instead of BCE.

    Ultralytics computes ``self.bce(pred_scores, target_scores)`` element-wise on the
    task-aligned soft targets and normalises by their sum; only that element-wise function
    changes here (:class:`SoftClassLoss`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str = "varifocal",
        gamma: float = 2.0,
        alpha: float = 0.75,
        tal_topk: int = 10,
    ) -> None:
        super().__init__(model, tal_topk=tal_topk)
        self.bce = SoftClassLoss(kind, gamma, alpha)  # type: ignore[assignment]


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


def class_image_counts(classes_per_image: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Count, per class, the images in which the class is present (at least one box).

    Parameters
    ----------
    classes_per_image : sequence of numpy.ndarray
        Class ids of each image's boxes (any shape; flattened).
    nc : int
        Number of classes.

    Returns
    -------
    numpy.ndarray
        ``(nc,)`` float64 image counts.
    """
    return class_frequencies(
        [np.unique(np.asarray(c, dtype=np.int64).reshape(-1)) for c in classes_per_image], nc
    )


def image_sampling_weights(classes_per_image: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Sampling weight per image from ``1 / sqrt(class frequency)`` of the classes it shows.

    The frequency of a class is the number of training images in which it is present
    (:func:`class_image_counts`), the unit the sampler draws. An image weighs as much as its
    rarest class (``max`` over its classes of ``1/sqrt(freq)``); images without boxes form a
    "background" class whose frequency is, the same way, the number of such images.

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
    counts = class_image_counts(classes_per_image, nc)
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


def worker_random(seed: int, cache: dict[tuple[int, int], random.Random]) -> random.Random:
    """The random stream of the calling loader worker (or of the main process).

    Each DataLoader worker gets its own stream, seeded from ``seed`` and the worker's torch
    seed (:func:`torch.utils.data.get_worker_info`: the loader's base seed plus the worker id,
    so a new stream per worker and per loader iterator, reproducible when the loader's
    generator is seeded). Outside a worker the stream is seeded by ``seed`` alone.

    Parameters
    ----------
    seed : int
        Run seed.
    cache : dict
        Per-process store of the streams made so far (keyed by worker id and worker seed).
    """
    info = torch.utils.data.get_worker_info()
    key = (-1, 0) if info is None else (int(info.id), int(info.seed))
    rng = cache.get(key)
    if rng is None:
        entropy = [int(seed)] if info is None else [int(seed), key[1] % 2**63, key[0]]
        rng = random.Random(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        cache[key] = rng
    return rng


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
        Run seed of the paste random streams (one stream per loader worker).
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
        self.copy_paste_seed = int(copy_paste_seed)
        self._streams: dict[tuple[int, int], random.Random] = {}
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

    @property
    def _rng(self) -> random.Random:
        """This process's paste stream (:func:`worker_random`: one per loader worker)."""
        return worker_random(self.copy_paste_seed, self._streams)

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
        if self.extras.class_loss != "bce":
            self.add_callback("on_pretrain_routine_end", _install_class_loss)

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
            "balanced sampling: weights from 1/sqrt(images per class), %d images", len(dataset)
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


def _install_class_loss(trainer: SpineDetectionTrainer) -> None:
    """Callback: put the soft-target criterion on the training model (after the EMA copy)."""
    model: Any = unwrap_model(cast(Any, trainer.model))
    extras = trainer.extras
    model.criterion = SoftTargetDetectionLoss(
        model, kind=extras.class_loss, gamma=extras.class_loss_gamma, alpha=extras.class_loss_alpha
    )
    logger.info(
        "%s loss (gamma/beta %.2f, alpha %.2f) replaces the BCE class term",
        extras.class_loss,
        extras.class_loss_gamma,
        extras.class_loss_alpha,
    )

"""Lesion detector: ultralytics YOLO (YOLO11) network with our own post-processing.

The network is run directly (PyTorch ``nn.Module`` or its ONNX export); both backends return the
raw head output ``(N, 4 + nc, anchors)`` (centre x, centre y, width, height in letterbox pixels,
then per-class sigmoid scores), and one post-process serves both: best class per anchor,
confidence threshold, class-wise NMS (``torchvision.ops.batched_nms``) or class-aware Gaussian
Soft-NMS. Boxes are mapped back to source pixels by the caller (``Letterbox.to_source``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from spine_node.models.backend_onnxruntime import OnnxDetectorNet
from spine_node.models.backend_torch import RawHead, TorchDetectorNet
from spine_node.models.bundle import BundleError, DetectorSpec
from spine_node.offline import configure_offline

log = logging.getLogger(__name__)

__all__ = [
    "MAX_DETECTIONS",
    "Detections",
    "Detector",
    "DetectorNet",
    "OnnxDetectorNet",
    "RawHead",
    "TorchDetectorNet",
    "box_iou",
    "load_yolo_module",
    "postprocess",
    "soft_nms",
    "to_network_input",
]

MAX_DETECTIONS = 300
_MAX_CANDIDATES = 30000


@dataclass(frozen=True)
class Detections:
    """Detections for one image, in the coordinates the network saw (letterbox pixels).

    Attributes
    ----------
    boxes : numpy.ndarray
        ``(K, 4)`` float32 xyxy.
    scores : numpy.ndarray
        ``(K,)`` float32.
    classes : numpy.ndarray
        ``(K,)`` int64 class ids.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, keep: np.ndarray) -> Detections:
        """Return the detections selected by a boolean mask or index array."""
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


def _empty() -> Detections:
    return Detections(
        np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    )


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``(N, 4)`` and ``(M, 4)`` -> ``(N, M)``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def soft_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    *,
    sigma: float = 0.5,
    score_threshold: float = 0.25,
) -> np.ndarray:
    """Class-aware Gaussian Soft-NMS.

    Within each class, repeatedly take the highest-scoring box and decay the scores of the
    remaining boxes of the same class by ``exp(-iou^2 / sigma)``; boxes of other classes are never
    touched, so overlapping findings of different classes survive.

    Parameters
    ----------
    boxes : numpy.ndarray
        ``(N, 4)`` xyxy.
    scores : numpy.ndarray
        ``(N,)`` scores.
    classes : numpy.ndarray
        ``(N,)`` class ids.
    sigma : float
        Gaussian width (> 0).
    score_threshold : float
        Boxes whose decayed score falls below this are dropped.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` decayed scores; dropped boxes get 0. Keep ``result >= score_threshold``.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.asarray(scores, np.float64).copy()
    classes = np.asarray(classes).reshape(-1)
    if not (boxes.shape[0] == out.shape[0] == classes.shape[0]):
        raise ValueError(
            f"boxes, scores and classes must have the same length, got {boxes.shape[0]}, "
            f"{out.shape[0]}, {classes.shape[0]}"
        )
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        remaining = list(idx)
        while remaining:
            best_pos = int(np.argmax(out[remaining]))
            best = remaining.pop(best_pos)
            if out[best] < score_threshold:
                out[best] = 0.0
                continue
            if not remaining:
                break
            rest = np.asarray(remaining)
            iou = box_iou(boxes[best][None], boxes[rest])[0]
            out[rest] *= np.exp(-(iou**2) / sigma)
    out[out < score_threshold] = 0.0
    return out.astype(np.float32)


def postprocess(
    raw: np.ndarray | torch.Tensor,
    *,
    conf: float,
    iou: float,
    use_soft_nms: bool = False,
    soft_nms_sigma: float = 0.5,
    max_det: int = MAX_DETECTIONS,
) -> list[Detections]:
    """Decode raw YOLO head output into detections per image.

    Parameters
    ----------
    raw : numpy.ndarray or torch.Tensor
        ``(N, 4 + nc, anchors)``: xywh (letterbox pixels) then class probabilities.
    conf : float
        Confidence threshold (best class per anchor must exceed it).
    iou : float
        Class-wise NMS IoU threshold (hard NMS).
    use_soft_nms : bool
        Use class-aware Gaussian Soft-NMS instead of hard NMS.
    soft_nms_sigma : float
        Soft-NMS sigma.
    max_det : int
        At most this many detections per image, highest scores first.

    Returns
    -------
    list of Detections
    """
    from torchvision.ops import batched_nms

    pred = torch.as_tensor(raw).float().cpu()
    if pred.ndim != 3 or pred.shape[1] < 5:
        raise ValueError(f"raw must be (N, 4 + nc, anchors), got {tuple(pred.shape)}")
    results: list[Detections] = []
    for image_pred in pred:
        x = image_pred.transpose(0, 1)  # (anchors, 4 + nc)
        cls_scores = x[:, 4:]
        score, cls = cls_scores.max(dim=1)
        keep = score > conf
        if not bool(keep.any()):
            results.append(_empty())
            continue
        xywh, score, cls = x[keep, :4], score[keep], cls[keep]
        if score.shape[0] > _MAX_CANDIDATES:
            top = score.argsort(descending=True)[:_MAX_CANDIDATES]
            xywh, score, cls = xywh[top], score[top], cls[top]
        boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), dim=1)
        if use_soft_nms:
            decayed = soft_nms(
                boxes.numpy(),
                score.numpy(),
                cls.numpy(),
                sigma=soft_nms_sigma,
                score_threshold=conf,
            )
            order = np.argsort(-decayed, kind="stable")
            order = order[decayed[order] > 0][:max_det]
            results.append(
                Detections(
                    boxes.numpy()[order].astype(np.float32),
                    decayed[order].astype(np.float32),
                    cls.numpy()[order].astype(np.int64),
                )
            )
            continue
        kept = batched_nms(boxes, score, cls, iou)[:max_det]
        results.append(
            Detections(
                boxes[kept].numpy().astype(np.float32),
                score[kept].numpy().astype(np.float32),
                cls[kept].numpy().astype(np.int64),
            )
        )
    return results


class DetectorNet(Protocol):
    """Runs the network: ``(N, 3, S, S)`` float32 [0, 1] -> raw ``(N, 4 + nc, anchors)``."""

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Return the raw head output for a batch."""
        ...


def load_yolo_module(path: Path) -> nn.Module:
    """Load an ultralytics ``.pt`` checkpoint into an eval-mode fp32 ``nn.Module``.

    The caller must have verified the file's SHA-256 against the bundle manifest first:
    ultralytics checkpoints are full pickles and are unpickled here with ``weights_only=False``,
    which is acceptable only for a file whose hash we trust.
    """
    configure_offline()
    from ultralytics.nn.tasks import load_checkpoint

    # weights_only=False inside (pickled nn.Module): safe only because the sha256 check passed.
    model, _ = load_checkpoint(str(Path(path).resolve()), device="cpu", fuse=False)
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Detector:
    """YOLO lesion detector with the manifest's inference settings.

    Parameters
    ----------
    net : DetectorNet
        Backend running the network.
    spec : DetectorSpec
        Class names, confidence, IoU, Soft-NMS settings.
    max_batch : int
        Images per forward pass.
    """

    def __init__(self, net: DetectorNet, spec: DetectorSpec, *, max_batch: int = 8) -> None:
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec must be a DetectorSpec, got {type(spec).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.net = net
        self.spec = spec
        self.max_batch = max_batch

    def __call__(self, images: np.ndarray) -> list[Detections]:
        """Detect lesions on letterboxed detect images.

        Parameters
        ----------
        images : numpy.ndarray
            ``(B, S, S)`` float32 [0, 1] grey, ``(B, S, S, 3)`` / ``(B, 3, S, S)`` float32 [0, 1]
            or uint8 [0, 255].

        Returns
        -------
        list of Detections
            Boxes in letterbox pixels.
        """
        batch = to_network_input(images, self.spec.imgsz)
        out: list[Detections] = []
        for start in range(0, batch.shape[0], self.max_batch):
            raw = self.net.raw(batch[start : start + self.max_batch])
            nc = raw.shape[1] - 4
            if nc != len(self.spec.class_names):
                raise BundleError(
                    f"detector outputs {nc} classes but the manifest names "
                    f"{len(self.spec.class_names)} ({self.spec.weights})."
                )
            out.extend(
                postprocess(
                    raw,
                    conf=self.spec.conf,
                    iou=self.spec.iou,
                    use_soft_nms=self.spec.soft_nms,
                    soft_nms_sigma=self.spec.soft_nms_sigma,
                )
            )
        return out


def to_network_input(images: np.ndarray, imgsz: int) -> np.ndarray:
    """Turn letterboxed detect images into the network's ``(B, 3, S, S)`` float32 [0, 1] input."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = np.repeat(x[:, None], 3, axis=1)
    elif x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (imgsz, imgsz):
        raise ValueError(
            f"images must be (B, {imgsz}, {imgsz}) grey or 3-channel, got {np.asarray(images).shape}"
        )
    return np.ascontiguousarray(x)

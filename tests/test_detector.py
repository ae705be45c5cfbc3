"""Detector post-processing: decode, class-wise NMS, class-aware Soft-NMS, parity with ultralytics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spine_node.models.bundle import DetectorSpec
from spine_node.models.detector import (
    Detector,
    TorchDetectorNet,
    box_iou,
    load_yolo_module,
    postprocess,
    soft_nms,
    to_network_input,
)
from spine_node.results.types import LESION_LABELS
from training.export import synthetic_radiographs, tiny_yolo_checkpoint


def _raw(rows: list[tuple[float, float, float, float, int, float]], nc: int = 7) -> np.ndarray:
    """Raw head output (1, 4 + nc, anchors) from (cx, cy, w, h, class, score) rows."""
    out = np.zeros((1, 4 + nc, len(rows)), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(rows):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def test_decode_and_classwise_nms() -> None:
    raw = _raw(
        [
            (50, 50, 20, 20, 0, 0.9),
            (51, 51, 20, 20, 0, 0.8),  # same class, IoU ~0.9: suppressed
            (51, 51, 20, 20, 3, 0.7),  # other class, same place: kept (class-wise NMS)
            (150, 150, 10, 10, 0, 0.6),  # same class, far away: kept
            (10, 10, 4, 4, 1, 0.2),  # below confidence 0.25: dropped
        ]
    )
    (det,) = postprocess(raw, conf=0.25, iou=0.5)
    assert len(det) == 3
    np.testing.assert_allclose(det.scores, [0.9, 0.7, 0.6], atol=1e-6)
    assert det.classes.tolist() == [0, 3, 0]
    np.testing.assert_allclose(det.boxes[0], [40, 40, 60, 60])


def test_empty_output() -> None:
    (det,) = postprocess(_raw([(5, 5, 2, 2, 0, 0.1)]), conf=0.25, iou=0.5)
    assert len(det) == 0 and det.boxes.shape == (0, 4)


def test_soft_nms_keeps_other_classes_and_decays_same_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.8, 0.7])
    classes = np.array([0, 0, 2, 0])
    out = soft_nms(boxes, scores, classes, sigma=0.5, score_threshold=0.05)
    iou = box_iou(boxes[:1], boxes[1:2])[0, 0]
    assert out[0] == pytest.approx(0.9)
    assert out[1] == pytest.approx(0.8 * np.exp(-(iou**2) / 0.5), rel=1e-5)  # decayed
    assert out[1] < 0.8
    assert out[2] == pytest.approx(0.8)  # different class, same place: untouched
    assert out[3] == pytest.approx(0.7)  # same class, no overlap: untouched
    strict = soft_nms(boxes, scores, classes, sigma=0.5, score_threshold=0.5)
    assert strict[1] == 0.0 and strict[2] == pytest.approx(0.8)


def test_soft_nms_in_postprocess() -> None:
    raw = _raw([(50, 50, 20, 20, 0, 0.9), (50, 50, 20, 20, 0, 0.8), (50, 50, 20, 20, 4, 0.6)])
    (hard,) = postprocess(raw, conf=0.25, iou=0.5)
    (soft,) = postprocess(raw, conf=0.25, iou=0.5, use_soft_nms=True, soft_nms_sigma=2.0)
    assert len(hard) == 2
    assert len(soft) == 3  # the identical same-class box is decayed (0.8 * e^-0.5), not removed
    assert sorted(soft.scores.tolist()) == pytest.approx(sorted([0.9, 0.6, 0.8 * np.exp(-0.5)]))


def test_soft_nms_validates() -> None:
    with pytest.raises(ValueError, match="sigma"):
        soft_nms(np.zeros((1, 4)), np.ones(1), np.zeros(1), sigma=0)
    with pytest.raises(ValueError, match="same length"):
        soft_nms(np.zeros((2, 4)), np.ones(1), np.zeros(1))


def test_network_input_accepts_grey_float_and_uint8() -> None:
    grey = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    x = to_network_input(grey, 64)
    assert x.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(x[:, 1], grey)
    u8 = (grey * 255).astype(np.uint8)[..., None].repeat(3, axis=-1)
    np.testing.assert_allclose(to_network_input(u8, 64)[:, 0], u8[..., 0] / 255.0, atol=1e-7)
    with pytest.raises(ValueError, match="images must be"):
        to_network_input(grey, 32)


def test_decode_matches_ultralytics_predict(tmp_path: Path) -> None:
    """Our raw-head decode + NMS gives the boxes ``YOLO(...).predict`` gives (tiny YOLO11)."""
    torch.set_num_threads(1)
    from ultralytics import YOLO

    path = tiny_yolo_checkpoint(tmp_path / "tiny.pt", seed=0)
    spec = DetectorSpec(weights="tiny.pt", sha256="0" * 64, class_names=LESION_LABELS, imgsz=64)
    detector = Detector(TorchDetectorNet(load_yolo_module(path), torch.device("cpu")), spec)
    yolo = YOLO(str(path), task="detect")
    images = (synthetic_radiographs(3, 64, seed=3) * 255).round().astype(np.uint8)
    ours_all = detector(images)
    total = 0
    for image, ours in zip(images, ours_all, strict=True):
        predicted: Any = yolo.predict(
            np.repeat(image[..., None], 3, axis=2), imgsz=64, conf=0.25, iou=0.5, verbose=False
        )
        ref = predicted[0].boxes
        assert len(ours) == len(ref)
        total += len(ours)
        clipped = np.clip(ours.boxes, 0, 64)  # ultralytics clips to the image
        iou = np.diag(box_iou(clipped, ref.xyxy.numpy()))
        assert (iou > 0.99).all()
        np.testing.assert_allclose(ours.scores, ref.conf.numpy(), atol=1e-4)
        assert ours.classes.tolist() == ref.cls.numpy().astype(int).tolist()
    assert total > 0  # the comparison saw real boxes

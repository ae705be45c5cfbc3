"""Detector training: the three extras (balanced sampling, rare-box copy-paste, focal loss) and
one offline training epoch."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from ultralytics.data.dataset import YOLODataset

from spine_node.results.types import LESION_LABELS
from training.detector_extras import (
    CopyPasteYOLODataset,
    DetectorExtras,
    FocalBCE,
    FocalDetectionLoss,
    focal_bce,
    image_sampling_weights,
    rare_classes,
)
from training.train_detector import DetectorConfig, tiny_model_yaml, train_detector

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop

COMMON, RARE = 0, 5


def _yolo_dataset(root: Path, *, n_train: int = 10, size: int = 128, seed: int = 0) -> Path:
    """A tiny Ultralytics dataset: class 0 common (two boxes per image), class 5 rare."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = (rng.random((size, size)) * 60 + 40).astype(np.uint8)
            classes = [COMMON, COMMON] + ([RARE] if i % 4 == 0 else [])
            if i % 5 == 4:
                classes = []
            lines = []
            for k, c in enumerate(classes):
                w = h = 24
                x, y = 8 + 40 * k, 10 + (i * 7) % 60
                img[y : y + h, x : x + w] = 200 if c == COMMON else 250
                lines.append(f"{c} {(x + w / 2) / size} {(y + h / 2) / size} {w / size} {h / size}")
            cv2.imwrite(str(root / "images" / split / f"{split}{i}.png"), img)
            (root / "labels" / split / f"{split}{i}.txt").write_text("\n".join(lines))
    data = root / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "path": str(root),
                "train": "images/train",
                "val": "images/val",
                "names": dict(enumerate(LESION_LABELS)),
            }
        )
    )
    return data


# --------------------------------------------------------------------------- focal loss


def test_focal_matches_hand_computed_value() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    targets = torch.tensor([1.0, 0.0, 0.3])
    got = focal_bce(logits, targets, gamma=2.0, alpha=0.25)
    want = []
    for x, t in zip(logits.tolist(), targets.tolist(), strict=True):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = t * p + (1 - t) * (1 - p)
        a_t = t * 0.25 + (1 - t) * 0.75
        want.append(a_t * (1 - p_t) ** 2 * ce)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    # the first element by hand: p = 0.880797, (1-p)^2 = 0.0142094, ce = 0.126928
    assert got[0].item() == pytest.approx(0.25 * 0.0142094 * 0.126928, rel=1e-4)


def test_focal_differs_from_bce_and_reduces_to_it() -> None:
    logits = torch.tensor([[3.0, -2.0], [0.1, 0.7]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    focal = FocalBCE(2.0, 0.25)(logits, targets)
    assert not torch.allclose(focal, bce)
    assert bool((focal < bce).all())  # down-weights every element here
    # gamma 0, alpha 0.5 is exactly half the BCE
    assert torch.allclose(focal_bce(logits, targets, gamma=0.0, alpha=0.5), 0.5 * bce)
    with pytest.raises(ValueError, match="same shape"):
        focal_bce(logits, targets[0])


def test_focal_detection_loss_replaces_the_class_term(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss

    torch.manual_seed(0)
    model = DetectionModel(str(tiny_model_yaml(tmp_path / "tiny.yaml")), nc=7, verbose=False)
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)  # type: ignore[assignment]
    model.train()
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [5.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.4, 0.2, 0.2]]),
    }
    preds = model(batch["img"])
    _, stock = v8DetectionLoss(model)(preds, batch)
    focal_loss = FocalDetectionLoss(model)
    assert isinstance(focal_loss.bce, FocalBCE)
    _, focal = focal_loss(preds, batch)
    assert focal["box_loss"] == pytest.approx(float(stock["box_loss"]))
    assert focal["dfl_loss"] == pytest.approx(float(stock["dfl_loss"]))
    assert float(focal["cls_loss"]) < float(stock["cls_loss"])


# --------------------------------------------------------------------------- sampling


def test_sampling_weights_follow_inverse_sqrt_class_frequency() -> None:
    classes = [
        np.array([0, 0]),
        np.array([0, 5]),
        np.array([0]),
        np.array([]),
        np.array([]),
        np.array([2]),
    ]
    w = image_sampling_weights(classes, 7)
    # box counts: class 0 -> 4, class 5 -> 1, class 2 -> 1; two images without boxes
    raw = np.array([1 / 2, 1.0, 1 / 2, 1 / math.sqrt(2), 1 / math.sqrt(2), 1.0])
    assert np.allclose(w, raw / raw.mean())
    assert w.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class ids"):
        image_sampling_weights([np.array([9])], 7)


def test_rare_classes_picks_infrequent_present_classes() -> None:
    assert rare_classes(np.array([100, 30, 20, 0, 5, 1, 0])) == (2, 4, 5)
    assert rare_classes(np.zeros(7)) == ()


# --------------------------------------------------------------------------- copy-paste


def test_copy_paste_adds_rare_boxes(tmp_path: Path) -> None:
    from ultralytics.cfg import get_cfg

    data_yaml = _yolo_dataset(tmp_path / "ds")
    data = {"names": dict(enumerate(LESION_LABELS)), "nc": 7, "channels": 3}
    hyp = get_cfg(overrides={"imgsz": 128, "mosaic": 0.0, "mixup": 0.0})
    ds = CopyPasteYOLODataset(
        img_path=str(data_yaml.parent / "images" / "train"),
        imgsz=128,
        augment=False,
        hyp=hyp,
        data=data,
        copy_paste_p=1.0,
        copy_paste_max=2,
    )
    assert ds.rare_classes == (RARE,)
    assert len(ds.crop_bank) == 2 and {c.cls for c in ds.crop_bank} == {RARE}
    index = 1  # an image with two common boxes and no rare one
    plain = YOLODataset.get_image_and_label(ds, index)
    pasted = ds.get_image_and_label(index)
    n_before = len(plain["cls"])
    assert len(pasted["cls"]) > n_before
    assert set(pasted["cls"][n_before:].ravel().astype(int)) == {RARE}
    assert len(pasted["instances"]) == len(pasted["cls"])
    assert not np.array_equal(pasted["img"], plain["img"])
    # the paste landed where the new box says: bright rare-lesion pixels inside it
    x, y, w, h = pasted["instances"].bboxes[n_before] * 128
    patch = pasted["img"][int(y - h / 4) : int(y + h / 4), int(x - w / 4) : int(x + w / 4)]
    assert patch.mean() > 200
    # the cached image the dataset keeps was not painted on
    again = YOLODataset.get_image_and_label(ds, index)
    assert np.array_equal(again["img"], plain["img"])


# --------------------------------------------------------------------------- training


def test_detector_trains_one_epoch_offline_with_every_extra(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data_yaml = _yolo_dataset(tmp_path / "ds")
    config = DetectorConfig(
        model=str(tiny_model_yaml(tmp_path / "tiny-det.yaml")),
        imgsz=128,
        epochs=1,
        batch=4,
        nbs=4,
        close_mosaic=0,
        scale_range=(96, 160),
        workers=0,
        extras=DetectorExtras(balanced_sampling=True, copy_paste=0.5, focal=True),
    )
    result = train_detector(config, data_yaml, tmp_path / "out", from_scratch=True)
    assert result.best.is_file() and result.last.is_file()
    assert "metrics/mAP50(B)" in result.metrics
    # sampler weights of the training images: 1/sqrt(box count of the rarest class of the image);
    # 16 common boxes, 2 rare boxes (images 0 and 8), 2 images without boxes (4 and 9)
    assert result.sampling_weights is not None
    raw = np.array([1 / math.sqrt(2) if i in (0, 8, 4, 9) else 1 / 4 for i in range(10)])
    assert np.allclose(np.array(result.sampling_weights), raw / raw.mean())
    assert result.extras_used["criterion"] == "FocalDetectionLoss"
    assert result.extras_used["train_dataset"] == "CopyPasteYOLODataset"
    assert result.extras_used["sampler"] == "WeightedRandomSampler"
    # the checkpoint is a stock model: serving needs none of this module
    ckpt = torch.load(result.best, map_location="cpu", weights_only=False)
    assert type(ckpt["model"]).__name__ == "DetectionModel"
    assert getattr(ckpt["model"], "criterion", None) is None


def test_detector_cli_trains_on_a_tiny_phantom_offline(tmp_path: Path) -> None:
    from training import cli
    from training.phantom import write_phantom_dataset

    torch.set_num_threads(1)
    data = tmp_path / "phantom"
    write_phantom_dataset(data, 12, 2, balanced=True, size=(192, 128), test_fraction=0.2)
    model = tiny_model_yaml(tmp_path / "tiny-det.yaml")
    out = tmp_path / "det"
    argv = ["detector", "--data", str(data), "--out", str(out), "--model", str(model)]
    argv += ["--imgsz", "96", "--epochs", "1", "--batch", "4", "--nbs", "4", "--folds", "3"]
    argv += ["--close-mosaic", "0", "--scale-range", "64,128", "--workers", "0"]
    argv += ["--balanced-sampling", "--copy-paste", "0.2", "--focal"]
    with pytest.raises(FileNotFoundError, match=r"pretrained/tiny-det\.pt"):  # no random start
        cli.main([*argv, "--pretrained-dir", str(tmp_path / "pretrained")])
    image = next((out / "dataset" / "images" / "train").glob("*.png"))
    exported = image.stat().st_mtime_ns
    assert cli.main([*argv, "--from-scratch"]) == 0
    assert image.stat().st_mtime_ns == exported  # the export was reused, not redone
    assert any((tmp_path / "prepared-cache").glob("*_detect.png"))  # beside --out
    assert (out / "detector.pt").is_file()
    labels = list((out / "dataset" / "labels" / "train").glob("*.txt"))
    assert labels and (out / "dataset" / "labels" / "val").is_dir()
    assert not (out / "dataset" / "images" / "test").exists()  # the test split is never touched

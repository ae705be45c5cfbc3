"""Detector training: the three extras (balanced sampling, rare-box copy-paste, focal loss) and
one offline training epoch."""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Iterator
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
    SoftClassLoss,
    SoftTargetDetectionLoss,
    class_image_counts,
    image_sampling_weights,
    quality_focal_loss,
    rare_classes,
    varifocal_loss,
    worker_random,
)
from training.train_detector import DetectorConfig, tiny_model_yaml, train_detector

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop


@pytest.fixture(autouse=True, scope="module")
def _sigchld_as_before() -> Iterator[None]:
    """Put back the SIGCHLD handler that torch's DataLoader replaces with its first worker.

    torch installs a process-wide Python SIGCHLD handler (to notice dead loader workers) and
    never removes it. Left in the one long pytest process, it runs on every later child's
    exit; after the model tests here, a later test's subprocess exit then killed pytest with a
    kernel SIGSEGV while the handler was being entered. Loader workers started later in this
    process simply go without it.
    """
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if before is not None:
        signal.signal(signal.SIGCHLD, before)

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


# --------------------------------------------------------------------------- soft-target losses


def test_varifocal_and_quality_focal_match_the_papers_formulas() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.2])
    targets = torch.tensor([0.9, 0.0, 0.3, 0.0])  # soft IoU targets, two negatives
    vfl = varifocal_loss(logits, targets, gamma=2.0, alpha=0.75)
    qfl = quality_focal_loss(logits, targets, beta=2.0)
    want_v, want_q = [], []
    for x, q in zip(logits.tolist(), targets.tolist(), strict=True):
        p = 1 / (1 + math.exp(-x))
        ce = -(q * math.log(p) + (1 - q) * math.log(1 - p))
        want_v.append(q * ce if q > 0 else -0.75 * p**2 * math.log(1 - p))  # VFL eq. 2
        want_q.append(abs(q - p) ** 2 * ce)  # QFL eq. 5
    assert torch.allclose(vfl, torch.tensor(want_v), atol=1e-6)
    assert torch.allclose(qfl, torch.tensor(want_q), atol=1e-6)
    # QFL is zero where the prediction equals the soft target; BCE is not
    x = torch.logit(torch.tensor([0.3]))
    assert float(quality_focal_loss(x, torch.tensor([0.3]))) == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(
        quality_focal_loss(logits, targets, beta=0.0),
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none"),
    )
    with pytest.raises(ValueError, match="same shape"):
        varifocal_loss(logits, targets[:2])
    with pytest.raises(ValueError, match="class_loss"):
        DetectorExtras(class_loss="focal")


@pytest.mark.parametrize("kind", ["varifocal", "quality_focal"])
def test_soft_target_detection_loss_replaces_only_the_class_term(tmp_path: Path, kind: str) -> None:
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
    soft = SoftTargetDetectionLoss(model, kind=kind)
    assert isinstance(soft.bce, SoftClassLoss) and soft.bce.kind == kind
    _, got = soft(preds, batch)
    assert got["box_loss"] == pytest.approx(float(stock["box_loss"]))
    assert got["dfl_loss"] == pytest.approx(float(stock["dfl_loss"]))
    assert float(got["cls_loss"]) < float(stock["cls_loss"])  # the many easy negatives weigh less


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
    # images per class (not boxes): class 0 -> 3, class 5 -> 1, class 2 -> 1; 2 without boxes
    assert class_image_counts(classes, 7).tolist() == [3, 0, 1, 0, 0, 1, 0]
    r3 = 1 / math.sqrt(3)
    raw = np.array([r3, 1.0, r3, 1 / math.sqrt(2), 1 / math.sqrt(2), 1.0])
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
        extras=DetectorExtras(balanced_sampling=True, copy_paste=0.5, class_loss="varifocal"),
    )
    result = train_detector(config, data_yaml, tmp_path / "out", from_scratch=True)
    assert result.best.is_file() and result.last.is_file()
    assert "metrics/mAP50(B)" in result.metrics
    # sampler weights of the training images: 1/sqrt(images showing the rarest class present);
    # common class in 8 images, rare class in 2 (images 0 and 8), 2 images without boxes (4, 9)
    assert result.sampling_weights is not None
    raw = np.array([1 / math.sqrt(2) if i in (0, 8, 4, 9) else 1 / math.sqrt(8) for i in range(10)])
    assert np.allclose(np.array(result.sampling_weights), raw / raw.mean())
    assert result.extras_used["criterion"] == "SoftTargetDetectionLoss"
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
    argv += ["--balanced-sampling", "--copy-paste", "0.2", "--class-loss", "quality_focal"]
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


class _Draws(torch.utils.data.Dataset[float]):
    def __init__(self) -> None:
        self.streams: dict[tuple[int, int], random.Random] = {}

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> float:
        return worker_random(11, self.streams).random()


def test_copy_paste_stream_is_one_per_loader_worker() -> None:
    def draws() -> list[float]:
        loader = torch.utils.data.DataLoader(
            _Draws(), batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0)
        )
        return [float(x) for x in loader]

    first = draws()
    # batches alternate between the two workers: worker 0 got items 0, 2, 4, 6, worker 1 the rest
    assert first[0::2] != first[1::2]  # not one stream copied into both workers
    assert draws() == first  # reproducible from the loader's seed
    here = _Draws()
    assert here[0] == random.Random(int(np.random.SeedSequence([11]).generate_state(1)[0])).random()

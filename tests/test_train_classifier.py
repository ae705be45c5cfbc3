"""Triage member training: one epoch on a tiny phantom, resumable checkpoints, OOF predictions."""

from __future__ import annotations

import csv
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spine_node.imaging import PrepParams
from training import vindr
from training.phantom import write_phantom_dataset
from training.train_classifier import (
    AugmentedDataset,
    AugmentParams,
    ClassifierConfig,
    augment_batch,
    augment_batch_device,
    fold_datasets,
    require_pretrained,
    train_fold,
)

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

TINY = {"growth_rate": 8, "block_config": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, 16, 5, balanced=True, size=(192, 128), test_fraction=0.2)
    return root


def _config(epochs: int) -> ClassifierConfig:
    return ClassifierConfig(
        arch="densenet121",
        name="densenet",
        kwargs=TINY,
        input_size=64,
        epochs=epochs,
        batch_size=4,
        seed=3,
    )


def test_augment_batch_is_seeded_and_in_range() -> None:
    x = torch.rand(3, 1, 32, 32)
    a = augment_batch(x, AugmentParams(blur_p=1.0), torch.Generator().manual_seed(1))
    b = augment_batch(x, AugmentParams(blur_p=1.0), torch.Generator().manual_seed(1))
    c = augment_batch(x, AugmentParams(blur_p=1.0), torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    with pytest.raises(ValueError, match="N, 1, H, W"):
        augment_batch(torch.rand(2, 3, 8, 8), AugmentParams(), torch.Generator())


def test_one_epoch_then_resume_continues_at_epoch_two(phantom: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train_set, val_set = fold_datasets(
        phantom, fold=0, folds=3, input_size=64, seed=0, cache_dir=tmp_path / "cache"
    )
    assert isinstance(train_set, vindr.TriageDataset) and isinstance(val_set, vindr.TriageDataset)
    train_ids = {r.image_id for r in train_set.records}
    val_ids = {r.image_id for r in val_set.records}
    assert train_ids.isdisjoint(val_ids)
    # study-level: no study on both sides
    assert {r.study_id for r in train_set.records}.isdisjoint({r.study_id for r in val_set.records})

    out = tmp_path / "fold0"
    first = train_fold(_config(1), train_set, val_set, out, fold=0, from_scratch=True)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "rng", "best_auroc", "bad_epochs"} <= set(ckpt)
    assert first.best_weights.is_file() and first.epochs_run == 1
    with first.oof_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["image_id"] for r in rows} == val_ids
    assert all(0.0 <= float(r["score"]) <= 1.0 and r["fold"] == "0" for r in rows)

    resumed = train_fold(_config(2), train_set, val_set, out, fold=0, resume=True)
    ckpt2 = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt2["epoch"] == 2 and [h["epoch"] for h in ckpt2["history"]] == [1, 2]
    assert resumed.epochs_run == 2

    # resuming gives the same weights as two epochs in one go (model, optimiser and RNG restored)
    straight = tmp_path / "straight"
    train_fold(_config(2), train_set, val_set, straight, fold=0, from_scratch=True)
    a = torch.load(out / "last.pt", weights_only=False)["model"]
    b = torch.load(straight / "last.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)

    with pytest.raises(ValueError, match="different settings"):
        other = ClassifierConfig(
            arch="densenet121",
            name="densenet",
            kwargs=TINY,
            input_size=64,
            epochs=3,
            batch_size=4,
            seed=3,
            lr=1e-3,
        )
        train_fold(other, train_set, val_set, out, fold=0, resume=True)


def test_prepared_arrays_come_from_the_shared_preparation(phantom: Path, tmp_path: Path) -> None:
    from spine_node.imaging import prepare, read_dataset

    train_set, _ = fold_datasets(
        phantom, fold=0, folds=3, input_size=64, seed=0, cache_dir=tmp_path / "c"
    )
    assert isinstance(train_set, vindr.TriageDataset)
    record = train_set.records[0]
    expected = prepare(read_dataset(record.path), PrepParams(triage_size=64)).triage
    image, label = train_set[0]
    assert torch.allclose(image[0], torch.from_numpy(expected))
    assert float(label) == record.label


def test_random_weights_are_refused_unless_asked_for(
    phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./pretrained folder here
    train_set, val_set = fold_datasets(phantom, fold=0, folds=3, input_size=64, seed=0)
    with pytest.raises(FileNotFoundError, match=r"pretrained/densenet121\.ra_in1k\.safetensors"):
        train_fold(_config(1), train_set, val_set, tmp_path / "f", fold=0)
    assert not (tmp_path / "f" / "last.pt").exists()
    for arch, name in (
        ("tf_efficientnetv2_s", "tf_efficientnetv2_s.in21k_ft_in1k.safetensors"),
        ("resnet50", "resnet50.a1_in1k.safetensors"),
    ):
        with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
            require_pretrained(arch, None, pretrained_dir=tmp_path / "w")
        assert require_pretrained(arch, None, pretrained_dir=tmp_path / "w", from_scratch=True) is None
    (tmp_path / "w").mkdir()
    local = tmp_path / "w" / "resnet50.a1_in1k.safetensors"
    local.write_bytes(b"")
    assert require_pretrained("resnet50", None, pretrained_dir=tmp_path / "w") == local
    with pytest.raises(FileNotFoundError, match="does not exist"):
        require_pretrained("resnet50", tmp_path / "nope.pt")


def test_augmentation_in_workers_does_not_depend_on_worker_count() -> None:
    base = [(torch.rand(1, 24, 24), float(i % 2), f"i{i}") for i in range(6)]
    data = AugmentedDataset(base, AugmentParams(blur_p=1.0), seed=7)
    data.set_epoch(3)

    def batches(workers: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=workers)
        return torch.cat([x for x, _, _ in loader])

    serial = batches(0)
    assert torch.equal(serial, batches(2))
    assert not torch.equal(serial, torch.cat([b[0] for b in base]))  # augmented
    data.set_epoch(4)
    assert not torch.equal(serial, batches(0))  # a new draw each epoch


def test_batched_device_augmentation_matches_the_per_image_transforms() -> None:
    from torchvision.transforms.v2 import functional as tvf

    x = torch.rand(4, 1, 32, 32)
    off = {"hflip": 0.0, "rotation_deg": 0.0, "brightness": 0.0, "contrast": 0.0, "blur_p": 0.0}
    g = torch.Generator
    assert torch.allclose(augment_batch_device(x, AugmentParams(**off), g()), x, atol=1e-6)
    flip = AugmentParams(**{**off, "hflip": 1.0})
    assert torch.allclose(augment_batch_device(x, flip, g()), x.flip(-1), atol=1e-6)
    blur = AugmentParams(**{**off, "blur_p": 1.0, "blur_sigma": (1.0, 1.0)})
    expected = tvf.gaussian_blur(x, [7, 7], [1.0, 1.0])
    assert torch.allclose(augment_batch_device(x, blur, g()), expected, atol=1e-5)
    a = augment_batch_device(x, AugmentParams(), g().manual_seed(1))
    assert torch.equal(a, augment_batch_device(x, AugmentParams(), g().manual_seed(1)))
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, x)

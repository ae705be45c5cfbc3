"""training.vindr: records, study-level folds, cached triage dataset, YOLO export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from spine_node.imaging import PrepParams, prepare, read_dataset
from spine_node.results.types import LESION_LABELS
from training import phantom as ph
from training import vindr

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

SMALL = PrepParams(triage_size=64, detect_size=96)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ph.PhantomSummary]:
    root = tmp_path_factory.mktemp("vindr")
    summary = ph.write_phantom_dataset(root, 8, seed=5, balanced=True, size=(256, 176))
    return root, summary


def test_load_records_matches_phantom(data: tuple[Path, ph.PhantomSummary]) -> None:
    root, summary = data
    records = vindr.load_records(root, "train") + vindr.load_records(root, "test")
    assert len(records) == len(summary.images)
    truth = {e.image_id: e for e in summary.images}
    for r in records:
        e = truth[r.image_id]
        assert r.study_id == e.study_id and r.series_id == e.series_id and r.split == e.split
        assert r.path == root / f"{r.split}_images" / f"{r.image_id}.dicom"
        assert r.path.is_file()
        assert r.abnormal == bool(e.boxes)
        assert [(b.label, b.xmin, b.ymax) for b in r.boxes] == [
            (b.label, pytest.approx(b.xmin, abs=0.01), pytest.approx(b.ymax, abs=0.01))
            for b in e.boxes
        ]
        assert all(b.rad_id.startswith("rad") for b in r.boxes)


def test_bad_annotations_are_refused(tmp_path: Path) -> None:
    header = "study_id,series_id,image_id,rad_id,lesion_type,xmin,ymin,xmax,ymax\n"
    bad = tmp_path / "a.csv"
    bad.write_text(header + "s,r,i,rad1,Fracture,1,2,3,4\n")
    with pytest.raises(ValueError, match="unknown lesion_type"):
        vindr.read_annotations(bad, "train")
    bad.write_text(header + "s,r,i,rad1,Osteophytes,1,2,x,4\n")
    with pytest.raises(ValueError, match="number"):
        vindr.read_annotations(bad, "train")
    bad.write_text("image_id,lesion_type\ni,No finding\n")
    with pytest.raises(ValueError, match="lacks"):
        vindr.read_annotations(bad, "train")
    with pytest.raises(ValueError, match="split"):
        vindr.read_annotations(bad, "val")
    with pytest.raises(ValueError, match="xmax"):
        vindr.Box("Osteophytes", 5, 0, 1, 1)
    # Several radiologists' rows of one image: one record, all boxes, abnormal.
    ok = tmp_path / "b.csv"
    ok.write_text(
        header
        + "s,r,i,rad1,Osteophytes,1,2,3,4\ns,r,i,rad2,Osteophytes,1,2,3,5\n"
        + "s,r,j,rad1,No finding,,,,\n"
    )
    recs = vindr.read_annotations(ok, "train")
    assert [(r.image_id, r.abnormal, len(r.boxes)) for r in recs] == [
        ("i", True, 2),
        ("j", False, 0),
    ]


def _records(n_studies: int, seed: int) -> list[vindr.ImageRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_studies):
        abnormal = bool(rng.random() < 0.4)
        for v in range(int(rng.integers(1, 4))):
            out.append(
                vindr.ImageRecord(
                    image_id=f"s{s}v{v}",
                    study_id=f"s{s}",
                    split="train",
                    path=Path(f"/x/s{s}v{v}.dicom"),
                    abnormal=abnormal and (v == 0 or rng.random() < 0.7),
                )
            )
    return out


def test_study_stratified_kfold() -> None:
    records = _records(200, 1)
    folds = vindr.study_stratified_kfold(records, k=5, seed=3)
    assert len(folds) == 5
    study = {r.image_id: r.study_id for r in records}
    abnormal_study = {r.study_id for r in records if r.abnormal}
    all_val: list[str] = []
    for train_ids, val_ids in folds:
        assert not set(train_ids) & set(val_ids)
        assert set(train_ids) | set(val_ids) == set(study)
        # No study is split between train and validation.
        assert not {study[i] for i in train_ids} & {study[i] for i in val_ids}
        val_studies = {study[i] for i in val_ids}
        share = len(val_studies & abnormal_study) / len(val_studies)
        overall = len(abnormal_study) / 200
        assert abs(share - overall) < 0.06  # stratified by study abnormality
        all_val += val_ids
    assert sorted(all_val) == sorted(study)  # each image validated exactly once
    assert vindr.study_stratified_kfold(records, k=5, seed=3) == folds
    assert vindr.study_stratified_kfold(records, k=5, seed=4) != folds
    with pytest.raises(ValueError, match="k="):
        vindr.study_stratified_kfold(records[:3], k=5)


def test_triage_dataset_uses_prepare_and_caches(
    data: tuple[Path, ph.PhantomSummary], tmp_path: Path
) -> None:
    import shutil

    import torch

    root, _ = data
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    records = vindr.load_records(copy, "train")
    cache = tmp_path / "cache"
    ds = vindr.TriageDataset(records, SMALL, cache_dir=cache)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == len(records)
    image, label = ds[0]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert float(label) == float(records[0].abnormal)
    expected = prepare(read_dataset(records[0].path), SMALL).triage
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
    assert ds.warm_cache() == len(records) - 1
    assert len(list(cache.glob("*.npy"))) == len(records)
    # The cache serves the images once the DICOM files are gone ...
    for r in records:
        os.remove(r.path)
    again, _ = ds[0]
    np.testing.assert_array_equal(again.numpy(), image.numpy())
    # ... but other preparation parameters are a different key.
    other = vindr.TriageDataset(records, PrepParams(triage_size=32, detect_size=96), cache)
    with pytest.raises(OSError):
        other[0]
    flipped = vindr.TriageDataset(records, SMALL, cache, transform=lambda a: a[:, ::-1])
    np.testing.assert_array_equal(flipped[0][0].numpy(), image.numpy()[:, :, ::-1])
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    batch, labels = next(iter(loader))
    assert batch.shape == (3, 1, 64, 64) and labels.shape == (3,)


@pytest.mark.parametrize("kind", ["detect", "enhanced"])
def test_export_yolo(data: tuple[Path, ph.PhantomSummary], tmp_path: Path, kind: str) -> None:
    root, _ = data
    train = vindr.load_records(root, "train")
    test = vindr.load_records(root, "test")
    out = vindr.export_yolo(
        {"train": train, "val": test}, tmp_path / "yolo", params=SMALL, image_kind=kind
    )
    meta = yaml.safe_load(out.data_yaml.read_text())
    assert meta["names"] == dict(enumerate(LESION_LABELS))
    assert meta["train"] == "images/train" and meta["val"] == "images/val"
    assert out.counts == {"train": len(train), "val": len(test)}
    import cv2

    for r in train:
        img = cv2.imread(str(tmp_path / "yolo" / "images" / "train" / f"{r.image_id}.png"), 0)
        assert img is not None
        if kind == "detect":
            assert img.shape == (96, 96)
        else:
            assert img.shape == (256, 176)
        lines = (tmp_path / "yolo" / "labels" / "train" / f"{r.image_id}.txt").read_text()
        rows = [list(map(float, line.split())) for line in lines.splitlines()]
        assert len(rows) == len(r.boxes)
        prep = prepare(read_dataset(r.path), SMALL)
        for (cls, cx, cy, w, h), box in zip(rows, r.boxes, strict=True):
            assert LESION_LABELS[int(cls)] == box.label
            assert min(cx - w / 2, cy - h / 2) >= 0 and max(cx + w / 2, cy + h / 2) <= 1
            size = np.array([img.shape[1], img.shape[0]] * 2)
            xyxy = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]) * size
            back = prep.letterbox.to_source(xyxy)[0] if kind == "detect" else xyxy[0]
            np.testing.assert_allclose(back, box.xyxy, atol=0.05)


def test_yolo_yaml_is_accepted_by_ultralytics(
    data: tuple[Path, ph.PhantomSummary], tmp_path: Path
) -> None:
    from spine_node.offline import configure_offline

    configure_offline()
    from ultralytics.data.utils import check_det_dataset

    root, _ = data
    recs = vindr.load_records(root, "train")
    out = vindr.export_yolo({"train": recs, "val": recs}, tmp_path / "y", params=SMALL)
    info = check_det_dataset(str(out.data_yaml), autodownload=False)
    assert info["nc"] == 7 and list(info["names"].values()) == list(LESION_LABELS)


def test_to_ultralytics_fold(data: tuple[Path, ph.PhantomSummary], tmp_path: Path) -> None:
    root, _ = data
    data_yaml = vindr.to_ultralytics(root, tmp_path / "f", fold=1, folds=2, imgsz=96, seed=0)
    meta = yaml.safe_load(data_yaml.read_text())
    train = {p.stem for p in (tmp_path / "f" / "images" / "train").glob("*.png")}
    val = {p.stem for p in (tmp_path / "f" / "images" / "val").glob("*.png")}
    test = {p.stem for p in (tmp_path / "f" / "images" / "test").glob("*.png")}
    assert meta["test"] == "images/test"
    assert train and val and not train & val
    assert train | val == {r.image_id for r in vindr.load_records(root, "train")}
    assert test == {r.image_id for r in vindr.load_records(root, "test")}
    with pytest.raises(ValueError, match="fold"):
        vindr.to_ultralytics(root, tmp_path / "g", fold=2, folds=2)


def test_read_only_root_cache_beside_and_export_reused(
    data: tuple[Path, ph.PhantomSummary], tmp_path: Path
) -> None:
    import dataclasses
    import shutil

    root = tmp_path / "ro"
    shutil.copytree(data[0], root)
    before = {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        records = vindr.load_records(root, "train")
        cache = tmp_path / "cache"
        assert vindr.warm_cache(records, SMALL, cache, workers=2) == len(records)  # in parallel
        assert vindr.warm_cache(records, SMALL, cache, workers=2) == 0
        ds = vindr.TriageDataset(records, SMALL, cache)
        expected = prepare(read_dataset(records[0].path), SMALL).triage
        np.testing.assert_allclose(ds[0][0][0].numpy(), expected, atol=1e-6)
        out = vindr.export_yolo({"train": records}, tmp_path / "y", params=SMALL, cache_dir=cache)
        k = next(i for i, r in enumerate(records) if r.boxes)
        label = tmp_path / "y" / "labels" / "train" / f"{records[k].image_id}.txt"
        stamp = label.stat().st_mtime_ns
        again = vindr.export_yolo({"train": records}, tmp_path / "y", params=SMALL, cache_dir=cache)
        assert again == out and label.stat().st_mtime_ns == stamp  # reused as it was
        moved = [dataclasses.replace(r, boxes=()) if i == k else r for i, r in enumerate(records)]
        redo = vindr.export_yolo({"train": moved}, tmp_path / "y", params=SMALL, cache_dir=cache)
        assert label.read_text() == "" and redo.boxes["train"] < out.boxes["train"]
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} == before
    # the key holds the preparation code's version
    assert vindr.params_key(SMALL, "v1-a") != vindr.params_key(SMALL, "v1-b")
    assert vindr.params_key(SMALL) == vindr.params_key(SMALL, vindr.prep_code_version())

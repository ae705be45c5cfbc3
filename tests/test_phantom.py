"""training.phantom: VinDr-exact layout, DICOM quirks, determinism, lesions and boxes."""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from spine_node.imaging import decode, read_dataset
from spine_node.results.types import LESION_LABELS
from training import phantom as ph

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

HEX32 = re.compile(r"^[0-9a-f]{32}$")
SIZE = (256, 176)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ph.PhantomSummary]:
    root = tmp_path_factory.mktemp("phantom")
    summary = ph.write_phantom_dataset(
        root, 8, seed=3, balanced=True, size=SIZE, monochrome1_fraction=0.5
    )
    return root, summary


def test_layout_and_csv(dataset: tuple[Path, ph.PhantomSummary]) -> None:
    root, summary = dataset
    assert len(summary.images) == 8
    seen = set()
    for split in ("train", "test"):
        with open(root / "annotations" / f"{split}.csv", newline="") as fh:
            reader = csv.reader(fh)
            assert next(reader) == list(ph.CSV_COLUMNS)
            rows = list(reader)
        assert rows, f"{split}.csv is empty"
        by_image: dict[str, list[list[str]]] = {}
        for row in rows:
            by_image.setdefault(row[2], []).append(row)
        for image_id, image_rows in by_image.items():
            assert HEX32.match(image_id)
            assert HEX32.match(image_rows[0][0]) and HEX32.match(image_rows[0][1])
            assert (root / f"{split}_images" / f"{image_id}.dicom").is_file()
            labels = [r[4] for r in image_rows]
            if ph.NO_FINDING in labels:
                assert len(image_rows) == 1  # one No finding row for a normal image
                assert image_rows[0][5:] == ["", "", "", ""]
            else:
                for r in image_rows:
                    assert r[4] in LESION_LABELS
                    x0, y0, x1, y1 = (float(v) for v in r[5:])
                    assert 0 <= x0 < x1 <= SIZE[1] and 0 <= y0 < y1 <= SIZE[0]
        seen |= set(by_image)
    assert seen == {e.image_id for e in summary.images}
    studies_by_split: dict[str, set[str]] = {"train": set(), "test": set()}
    for e in summary.images:
        studies_by_split[e.split].add(e.study_id)
    assert not studies_by_split["train"] & studies_by_split["test"]  # a study has one split
    assert 0 < summary.n_abnormal < len(summary.images)


def test_dicom_quirks_match_vindr(dataset: tuple[Path, ph.PhantomSummary]) -> None:
    root, summary = dataset
    photometrics = set()
    for entry in summary.images:
        path = root / f"{entry.split}_images" / f"{entry.image_id}.dicom"
        ds = pydicom.dcmread(path, force=True)
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.HighBit == 11
        assert ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
        assert (ds.Rows, ds.Columns) == SIZE
        assert "Modality" not in ds and "SOPClassUID" not in ds
        assert "MediaStorageSOPClassUID" not in ds.file_meta
        assert ds.SOPInstanceUID == entry.image_id
        assert ds.StudyInstanceUID == entry.study_id
        assert ds.SeriesInstanceUID == entry.series_id
        assert all(HEX32.match(str(u)) for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID))
        assert "WindowCenter" in ds and "WindowWidth" in ds
        assert ds.PhotometricInterpretation == entry.photometric
        photometrics.add(entry.photometric)
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and int(arr.max()) <= 4095
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}


def test_monochrome1_is_inverted_correctly(tmp_path: Path) -> None:
    pixels, _ = ph.render_phantom_image(np.random.default_rng(1), ph.PhantomSpec(*SIZE, "ap"))
    m2 = ph.phantom_dataset(pixels, study_id="a" * 32, series_id="b" * 32, image_id="c" * 32)
    m1 = ph.phantom_dataset(
        pixels, study_id="a" * 32, series_id="b" * 32, image_id="c" * 32, monochrome1=True
    )
    ph.write_dicom(m2, tmp_path / "m2.dicom")
    ph.write_dicom(m1, tmp_path / "m1.dicom")
    raw1 = pydicom.dcmread(tmp_path / "m1.dicom").pixel_array.astype(np.int32)
    np.testing.assert_array_equal(raw1, 4095 - pixels.astype(np.int32))  # lossless, inverted
    a = decode(read_dataset(tmp_path / "m2.dicom")).pixels
    b = decode(read_dataset(tmp_path / "m1.dicom")).pixels
    # After the node's own decoding both show bone bright and (nearly) the same picture.
    assert np.abs(a - b).mean() < 0.01
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_same_seed_same_bytes(tmp_path: Path, dataset: tuple[Path, ph.PhantomSummary]) -> None:
    root, _ = dataset
    again = tmp_path / "again"
    ph.write_phantom_dataset(
        again, 8, seed=3, balanced=True, size=SIZE, monochrome1_fraction=0.5, workers=2
    )
    assert _digest(again) == _digest(root)  # same bytes, whatever the number of workers
    other = tmp_path / "other"
    ph.write_phantom_dataset(other, 8, seed=4, balanced=True, size=SIZE, monochrome1_fraction=0.5)
    assert _digest(other) != _digest(root)


def test_meta_records_slip_and_grade(dataset: tuple[Path, ph.PhantomSummary]) -> None:
    root, summary = dataset
    with open(root / "annotations" / "phantom_meta.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    slips = [
        (e.image_id, b) for e in summary.images for b in e.boxes if b.label == "Spondylolysthesis"
    ]
    assert len(rows) == len(slips)
    for row, (image_id, box) in zip(rows, slips, strict=True):
        assert row["image_id"] == image_id
        assert row["grade"] == ph.meyerding_grade(float(row["slip_fraction"]))
        assert float(row["xmin"]) == pytest.approx(box.xmin, abs=0.01)


@pytest.mark.parametrize(
    ("fraction", "grade"),
    [(0.0, "I"), (0.249, "I"), (0.25, "II"), (0.5, "III"), (0.74, "III"), (0.75, "IV"), (1.2, "V")],
)
def test_meyerding_grade(fraction: float, grade: str) -> None:
    assert ph.meyerding_grade(fraction) == grade


def test_meyerding_grade_rejects_negative() -> None:
    with pytest.raises(ValueError, match="slip_fraction"):
        ph.meyerding_grade(-0.1)


def test_render_is_deterministic_and_boxes_every_lesion() -> None:
    spec = ph.PhantomSpec(384, 256, "lateral", tuple(LESION_LABELS))
    a, boxes_a = ph.render_phantom_image(np.random.default_rng(9), spec)
    b, boxes_b = ph.render_phantom_image(np.random.default_rng(9), spec)
    np.testing.assert_array_equal(a, b)
    assert boxes_a == boxes_b
    c, _ = ph.render_phantom_image(np.random.default_rng(10), spec)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint16 and a.shape == (384, 256) and int(a.max()) <= 4095
    assert sorted({bx.label for bx in boxes_a}) == sorted(LESION_LABELS)
    for bx in boxes_a:
        assert 0 <= bx.xmin < bx.xmax <= 256 and 0 <= bx.ymin < bx.ymax <= 384
        assert (bx.slip_fraction is not None) == (bx.label == "Spondylolysthesis")
    _normal, none = ph.render_phantom_image(np.random.default_rng(9), ph.PhantomSpec(384, 256))
    assert none == []


def test_lesions_are_visible() -> None:
    """Implants saturate; lytic/sclerotic lesions and spurs change their box's contents."""
    rng = np.random.default_rng(2)
    img, boxes = ph.render_phantom_image(rng, ph.PhantomSpec(384, 256, "ap", ("Surgical implant",)))
    (box,) = boxes
    crop = img[int(box.ymin) : int(box.ymax), int(box.xmin) : int(box.xmax)]
    assert np.percentile(crop, 99) > np.percentile(img, 99.9) * 0.95
    assert np.percentile(crop, 99) > 0.85 * 4095 * 0.85
    # A narrowed disc is boxed tightly around the thin disc and both endplates.
    _img2, boxes2 = ph.render_phantom_image(
        np.random.default_rng(4), ph.PhantomSpec(768, 512, "lateral", ("Disc space narrowing",))
    )
    (dsn,) = boxes2
    assert dsn.ymax - dsn.ymin < 0.12 * 768


def test_sample_lesions_follows_frequencies() -> None:
    rng = np.random.default_rng(0)
    draws = [ph.sample_lesions(rng) for _ in range(3000)]
    assert all(draws)
    freq = {label: np.mean([label in d for d in draws]) for label in LESION_LABELS}
    for label, expected in ph.VINDR_CLASS_FREQUENCIES.items():
        assert abs(freq[label] - expected) < 0.035, (label, freq[label], expected)
    balanced = [ph.sample_lesions(rng, dict.fromkeys(LESION_LABELS, 0.5)) for _ in range(500)]
    assert min(np.mean([lb in d for d in balanced]) for lb in LESION_LABELS) > 0.4


def test_non_spine_images() -> None:
    for kind in ph.NON_SPINE_KINDS:
        img = ph.render_non_spine_image(np.random.default_rng(0), kind, 256, 256)
        assert img.dtype == np.uint16 and img.shape == (256, 256)
        assert 0 < int(img.max()) <= 4095 and img.std() > 100
    with pytest.raises(ValueError, match="kind"):
        ph.render_non_spine_image(np.random.default_rng(0), "knee")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="view"):
        ph.PhantomSpec(view="oblique")
    with pytest.raises(ValueError, match="lesion"):
        ph.PhantomSpec(lesions=("Fracture",))
    with pytest.raises(ValueError, match="size"):
        ph.PhantomSpec(rows=64)
    with pytest.raises(TypeError, match="rows"):
        ph.PhantomSpec(rows=256.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_images"):
        ph.write_phantom_dataset("/nonexistent", 1, 0)


def test_cli_pieces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    ph.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "d"),
            "--images",
            "3",
            "--seed",
            "1",
            "--size",
            "160x128",
            "--balanced",
        ]
    )
    assert args.size == (160, 128)
    assert ph.run(args) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("*_images/*.dicom"))) == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--size", "big"])

"""training.robustness: corruptions and the metric-delta runner."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from spine_node.imaging import PreparedImage, PrepParams, decode
from spine_node.results.types import Finding
from training import phantom as ph
from training import robustness as rb
from training import vindr

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
pytest_plugins = ("tests.fixtures_models",)

SMALL = PrepParams(triage_size=64, detect_size=96)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    pixels, _ = ph.render_phantom_image(np.random.default_rng(0), ph.PhantomSpec(256, 176, "ap"))
    return (pixels.astype(np.float32) / 4095.0).clip(0, 1)


@pytest.mark.parametrize("name", list(rb.CORRUPTIONS))
def test_each_corruption(image: np.ndarray, name: str) -> None:
    errors = []
    for severity in rb.SEVERITIES:
        c = rb.Corruption(name, severity)
        out = c.apply(image, seed=1)
        assert out.shape == image.shape and out.dtype == np.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not np.allclose(out, image, atol=1e-3), "the corruption must change the image"
        np.testing.assert_array_equal(out, c.apply(image, seed=1))  # deterministic
        errors.append(float(np.mean(np.abs(out - image))))
    # Harsher severity, larger departure from the clean image.
    assert all(b > a for a, b in itertools.pairwise(errors)), errors


def test_noise_depends_on_seed(image: np.ndarray) -> None:
    a = rb.gaussian_noise(image, 3, seed=1)
    b = rb.gaussian_noise(image, 3, seed=2)
    assert not np.array_equal(a, b)
    for name in ("gaussian_blur", "contrast", "exposure", "jpeg"):  # seed-free ones
        np.testing.assert_array_equal(
            rb.Corruption(name, 2).apply(image, 1), rb.Corruption(name, 2).apply(image, 2)
        )


def test_corruption_validation(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="corruption"):
        rb.Corruption("fog", 1)
    with pytest.raises(ValueError, match="severity"):
        rb.Corruption("contrast", 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rb.contrast(image * 2, 1)
    with pytest.raises(TypeError, match="2-D"):
        rb.jpeg(np.zeros((2, 2, 2), np.float32), 1)
    assert len(rb.corruption_grid()) == 25
    assert [c.key for c in rb.corruption_grid(["jpeg"], [1, 5])] == ["jpeg@1", "jpeg@5"]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[vindr.ImageRecord]:
    root = tmp_path_factory.mktemp("rob")
    ph.write_phantom_dataset(root, 8, seed=2, balanced=True, size=(256, 176), test_fraction=0.5)
    recs = vindr.load_records(root, "train") + vindr.load_records(root, "test")
    assert any(r.abnormal for r in recs) and not all(r.abnormal for r in recs)
    return recs


def _noise_level(prepared: PreparedImage) -> float:
    lap = cv2.Laplacian(prepared.source.pixels.astype(np.float32), cv2.CV_32F)
    return float(np.median(np.abs(lap)))


class OracleThatHatesNoise:
    """Knows the truth (records in call order) but goes blind on noisy images."""

    def __init__(self, records: Sequence[vindr.ImageRecord], cutoff: float) -> None:
        self.records = list(records)
        self.cutoff = cutoff
        self.calls = 0

    def __call__(self, batch: Sequence[PreparedImage]) -> list[rb.ImagePrediction]:
        out = []
        for prepared in batch:
            record = self.records[self.calls % len(self.records)]
            self.calls += 1
            if _noise_level(prepared) > self.cutoff:
                out.append(rb.ImagePrediction(score=0.1))
                continue
            findings = tuple(Finding(b.label, 0.9, b.xyxy) for b in record.boxes)
            out.append(rb.ImagePrediction(0.9 if record.abnormal else 0.1, findings))
        return out


def test_run_robustness_reports_deltas(records: list[vindr.ImageRecord]) -> None:
    sources = {r.image_id: rb.load_source_pixels(r) for r in records}
    clean = max(_noise_level_of(a) for a in sources.values())
    noisy = min(_noise_level_of(rb.gaussian_noise(a, 5, 0)) for a in sources.values())
    assert noisy > clean
    oracle = OracleThatHatesNoise(records, (clean + noisy) / 2)
    grid = [rb.Corruption("gaussian_noise", 5), rb.Corruption("contrast", 1)]
    report = rb.run_robustness(
        oracle, records, grid, threshold=0.5, params=SMALL, batch_size=3, images=sources
    )
    assert report["n_images"] == len(records)
    assert report["clean"]["auroc"] == pytest.approx(1.0)
    assert report["clean"]["map50"] == pytest.approx(1.0)
    noise = report["corruptions"]["gaussian_noise@5"]
    assert noise["metrics"]["sensitivity"] == 0.0
    assert noise["delta"]["sensitivity"] == pytest.approx(-1.0)
    assert noise["delta"]["map50"] == pytest.approx(-1.0)
    mild = report["corruptions"]["contrast@1"]
    assert mild["delta"]["auroc"] == pytest.approx(0.0)  # contrast does not add noise
    for entry in report["corruptions"].values():
        for key, delta in entry["delta"].items():
            base, value = report["clean"][key], entry["metrics"][key]
            assert delta == pytest.approx(value - base)
    assert oracle.calls == 3 * len(records)
    json.dumps(report)  # JSON-ready


def _noise_level_of(pixels: np.ndarray) -> float:
    from spine_node.imaging import prepare_array

    return _noise_level(prepare_array(pixels, SMALL))


def test_run_robustness_checks_predictor(records: list[vindr.ImageRecord]) -> None:
    with pytest.raises(ValueError, match="returned"):
        rb.run_robustness(lambda batch: [], records[:2], [], threshold=0.5, params=SMALL)
    with pytest.raises(TypeError, match="ImagePrediction"):
        rb.run_robustness(lambda batch: [0.5] * len(batch), records[:2], [], threshold=0.5,  # type: ignore[list-item]
                          params=SMALL)


class CountingImages(dict[str, np.ndarray]):
    """Source images that count look-ups, to see how many are held when a batch is predicted."""

    looked_up = 0

    def __getitem__(self, key: str) -> np.ndarray:
        self.looked_up += 1
        return super().__getitem__(key)


def test_run_robustness_streams_batches(records: list[vindr.ImageRecord]) -> None:
    images = CountingImages({r.image_id: rb.load_source_pixels(r) for r in records})
    seen: list[tuple[int, int]] = []  # (images looked up so far, batch size) per call

    def predict(batch: Sequence[PreparedImage]) -> list[rb.ImagePrediction]:
        seen.append((images.looked_up, len(batch)))
        return [rb.ImagePrediction(0.5) for _ in batch]

    rb.run_robustness(predict, records, [rb.Corruption("contrast", 2)], threshold=0.5,
                      params=SMALL, batch_size=3, images=images)
    assert max(size for _, size in seen) == 3
    # when the k-th batch is predicted, only the images of batches <= k have been read:
    # each condition pulls its images batch by batch instead of stacking the split
    done = 0
    for looked_up, size in seen:
        done += size
        assert looked_up == done, seen
    assert images.looked_up == 2 * len(records)


def test_pixels_to_dataset_round_trip(image: np.ndarray) -> None:
    ds = rb.pixels_to_dataset(image, "1.2.3")
    back = decode(ds).pixels
    np.testing.assert_allclose(back, image, atol=2 / 65535)


def constant_factory(bundle: Path | None) -> rb.PredictFn:
    """A predictor factory for the CLI test (scores by mean brightness)."""

    def predict(batch: Sequence[PreparedImage]) -> list[rb.ImagePrediction]:
        return [rb.ImagePrediction(float(p.triage.mean())) for p in batch]

    return predict


def test_cli_pieces(records: list[vindr.ImageRecord], tmp_path: Path) -> None:
    root = records[0].path.parent.parent
    parser = argparse.ArgumentParser()
    rb.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "--data",
            str(root),
            "--split",
            "train",
            "--predictor",
            "tests.test_robustness:constant_factory",
            "--corruptions",
            "exposure,jpeg",
            "--severities",
            "1,5",
            "--json",
            str(out),
            "--threshold",
            "0.5",
        ]
    )
    assert rb.run(args) == 0
    report = json.loads(out.read_text())
    assert sorted(report["corruptions"]) == ["exposure@1", "exposure@5", "jpeg@1", "jpeg@5"]
    # Darker images, lower brightness score: the delta says so.
    assert report["corruptions"]["exposure@5"]["delta"]["mean_score"] < 0
    bad = parser.parse_args(["--data", str(root), "--corruptions", "fog"])
    assert rb.run(bad) == 2
    # no bundle and no --threshold: no default threshold to fall back on
    assert rb.run(parser.parse_args(["--data", str(root)])) == 2


def test_cli_uses_the_bundles_threshold(
    records: list[vindr.ImageRecord], tiny_bundle: Path, tmp_path: Path
) -> None:
    from spine_node.models.bundle import load_manifest

    root = records[0].path.parent.parent
    parser = argparse.ArgumentParser()
    rb.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["--data", str(root), "--split", "train", "--bundle", str(tiny_bundle), "--predictor",
         "tests.test_robustness:constant_factory", "--corruptions", "jpeg", "--severities", "1",
         "--limit", "2", "--json", str(out)]
    )
    assert rb.run(args) == 0
    assert json.loads(out.read_text())["threshold"] == load_manifest(tiny_bundle).threshold

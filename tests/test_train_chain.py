"""The whole spine-train chain by its commands: phantom -> classifiers -> ensemble ->
detector -> bundle, and the node loads and runs the bundle it built (tiny, 1 epoch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,  # minutes: `pytest -m "not slow"` is the inner loop
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

TRAIN = [sys.executable, "-m", "training.cli"]
NODE = [sys.executable, "-m", "spine_node.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_spine_train_chain_builds_a_bundle_the_node_runs(tmp_path: Path) -> None:
    _run(*TRAIN, "phantom", "--out", "data", "--images", "24", "--seed", "3", "--balanced",
         "--size", "320x256", cwd=tmp_path)
    data = tmp_path / "data"
    before = {str(p): p.stat().st_mtime_ns for p in data.rglob("*")}
    _chmod_tree(data, writable=False)  # the data root may be read-only (issue 11)
    try:
        _chain(tmp_path)
    finally:
        _chmod_tree(data, writable=True)
    # nothing written there (checked by content too: root ignores the missing write bits)
    assert {str(p): p.stat().st_mtime_ns for p in data.rglob("*")} == before
    assert any((tmp_path / "prepared-cache").glob("*_triage.npy"))  # beside the outputs


def _chain(tmp_path: Path) -> None:
    members = {
        "resnet": ("resnet50", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64],
                                "stem_width": 8}),
        "densenet": ("densenet121", {"growth_rate": 8, "block_config": [1, 1, 1, 1]}),
    }
    for name, (arch, kwargs) in members.items():
        _run(*TRAIN, "classifier", "--arch", arch, "--name", name, "--data", "data", "--out",
             f"m_{name}", "--fold", "0", "--folds", "3", "--epochs", "1", "--batch-size", "4",
             "--input-size", "64", "--model-kwargs", json.dumps(kwargs), "--from-scratch",
             "--workers", "2", cwd=tmp_path)
        assert (tmp_path / f"m_{name}" / "fold0" / "best.pt").is_file()
    # weights and threshold fitted the way the bundle serves: fold 0's models, 2 TTA views
    _run(*TRAIN, "ensemble", "--member", "m_resnet", "m_densenet", "--fold", "0", "--tta", "2",
         "--data", "data", "--out", "ens.json", cwd=tmp_path)
    fit = json.loads((tmp_path / "ens.json").read_text())
    assert abs(sum(fit["weights"]) - 1.0) < 1e-9 and 0.0 <= fit["threshold"] <= 1.0
    assert fit["fitted_on"]["kind"] == "served" and fit["fitted_on"]["tta_views"] == 2
    yaml = tmp_path / "tiny.yaml"
    from training.train_detector import tiny_model_yaml

    tiny_model_yaml(yaml, depth=0.33, width=0.125, max_channels=128)
    _run(*TRAIN, "detector", "--data", "data", "--out", "det", "--model", str(yaml), "--imgsz",
         "128", "--epochs", "1", "--batch", "4", "--workers", "0", "--from-scratch", cwd=tmp_path)
    refused = subprocess.run(
        [*TRAIN, "bundle", "--out", "other", "--version", "0.1", "--member", "m_resnet",
         "m_densenet", "--ensemble", "ens.json", "--detector", "det/detector.pt", "--tta", "5",
         "--detect-size", "128", "--no-onnx"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert refused.returncode == 2 and "not fitted the way" in refused.stderr  # TTA 5 != 2
    _run(*TRAIN, "bundle", "--out", "bundle", "--name", "chain", "--version", "0.1",
         "--intended-use", "test", "--member", "m_resnet", "m_densenet", "--ensemble",
         "ens.json", "--detector", "det/detector.pt", "--data", "data", "--gate-images", "12",
         "--detect-size", "128", "--tta", "2", cwd=tmp_path)
    from spine_node.models.bundle import load_manifest

    manifest = load_manifest(tmp_path / "bundle")  # every sha256 verified
    assert [m.name for m in manifest.members] == ["resnet", "densenet"]
    assert list(manifest.ensemble_weights) == fit["weights"]
    assert manifest.threshold == fit["threshold"]
    reference = manifest.score_reference  # drift reference: the out-of-fold validation scores
    assert reference is not None and reference.n == fit["n_images"]
    files = sorted(str(p) for p in (tmp_path / "data" / "test_images").glob("*.dicom"))
    rows = json.loads(_run(*NODE, "analyze", *files, "--bundle", "bundle", "--json",
                           cwd=tmp_path))
    assert len(rows) == len(files)
    assert all(r["status"] in ("positive", "negative", "not_processed") for r in rows)
    assert all(r["threshold"] == fit["threshold"] for r in rows)
    assert manifest.metrics["ensemble_fit"]["fitted_on"]["kind"] == "served"
    # the fit's member probabilities are the ones the node computes on those images
    from pydicom import dcmread

    from spine_node.pipeline import Cascade
    from training.ensemble import served_predictions

    oof, _ = served_predictions([tmp_path / "m_resnet", tmp_path / "m_densenet"], fold=0,
                                data_dir=tmp_path / "data", tta_views=2)
    cascade = Cascade.load(tmp_path / "bundle", device="cpu")
    results = cascade.analyze([dcmread(tmp_path / "data" / "train_images" / f"{i}.dicom")
                               for i in oof.image_ids])
    compared = 0
    for row, result in zip(oof.scores, results, strict=True):
        if result.member_scores:
            assert [result.member_scores[n] for n in oof.members] == pytest.approx(row, abs=1e-5)
            compared += 1
    assert compared >= 1

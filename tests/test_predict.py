"""spine-train predict + evaluate: the node's own cascade over a split, figures at the bundle's
threshold, and the test split touched once (ledger + model card in the bundle)."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread

from spine_node.models.bundle import load_manifest, write_manifest
from spine_node.node import demo_bundle_path
from spine_node.pipeline import Cascade
from training import cli, model_card
from training.phantom import write_phantom_dataset
from training.predict import PredictionRun

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, 12, 31, balanced=True, size=(320, 256), test_fraction=0.5)
    # one test image is a chest film by its tags: the node refuses it (not processed)
    first = _rows(root / "annotations" / "test.csv")[0]["image_id"]
    path = root / "test_images" / f"{first}.dicom"
    ds = dcmread(path)
    ds.BodyPartExamined = "CHEST"
    ds.save_as(path)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the demo bundle (the ledger is written into the bundle)."""
    return Path(shutil.copytree(demo_bundle_path(), tmp_path_factory.mktemp("b") / "bundle"))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_evaluate_and_touch_once(
    data: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pred"
    earlier = len(model_card.read_evaluations(bundle))  # the demo bundle's own evaluation
    assert cli.main(["predict", "--bundle", str(bundle), "--data", str(data), "--out",
                     str(out)]) == 0
    run = PredictionRun.read(out)
    manifest = load_manifest(bundle)
    scores = _rows(out / "scores.csv")
    test_ids = [r["image_id"] for r in _rows(data / "annotations" / "test.csv")]
    assert [r["image_id"] for r in scores] == list(dict.fromkeys(test_ids))
    assert run.n_not_processed == 1 and run.threshold == manifest.threshold
    refused = [r for r in scores if r["status"] == "not_processed"]
    assert len(refused) == 1 and "not spine" in refused[0]["reason"] and refused[0]["score"] == ""
    # the node's own cascade: same scores and findings as Cascade.analyze on the same files
    cascade = Cascade.load(bundle, device="cpu")
    results = cascade.analyze([dcmread(data / "test_images" / f"{r['image_id']}.dicom")
                               for r in scores])
    dets = _rows(out / "detections.csv")
    for row, result in zip(scores, results, strict=True):
        assert row["status"] == result.status.value
        if result.score is not None:
            assert float(row["score"]) == pytest.approx(result.score, abs=1e-6)
        mine = [d for d in dets if d["image_id"] == row["image_id"]]
        assert len(mine) == len(result.findings)
        if row["status"] != "positive":  # hard gate: no boxes on a negative or refused image
            assert not mine
    capsys.readouterr()

    # evaluate at the bundle's threshold; the refused image is a negative call, reported
    assert cli.main(["evaluate", "--run", str(out), "--json", "--bootstrap", "200"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold"] == manifest.threshold
    assert report["n_not_processed"] == 1 and report["bootstrap_unit"] == "study"
    assert report["n_images"] == len(scores)
    assert report["confusion"]["tp"] + report["confusion"]["fp"] == run.n_positive
    assert report["retest_reason"] is None
    ledger = model_card.read_evaluations(bundle)[earlier:]
    assert len(ledger) == 1 and ledger[0].split_hash == run.split_hash
    assert ledger[0].figures["auroc"] == report["auroc"]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert run.split_hash[:12] in card and "first evaluation" in card

    # the same bundle again: allowed and recorded (nothing can have been tuned)
    assert cli.main(["evaluate", "--run", str(out), "--bootstrap", "0"]) == 0
    assert model_card.read_evaluations(bundle)[-1].reason == "same bundle"

    # the bundle changes (a new threshold): the same split is refused by predict and evaluate
    write_manifest(bundle, replace(manifest, threshold=0.3))
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(out)]) == 2  # predictions of another bundle
    again = tmp_path / "again"
    assert cli.main(["predict", "--bundle", str(bundle), "--data", str(data), "--out",
                     str(again)]) == 2
    assert "touched once" in capsys.readouterr().err
    assert len(model_card.read_evaluations(bundle)) == earlier + 2
    # ... unless a reason is given, which the model card lists
    assert cli.main(["predict", "--bundle", str(bundle), "--data", str(data), "--out",
                     str(again), "--allow-retest", "threshold refit after a bug fix"]) == 0
    assert cli.main(["evaluate", "--run", str(again), "--bootstrap", "0"]) == 0
    ledger = model_card.read_evaluations(bundle)
    assert len(ledger) == earlier + 3 and ledger[-1].reason == "threshold refit after a bug fix"
    assert ledger[-1].figures["threshold"] == 0.3
    assert "threshold refit after a bug fix" in (bundle / "MODEL_CARD.md").read_text()


def test_hashes_and_the_rule(data: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(demo_bundle_path(), tmp_path / "bundle"))
    manifest = load_manifest(bundle)
    digest = model_card.bundle_hash(bundle)
    # recording figures in the manifest's metrics does not change the bundle's identity
    write_manifest(bundle, replace(manifest, metrics={**manifest.metrics, "x": 1}))
    assert model_card.bundle_hash(bundle) == digest
    write_manifest(bundle, replace(manifest, tta_views=1))
    assert model_card.bundle_hash(bundle) != digest
    # a changed label changes the split's hash
    ann = data / "annotations" / "test.csv"
    changed = tmp_path / "test.csv"
    changed.write_text(ann.read_text().replace("No finding", "Osteophytes", 1))
    assert model_card.split_hash(ann) != model_card.split_hash(changed)
    record = model_card.EvaluationRecord(
        when="t", split="test", split_hash="a" * 64, bundle_hash="b" * 64,
        bundle_version="v", n_images=3, command="c",
    )
    before = model_card.read_evaluations(bundle)
    model_card.record_evaluation(bundle, record)
    assert model_card.check_retest(bundle, "a" * 64, "b" * 64) == "same bundle"
    assert model_card.check_retest(bundle, "f" * 64, "c" * 64) is None  # a fresh split
    with pytest.raises(model_card.RetestRefusedError, match="allow-retest"):
        model_card.check_retest(bundle, "a" * 64, "c" * 64)
    with pytest.raises(ValueError, match="non-empty"):
        model_card.check_retest(bundle, "a" * 64, "c" * 64, " ")
    # rebuilding a bundle in place keeps its ledger (training.export.build_bundle)
    from training.export import make_tiny_bundle

    make_tiny_bundle(bundle, seed=0, onnx=False, gate=False)
    assert model_card.read_evaluations(bundle) == [*before, record]
    assert f"| {len(before) + 1} |" in (bundle / "MODEL_CARD.md").read_text()

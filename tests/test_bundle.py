"""Model bundle: manifest round trip, defaults, hash checks with clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from spine_node.models.bundle import (
    BundleError,
    DetectorSpec,
    MemberSpec,
    load_manifest,
    manifest_from_json,
    sha256_file,
    write_manifest,
)
from spine_node.pipeline import Cascade
from spine_node.results.types import LESION_LABELS

pytest_plugins = ("tests.fixtures_models",)


def test_tiny_manifest_records_every_number(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    assert [x.arch for x in m.members] == ["densenet121", "tf_efficientnetv2_s", "resnet50"]
    assert m.ensemble_weights == (0.42, 0.32, 0.26)
    assert m.threshold == 0.478 and m.tta_views == 5
    assert (m.detector.conf, m.detector.iou, m.detector.gate) == (0.25, 0.5, "hard")
    assert m.detector.class_names == LESION_LABELS
    assert m.gate is not None and m.gate.threshold > 0
    eff = next(x for x in m.members if x.name == "efficientnet")
    dense = next(x for x in m.members if x.name == "densenet")
    assert eff.mean == (0.5, 0.5, 0.5) and eff.std == (0.5, 0.5, 0.5)
    assert dense.mean == pytest.approx((0.485, 0.456, 0.406))
    assert m.demo is True and m.prep["triage_size"] == 64


def test_manifest_json_round_trip(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    again = manifest_from_json(json.loads(json.dumps(m.to_json())))
    assert again.to_json() == m.to_json()


def test_every_file_is_hashed(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    names = {name for _, name, _ in m.files()}
    assert {"densenet.pt", "densenet.onnx", "detector.pt", "detector.onnx", "gate.npz"} <= names
    for _, name, sha in m.files():
        assert sha256_file(tiny_bundle / name) == sha


@pytest.mark.parametrize("victim", ["resnet.pt", "detector.pt", "gate.npz", "efficientnet.onnx"])
def test_hash_mismatch_names_the_file(tiny_bundle_copy: Path, victim: str) -> None:
    path = tiny_bundle_copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{victim} has sha256 .* manifest records"):
        load_manifest(tiny_bundle_copy)
    with pytest.raises(BundleError, match=victim):
        Cascade.load(tiny_bundle_copy, device="cpu")


def test_missing_file_names_the_file(tiny_bundle_copy: Path) -> None:
    (tiny_bundle_copy / "densenet.pt").unlink()
    with pytest.raises(
        BundleError, match=r"triage member densenet weights file densenet.pt is missing"
    ):
        load_manifest(tiny_bundle_copy)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_manifest(tmp_path)


def test_missing_key_is_named(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / "manifest.json"
    doc = json.loads(path.read_text())
    del doc["triage"]["threshold"]
    path.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="lacks the required key 'threshold'"):
        load_manifest(tiny_bundle_copy)


def test_bad_value_is_explained(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / "manifest.json"
    doc = json.loads(path.read_text())
    doc["triage"]["ensemble_weights"] = [0.5, 0.5, 0.5]
    path.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="ensemble_weights must be non-negative and sum to 1"):
        load_manifest(tiny_bundle_copy)


def test_file_outside_bundle_refused(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / "manifest.json"
    doc = json.loads(path.read_text())
    doc["detector"]["weights"] = "../detector.pt"
    path.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="plain file name inside the bundle"):
        load_manifest(tiny_bundle_copy)


def test_weights_that_do_not_fit_the_arch(tiny_bundle_copy: Path) -> None:
    m = load_manifest(tiny_bundle_copy)
    member = replace(m.members[0], kwargs={"growth_rate": 12, "block_config": [1, 1, 1, 1]})
    write_manifest(tiny_bundle_copy, replace(m, members=(member, *m.members[1:])))
    with pytest.raises(BundleError, match=r"densenet\.pt does not fit densenet121"):
        Cascade.load(tiny_bundle_copy, device="cpu")


def test_write_manifest_refuses_unhashed_files(tiny_bundle_copy: Path) -> None:
    m = load_manifest(tiny_bundle_copy)
    bad = replace(m, detector=replace(m.detector, sha256="0" * 64))
    with pytest.raises(BundleError, match=r"detector\.pt"):
        write_manifest(tiny_bundle_copy, bad)


def test_spec_validation_names_the_argument() -> None:
    good = {
        "name": "d",
        "arch": "densenet121",
        "kwargs": {},
        "weights": "d.pt",
        "sha256": "a" * 64,
        "input_size": 384,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    MemberSpec(**good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sha256"):
        MemberSpec(**{**good, "sha256": "xyz"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        MemberSpec(**{**good, "std": (0.5, 0.0, 0.5)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gate"):
        DetectorSpec(weights="d.pt", sha256="a" * 64, class_names=LESION_LABELS, gate="maybe")
    with pytest.raises(ValueError, match="class_names"):
        DetectorSpec(weights="d.pt", sha256="a" * 64, class_names=("Fracture",))

"""The gate: tag rules (table) and the content (out-of-distribution) check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from spine_node.models.gate import ContentGate, check_tags, fit_gate, normalise_body_part
from spine_node.pipeline import Cascade
from spine_node.results.types import Status

pytest_plugins = ("tests.fixtures_models",)


def _ds(**tags: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = 2000, 1500
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PROC = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case values on purpose
@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({}, None),  # VinDr style: no Modality, no SOP class, no body part
        ({"Modality": "DX", "BodyPartExamined": "LSPINE"}, None),
        ({"Modality": "CR", "SOPClassUID": CR, "BodyPartExamined": "L-SPINE"}, None),
        ({"Modality": "DX", "BodyPartExamined": "Lumbar Spine"}, None),
        ({"Modality": "DX", "BodyPartExamined": "c spine"}, None),
        ({"Modality": "DX", "BodyPartExamined": "WIRBELSAEULE"}, None),
        ({"Modality": "DX", "BodyPartExamined": "LWS"}, None),
        ({"Modality": "DX", "BodyPartExamined": "rachis"}, None),
        ({"Modality": "DX", "BodyPartExamined": "COLONNA"}, None),
        ({"Modality": "DX", "BodyPartExamined": "COLUMNA"}, None),
        ({"Modality": "OT", "SOPClassUID": SC}, None),
        ({"Modality": "RG"}, None),
        ({"Modality": "DX", "BodyPartExamined": "UNKNOWNPART"}, None),  # content decides
        ({"Modality": "CT"}, "CT image, not a radiograph"),
        ({"Modality": "MR"}, "MR image, not a radiograph"),
        ({"Modality": "US"}, "ultrasound image, not a radiograph"),
        ({"Modality": "NM"}, "nuclear medicine image, not a radiograph"),
        ({"Modality": "PT"}, "PET image, not a radiograph"),
        ({"Modality": "XYZ"}, "XYZ image, not a radiograph"),
        ({"SOPClassUID": CT_SOP}, "CT Image Storage object, not a radiograph"),
        ({"Modality": "DX", "BodyPartExamined": "CHEST"}, "body part CHEST, not spine"),
        ({"Modality": "DX", "BodyPartExamined": "hand"}, "body part HAND, not spine"),
        ({"Modality": "CR", "BodyPartExamined": "SKULL"}, "body part SKULL, not spine"),
        ({"Modality": "CR", "BodyPartExamined": "KNEE"}, "body part KNEE, not spine"),
        (
            {"Modality": "DX", "ImageType": ["DERIVED", "PRIMARY", "LOCALIZER"]},
            "localizer (scout) image, not a diagnostic radiograph",
        ),
        ({"Modality": "DX", "Rows": 200, "Columns": 900}, "image too small (900 x 200 pixels"),
    ],
)
def test_tag_rules(tags: dict[str, object], reason: str | None) -> None:
    decision = check_tags(_ds(**tags))
    if reason is None:
        assert decision.accepted, decision.reason
    else:
        assert not decision.accepted
        assert decision.reason is not None and decision.reason.startswith(reason)


def test_notes_for_processing_and_multiframe() -> None:
    d = check_tags(_ds(Modality="DX", SOPClassUID=DX_PROC, PresentationIntentType="FOR PROCESSING"))
    assert d.accepted and any("FOR PROCESSING" in n for n in d.notes)
    d = check_tags(_ds(Modality="DX", NumberOfFrames=3))
    assert d.accepted and any("first frame" in n for n in d.notes)
    d = check_tags(_ds(Modality="DX", BodyPartExamined="PART"))
    assert d.accepted and any("not recognised as spine" in n for n in d.notes)


def test_body_part_normalisation() -> None:
    assert normalise_body_part(" l-spine ") == "LSPINE"
    assert normalise_body_part("Lumbar_Spine") == "LUMBARSPINE"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("CT_small.dcm", "CT image, not a radiograph"),
        ("MR_small.dcm", "MR image, not a radiograph"),
    ],
)
def test_pydicom_ct_and_mr_are_not_processed(tiny_bundle: Path, name: str, reason: str) -> None:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    cascade = Cascade.load(tiny_bundle, device="cpu")
    (result,) = cascade.analyze([ds])
    assert result.status is Status.NOT_PROCESSED
    assert result.reason == reason
    assert result.sop_instance_uid == ds.SOPInstanceUID


def test_fit_gate_separates_shifted_data() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(40, 40))
    train = rng.normal(size=(200, 40)) @ mixing
    arrays, threshold = fit_gate(train, 0.99)
    gate = ContentGate(arrays, threshold)
    assert arrays["components"].shape[0] <= 32
    fresh = rng.normal(size=(100, 40)) @ mixing
    accepted = np.mean(gate.distances(fresh) <= threshold)
    assert accepted > 0.9
    shifted = fresh + 5 * train.std(axis=0)
    assert np.all(gate.distances(shifted) > threshold)
    refused = gate.decide(float(gate.distances(shifted[:1])[0]))
    assert not refused.accepted
    assert refused.reason is not None and refused.reason.startswith(
        "image content does not look like a spine radiograph (out-of-distribution score "
    )
    assert f"> {threshold:.1f})" in refused.reason


def test_fit_gate_validates() -> None:
    with pytest.raises(ValueError, match="embeddings"):
        fit_gate(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="quantile"):
        fit_gate(np.random.default_rng(0).normal(size=(20, 5)), quantile=0.1)


def test_content_gate_refuses_unlike_images(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    cascade = Cascade.load(tiny_bundle, device="cpu")
    like = dx_dataset(seed=11)
    stripes = np.tile((np.arange(260) // 4) % 2, (300, 1)).astype(np.float32)
    unlike = dx_dataset(stripes)
    r_like, r_unlike = cascade.analyze([like, unlike])
    assert r_like.status is not Status.NOT_PROCESSED, r_like.reason
    assert r_unlike.status is Status.NOT_PROCESSED
    assert r_unlike.reason is not None
    assert r_unlike.reason.startswith("image content does not look like a spine radiograph")

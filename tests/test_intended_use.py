"""Intended use: the patient's age (gate, bundle manifest) as the cascade applies it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import torch

from spine_node.models.bundle import load_manifest, manifest_from_json
from spine_node.models.gate import (
    DEFAULT_MIN_AGE_YEARS,
    check_age,
    check_tags,
    patient_age,
)
from spine_node.pipeline import Cascade
from spine_node.results.types import Status
from tests.fixtures_models import make_dx_dataset

pytest_plugins = ("tests.fixtures_models",)


def _ds(**tags: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("tags", "years", "text"),
    [
        ({"PatientAge": "012Y"}, 12.0, "12 years"),
        ({"PatientAge": "006M"}, 0.5, "6 months"),
        ({"PatientAge": "026W"}, 26 / (365.25 / 7), "26 weeks"),
        ({"PatientAge": "030D"}, 30 / 365.25, "30 days"),
        ({"PatientBirthDate": "20080615", "StudyDate": "20250614"}, 16.0, "16 years"),
        ({"PatientBirthDate": "20070615", "StudyDate": "20250615"}, 18.0, "18 years"),
        # a broken Patient's Age falls back to the dates
        ({"PatientAge": "12", "PatientBirthDate": "19600101", "AcquisitionDate": "20250101"},
         65.0, "65 years"),
    ],
)
def test_patient_age_from_age_or_dates(tags: dict[str, str], years: float, text: str) -> None:
    age = patient_age(_ds(**tags))
    assert age is not None
    assert age.years == pytest.approx(years) and age.text == text


@pytest.mark.parametrize(
    "tags",
    [
        {},
        {"PatientAge": "abc"},
        {"PatientBirthDate": "20300101", "StudyDate": "20250101"},  # born after the study
        {"PatientBirthDate": "18000101", "StudyDate": "20250101"},  # implausible
        {"PatientBirthDate": "19600101"},  # no examination date
        {"PatientBirthDate": "1960", "StudyDate": "20250101"},
    ],
)
def test_unknown_age(tags: dict[str, str]) -> None:
    assert patient_age(_ds(**tags)) is None


def test_age_rule() -> None:
    child = check_age(_ds(PatientAge="012Y"), 18)
    assert not child.accepted
    assert child.reason == (
        "outside the intended use (age 12 years; for patients aged 18 years or older)"
    )
    adult = check_age(_ds(PatientAge="018Y"), 18)
    assert adult.accepted and adult.notes == ()
    unknown = check_age(_ds(), 18)
    assert unknown.accepted and unknown.notes[0].startswith("patient age unknown")
    assert check_age(_ds(PatientAge="002Y"), 0).accepted  # 0: no age limit
    with pytest.raises(ValueError, match="min_age_years"):
        check_age(_ds(), -1)
    # in the tag gate, after the modality rules (a CT of a child is "not a radiograph")
    decision = check_tags(_ds(Modality="DX", PatientAge="009Y"))
    assert not decision.accepted and "age 9 years" in str(decision.reason)
    assert "not a radiograph" in str(check_tags(_ds(Modality="CT", PatientAge="009Y")).reason)
    assert DEFAULT_MIN_AGE_YEARS == 18.0


def test_manifest_minimum_age_defaults_to_18(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    document = manifest.to_json()
    assert document["min_patient_age_years"] == manifest.min_patient_age_years
    del document["min_patient_age_years"]
    assert manifest_from_json(document).min_patient_age_years == 18.0
    document["min_patient_age_years"] = 21
    assert manifest_from_json(document).min_patient_age_years == 21.0
    for bad, error in ((-1, ValueError), ("18", TypeError), (None, TypeError)):
        document["min_patient_age_years"] = bad
        with pytest.raises(error, match="min_patient_age_years"):
            manifest_from_json(document)


def test_cascade_applies_the_bundle_age(tiny_bundle: Path) -> None:
    torch.set_num_threads(1)
    loaded = Cascade.load(tiny_bundle, device="cpu")
    cascade = Cascade(
        manifest=replace(loaded.manifest, min_patient_age_years=16.0),
        triage=loaded.triage,
        detector=loaded.detector,
        content_gate=None,
    )
    child = make_dx_dataset(seed=3, PatientAge="015Y")
    adult = make_dx_dataset(seed=3, PatientAge="016Y")
    unknown = make_dx_dataset(seed=3)
    results = cascade.analyze([child, adult, unknown])
    assert results[0].status is Status.NOT_PROCESSED
    assert results[0].reason == (
        "outside the intended use (age 15 years; for patients aged 16 years or older)"
    )
    assert results[1].status is not Status.NOT_PROCESSED
    assert not any("age" in note for note in results[1].notes)
    assert results[2].status is results[1].status  # same pixels, processed
    assert results[2].notes[0] == (
        "patient age unknown (the intended use is patients aged 16 years or older)"
    )
    assert results[2].to_json()["notes"] == list(results[2].notes)


def test_cascade_applies_the_intended_modalities(tiny_bundle: Path) -> None:
    # report_out_of_scope = true queues out-of-scope images: they must end "not processed"
    torch.set_num_threads(1)
    loaded = Cascade.load(tiny_bundle, device="cpu", intended_modalities=("CR", "DX"))
    rg = make_dx_dataset(seed=3, Modality="RG", PatientAge="040Y")
    dx = make_dx_dataset(seed=3, Modality="DX", PatientAge="040Y")
    results = loaded.analyze([rg, dx])
    assert results[0].status is Status.NOT_PROCESSED
    assert results[0].reason == "outside the intended use (modality RG; intended: CR, DX)"
    assert results[1].status is not Status.NOT_PROCESSED
    # without the setting (spine-node analyze), any radiograph modality is analysed
    assert check_tags(rg).accepted
    assert not check_tags(rg, intended_modalities=["cr", "dx"]).accepted

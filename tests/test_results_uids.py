"""Deterministic 2.25 UIDs."""

from __future__ import annotations

import pytest

from spine_node.results import uids
from spine_node.results.types import ModelInfo

SOP = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.826.0.1.3680043.8.498.2"


def test_derived_uids_are_valid_2_25_and_short():
    for kind in uids.ResultKind:
        for uid in (
            uids.sop_instance_uid(SOP, kind, "b/1"),
            uids.series_instance_uid(STUDY, kind, "b/1"),
        ):
            assert uid.startswith("2.25.")
            assert uids.is_valid_uid(uid)
            assert len(uid) <= 64


def test_same_inputs_same_uid_other_inputs_other_uid():
    a = uids.sop_instance_uid(SOP, uids.ResultKind.SR, "b/1")
    assert a == uids.sop_instance_uid(SOP, uids.ResultKind.SR, "b/1")
    others = {
        uids.sop_instance_uid(SOP, uids.ResultKind.SC, "b/1"),
        uids.sop_instance_uid(SOP, uids.ResultKind.SR, "b/2"),
        uids.sop_instance_uid(SOP + "1", uids.ResultKind.SR, "b/1"),
        uids.series_instance_uid(SOP, uids.ResultKind.SR, "b/1"),
    }
    assert a not in others
    assert len(others) == 4


def test_series_uid_depends_on_study_not_image():
    s1 = uids.series_instance_uid(STUDY, "sr", "b/1")
    assert s1 == uids.series_instance_uid(STUDY, uids.ResultKind.SR, "b/1")
    assert s1 != uids.series_instance_uid(STUDY + "9", "sr", "b/1")


def test_usable_or_derived_keeps_valid_and_replaces_vindr_hex():
    assert uids.usable_or_derived(STUDY, "study") == STUDY
    hex_uid = "3b1f4a2e9c0d4e7fa1b2c3d4e5f60718"
    derived = uids.usable_or_derived(hex_uid, "study")
    assert uids.is_valid_uid(derived) and derived.startswith("2.25.")
    assert derived == uids.usable_or_derived(hex_uid + "\x00", "study")
    assert derived != uids.usable_or_derived(hex_uid, "series")
    with pytest.raises(ValueError, match="study"):
        uids.usable_or_derived("", "study")


@pytest.mark.parametrize(
    "value, ok",
    [
        ("1.2.3", True),
        ("1.02.3", False),
        ("1", False),
        ("1..2", False),
        ("1.2.", False),
        ("1.2.a", False),
        ("1." + "1" * 63, False),
        (None, False),
    ],
)
def test_is_valid_uid(value, ok):
    assert uids.is_valid_uid(value) is ok


def test_bad_arguments():
    with pytest.raises(ValueError, match="usable DICOM UID"):
        uids.sop_instance_uid("abc", uids.ResultKind.SR, "b/1")
    with pytest.raises(ValueError):
        uids.sop_instance_uid(SOP, "pdf", "b/1")
    with pytest.raises(ValueError, match="non-empty"):
        uids.uid_from_name("a", "")
    with pytest.raises(TypeError):
        uids.uid_from_name("a", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ModelInfo"):
        uids.bundle_key("m")  # type: ignore[arg-type]
    assert uids.bundle_key(ModelInfo(name="m", version="2")) == "m/2"


@pytest.mark.parametrize(
    "value, ok",
    [
        ("1.2.3", True),
        ("1.02.3", True),  # leading zero: breaks PS3.5 9.1, still carried as received
        ("1.2.826.0.1.3680043.8.498.0711.07.20250101.062805.1", True),
        ("1", False),
        ("1..2", False),
        ("1.2.", False),
        ("1.2.a", False),
        ("1." + "1" * 62, True),
        ("1." + "1" * 63, False),
        ("3b1f4a2e9c0d4e7fa1b2c3d4e5f60718", False),
        (None, False),
    ],
)
def test_is_usable_uid(value, ok):
    assert uids.is_usable_uid(value) is ok


def test_usable_or_derived_keeps_leading_zero_uids():
    odd = "1.2.826.0.1.3680043.8.498.0896.07.20250101.095816.11"
    assert uids.usable_or_derived(odd, "instance") == odd
    assert uids.usable_or_derived(odd + "\x00", "instance") == odd
    assert uids.sop_instance_uid(odd, uids.ResultKind.SR, "b/1") != uids.sop_instance_uid(
        odd.replace(".07.", ".7."), uids.ResultKind.SR, "b/1"
    )

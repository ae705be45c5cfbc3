"""Every standard code we write exists in the offline terminology source (pydicom's dictionaries)."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.sr._concepts_dict import concepts

from spine_node.results import codes
from spine_node.results.types import LESION_LABELS


def _dictionary_meanings(scheme: str, value: str) -> set[str]:
    meanings = set()
    table: dict[str, Any] = concepts[scheme]  # type: ignore[assignment]
    for entries in table.values():
        if value in entries:
            meanings.add(entries[value][0].lower())
    return meanings


@pytest.mark.parametrize(
    "code",
    [c for c in codes.all_codes() if c.scheme_designator in {"SCT", "DCM"}],
    ids=lambda c: f"{c.scheme_designator}-{c.value}",
)
def test_standard_code_exists_in_pydicom_dictionary(code):
    meanings = _dictionary_meanings(code.scheme_designator, code.value)
    assert meanings, f"{code} is not in pydicom's {code.scheme_designator} dictionary"
    assert code.meaning.lower() in meanings, f"{code.meaning!r} not among {sorted(meanings)}"


def test_only_known_schemes_are_written():
    schemes = {c.scheme_designator for c in codes.all_codes()}
    assert schemes == {"SCT", "DCM", "UCUM", codes.PRIVATE_SCHEME}


def test_unverified_snomed_candidates_are_absent_offline_and_not_written():
    written = {(c.scheme_designator, c.value) for c in codes.all_codes()}
    for label, (value, _meaning) in codes.UNVERIFIED_SNOMED_CANDIDATES.items():
        assert not _dictionary_meanings("SCT", value), f"{value} is verifiable now: use it"
        assert ("SCT", value) not in written
        assert codes.finding_code(label).scheme_designator == codes.PRIVATE_SCHEME


def test_every_lesion_label_has_a_distinct_code():
    found = [codes.finding_code(label) for label in LESION_LABELS]
    assert len({(c.scheme_designator, c.value) for c in found}) == len(LESION_LABELS)
    assert codes.finding_code("Surgical implant").value == "40388003"


def test_private_codes_are_unique():
    private = [c for c in codes.all_codes() if c.scheme_designator == codes.PRIVATE_SCHEME]
    assert len({c.value for c in private}) == len(private)
    assert len({c.meaning for c in private}) == len(private)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="No finding"):
        codes.finding_code("No finding")
    with pytest.raises(ValueError, match="VI"):
        codes.meyerding_code("VI")
    assert codes.meyerding_code("III").meaning == "Meyerding grade III"


def test_coding_scheme_identification_declares_private_scheme():
    item = codes.coding_scheme_identification()
    assert item.CodingSchemeDesignator == codes.PRIVATE_SCHEME

"""Identity and text carried from the source into every result object (issue 9 point 2).

The sources mirror the field cases F01 (UIDs with leading zeros), F08 (a Person Name group
over 64 characters) and F12 (ISO 2022 Korean and Japanese names), plus character-set
mislabels; every object is written to bytes, read back by pydicom and checked by dciodvfy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from spine_node.results import text as text_module
from spine_node.results.builder import ResultOptions, build_results
from spine_node.results.reference import source_reference
from spine_node.results.types import CascadeResult, Status
from spine_node.results.uids import is_usable_uid, is_valid_uid
from tests.results_kit import (
    MODEL,
    dciodvfy_errors,
    dx_source,
    positive,
    save_object,
    sr_texts,
    write_and_read,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALL = ResultOptions(gsps=True)

# F01: made-up root, components with non-significant leading zeros, odd lengths
F01_STUDY = "1.2.826.0.1.3680043.8.498.0711.07.20250101.062805.1"
F01_SERIES = "1.2.826.0.1.3680043.8.498.0576.07.20250101.051735.2"
F01_SOP = "1.2.826.0.1.3680043.8.498.0896.07.20250101.095816.11"

# F08
F08_PATIENT = "Vanderlinden-Oosterhuis^Maria-Magdalena Wilhelmina Theodora^van der^Mrs^PhD"
F08_REFERRER = "Oppenheimer-Castellanos^Friedrich-Alexander Maximilian^de la^Prof Dr^MD"

# F12
F12 = {
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "요추 2방향"),
    "japanese": (
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        "腰椎 2方向",
    ),
}


def _objects(source, tmp_path, result=None, options=ALL):
    result = result or positive(source)
    return [save_object(o, tmp_path) for o in build_results(source, result, MODEL, options)]


def _leading_zero_errors_only(errors: list[str], carried: set[str]) -> None:
    """dciodvfy may only object to the source UIDs we must carry byte for byte."""
    for line in errors:
        assert "Leading zeroes in embedded numeric component" in line, line
        assert any(f"<{uid}>" in line for uid in carried), line


def test_f01_leading_zero_uids_are_carried_verbatim(tmp_path):
    source = write_and_read(
        dx_source(study=F01_STUDY, series=F01_SERIES, sop=F01_SOP), tmp_path / "f01.dcm"
    )
    assert not is_valid_uid(F01_STUDY) and is_usable_uid(F01_STUDY)
    objects = _objects(source, tmp_path)
    assert [back.Modality for _, back in objects] == ["SR", "OT", "PR"]
    for path, back in objects:
        assert back.StudyInstanceUID == F01_STUDY
        assert is_valid_uid(back.SOPInstanceUID) and is_valid_uid(back.SeriesInstanceUID)
        _leading_zero_errors_only(dciodvfy_errors(path), {F01_STUDY, F01_SERIES, F01_SOP})
        if back.Modality == "SR":
            evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
            assert evidence.StudyInstanceUID == F01_STUDY
            series = evidence.ReferencedSeriesSequence[0]
            assert series.SeriesInstanceUID == F01_SERIES
            assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == F01_SOP
            report = hd.sr.srread(path)
            group = report.content.get_planar_roi_measurement_groups()[0]
            assert group.roi.ContentSequence[0].ReferencedSOPSequence[
                0
            ].ReferencedSOPInstanceUID == (F01_SOP)
            assert not any("not a usable DICOM UID" in t for t in sr_texts(back))
        elif back.Modality == "OT":
            assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == F01_SOP
            assert back.ReferencedImageSequence[0].ReferencedSOPInstanceUID == F01_SOP
        else:
            series = back.ReferencedSeriesSequence[0]
            assert series.SeriesInstanceUID == F01_SERIES
            assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == F01_SOP


@pytest.mark.parametrize(
    "bad",
    ["a1b2c3d4e5f60718293a4b5c6d7e8f90", "1.2.840." + "1" * 60, "1.2.3.x", "1.2..3"],
)
def test_unusable_study_uid_is_derived_and_the_sr_says_so(bad, tmp_path):
    source = dx_source(study=bad)
    ref = source_reference(source)
    assert [d.keyword for d in ref.derived_uids] == ["StudyInstanceUID"]
    derived = ref.derived_uids[0].derived
    assert is_valid_uid(derived) and derived.startswith("2.25.")
    objects = _objects(source, tmp_path)
    for path, back in objects:
        assert back.StudyInstanceUID == derived
        assert dciodvfy_errors(path) == []
    sr_text = sr_texts(objects[0][1])
    assert any("not a usable DICOM UID" in t and derived in t for t in sr_text), sr_text


def test_f08_person_name_groups_fit_64_bytes(tmp_path):
    source = dx_source()
    source.PatientName = F08_PATIENT
    source.ReferringPhysicianName = F08_REFERRER
    source = write_and_read(source, tmp_path / "f08.dcm")
    for path, back in _objects(source, tmp_path):
        assert dciodvfy_errors(path) == []
        for keyword in ("PatientName", "ReferringPhysicianName"):
            value = str(back[keyword].value)
            assert all(len(g.encode()) <= 64 for g in value.split("=")), value
        # family and given names survive; the components that do not fit are dropped
        assert str(back.PatientName) == (
            "Vanderlinden-Oosterhuis^Maria-Magdalena Wilhelmina Theodora"
        )
        assert back.PatientName.family_name == "Vanderlinden-Oosterhuis"
        assert str(back.ReferringPhysicianName).startswith(
            "Oppenheimer-Castellanos^Friedrich-Alexander Maximilian"
        )


@pytest.mark.parametrize("name", sorted(F12))
def test_f12_iso2022_names_carried_into_utf8(name, tmp_path):
    charset, pn, description = F12[name]
    source = dx_source(charset=charset)
    source.PatientName = pn
    source.StudyDescription = description
    source = write_and_read(source, tmp_path / f"f12_{name}.dcm")
    raw = (tmp_path / f"f12_{name}.dcm").read_bytes()
    assert b"\x1b" in raw  # really ISO 2022 escape sequences on the wire
    for path, back in _objects(source, tmp_path):
        assert dciodvfy_errors(path) == []
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == pn  # all three groups, in order
        assert back.StudyDescription == description
        assert "\ufffd" not in str(back.PatientName) and "?" not in str(back.PatientName)


def _patched(tmp_path: Path, charset: str, placeholder: str, raw: bytes, keyword: str):
    source = dx_source(charset=charset)
    setattr(source, keyword, placeholder)
    path = tmp_path / f"mislabel_{keyword}.dcm"
    source.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data.count(placeholder.encode()) == 1 and len(placeholder.encode()) == len(raw)
    path.write_bytes(data.replace(placeholder.encode(), raw))
    return pydicom.dcmread(path)


@pytest.mark.parametrize(
    "charset, raw, expected",
    [
        # Latin-1 bytes declared UTF-8: the common mislabel
        ("ISO_IR 192", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen"),
        # Windows-1252 bytes (curly apostrophe 0x92) declared UTF-8
        ("ISO_IR 192", "O’Brien^Seán".encode("cp1252"), "O’Brien^Seán"),
        # UTF-8 bytes declared Latin-1 (the opposite mislabel)
        ("ISO_IR 100", "Ødegård^Åse".encode(), "Ødegård^Åse"),
        # 8-bit bytes without any Specific Character Set
        ("", "Gonçalves^Inês".encode("latin-1"), "Gonçalves^Inês"),
    ],
)
def test_undecodable_text_is_recovered_not_replaced(charset, raw, expected, tmp_path):
    source = _patched(tmp_path, charset, "X" * len(raw), raw, "PatientName")
    ref = source_reference(source)
    assert ref.recovered_text == ("PatientName",)
    assert str(ref.dataset.PatientName) == expected
    for path, back in _objects(source, tmp_path):
        assert dciodvfy_errors(path) == []
        assert str(back.PatientName) == expected
        written = path.read_bytes()
        assert expected.encode("utf-8") in written
        assert "\ufffd".encode() not in written


def test_declared_latin1_that_is_latin1_stays_latin1(tmp_path):
    raw = "Ærø^Zoë".encode("latin-1")
    source = _patched(tmp_path, "ISO_IR 100", "X" * len(raw), raw, "PatientName")
    ref = source_reference(source)
    assert ref.recovered_text == ()
    assert str(ref.dataset.PatientName) == "Ærø^Zoë"


def test_lo_and_sh_are_cut_in_bytes_at_a_character_boundary(tmp_path):
    source = dx_source(charset="ISO_IR 192")
    source.StudyDescription = "요추" * 40  # 240 UTF-8 bytes
    source.AccessionNumber = "洪" * 10  # 30 bytes
    source.PatientID = "é" * 70
    source.PatientName = "洪" * 30 + "^" + "吉" * 10
    source = write_and_read(source, tmp_path / "long.dcm")
    for path, back in _objects(source, tmp_path):
        assert dciodvfy_errors(path) == []
        assert back.StudyDescription == "요추" * 10 + "요"  # 63 bytes, whole characters
        assert back.AccessionNumber == "洪" * 5  # 15 bytes
        assert back.PatientID == "é" * 32
        assert str(back.PatientName) == "洪" * 21  # family name cut; no room for the given


def test_control_characters_and_replacement_characters_are_removed():
    assert text_module.clean_characters("A\x00B\x1bC\ufffd\tD\r\nE") == "ABC D  E"
    assert text_module.fit_bytes("aé", 2) == "a"
    assert text_module.clean_person_name("a" * 70 + "^b") == "a" * 64
    assert text_module.clean_person_name("Doe^John^^^=" + "山" * 30) == "Doe^John=" + "山" * 21
    with pytest.raises(ValueError, match="vr"):
        text_module.clean_string("x", "XX")


def test_contributing_equipment_names_the_algorithm_in_every_object(tmp_path):
    source = dx_source()
    for path, back in _objects(source, tmp_path):
        items = back.ContributingEquipmentSequence
        ours = [i for i in items if i.get("ManufacturerModelName") == MODEL.name]
        assert len(ours) == 1, back.Modality
        item = ours[0]
        assert item.Manufacturer == ALL.manufacturer
        assert item.SoftwareVersions[0] == MODEL.version
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
        assert MODEL.version in item.ContributionDescription
        assert dciodvfy_errors(path) == []


def test_not_processed_result_without_pixels_keeps_identity(tmp_path):
    source = dx_source(study=F01_STUDY, series=F01_SERIES, sop=F01_SOP)
    del source.PixelData
    result = CascadeResult(
        sop_instance_uid=F01_SOP, status=Status.NOT_PROCESSED, reason="no pixels", threshold=None
    )
    objects = _objects(source, tmp_path, result)
    assert [b.Modality for _, b in objects] == ["SR"]
    assert objects[0][1].StudyInstanceUID == F01_STUDY


def test_options_are_limited_in_utf8_bytes(tmp_path):
    with pytest.raises(ValueError, match="institution_name"):
        ResultOptions(institution_name="Ü" * 33)  # 33 characters, 66 bytes
    options = ResultOptions(institution_name="Ü" * 32, sr_series_description="Ü" * 32, gsps=True)
    demo = dataclasses.replace(MODEL, demo=True)
    source = dx_source()
    for path, _ in _objects(source, tmp_path, options=options):
        assert dciodvfy_errors(path) == []
    sr = build_results(source, positive(source), demo, options)[0]
    assert len(sr.SeriesDescription.encode()) <= 64 and "DEMO" in sr.SeriesDescription

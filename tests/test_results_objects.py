"""SR, SC and GSPS built from real and sloppy sources, checked by pydicom, highdicom,
dciodvfy and dsrdump."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from spine_node import imaging
from spine_node.imaging import to_uint8
from spine_node.results import codes, uids
from spine_node.results.builder import ResultOptions, build_results, reference_dataset
from spine_node.results.overlay import banner_lines, upscale_factor
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status, display_label

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
DSRDUMP = shutil.which("dsrdump")

MODEL = ModelInfo(
    name="dernet-yolo11",
    version="1.0.0",
    demo=False,
    intended_use="Research triage of spine radiographs",
    parameters={
        "member_weights": {"densenet121": 0.42, "tf_efficientnetv2_s": 0.32, "resnet50": 0.26},
        "sha256": {"densenet121": "a" * 64},
        "tta_views": 5,
    },
)
DEMO = ModelInfo(name="spine-demo", version="0.0.1", demo=True)

# --------------------------------------------------------------------------- sources


def _read(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        path = get_charset_files(name)[0]
    return pydicom.dcmread(path)


def sloppy_source() -> Dataset:
    """VinDr-like: 32-hex ids, no SOP Class, no type 2 patient/study data, bogus charset."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.SOPInstanceUID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    ds.StudyInstanceUID = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    ds.SeriesInstanceUID = "ffeeddccbbaa99887766554433221100"
    ds.StudyDate = "2021-13-45"
    ds.PatientSex = "male"
    ds.PatientOrientation = ["LEFT", "F"]
    ds.Laterality = "left"
    ds.Rows, ds.Columns = 96, 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ramp = (np.arange(96 * 64, dtype=np.uint16).reshape(96, 64) * 7) % 4096
    ds.PixelData = ramp.astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def result_for(source: Dataset, status: Status, findings: bool = True) -> CascadeResult:
    """The cascade's answer, with the display image it decoded (as the worker passes on)."""
    return dataclasses.replace(_result_for(source, status, findings), display=_display(source))


def _display(source: Dataset) -> imaging.SourceImage | None:
    if "PixelData" not in source:
        return None
    return imaging.decode(source)


def _result_for(source: Dataset, status: Status, findings: bool = True) -> CascadeResult:
    uid = str(source.SOPInstanceUID)
    if status is Status.NOT_PROCESSED:
        return CascadeResult(
            sop_instance_uid=uid,
            status=status,
            reason="Not a spine radiograph: body part CHEST",
            threshold=0.5,
        )
    if status is Status.NEGATIVE:
        return CascadeResult(
            sop_instance_uid=uid,
            status=status,
            score=0.12,
            member_scores={"resnet50": 0.1},
            threshold=0.5,
        )
    rows, cols = int(source.Rows), int(source.Columns)
    found = (
        (
            Finding(
                "Spondylolysthesis", 0.81, (cols * 0.2, rows * 0.3, cols * 0.6, rows * 0.5), "II"
            ),
            Finding("Vertebral collapse", 0.55, (cols * 0.5, rows * 0.6, cols * 0.9, rows * 0.9)),
        )
        if findings
        else ()
    )
    return CascadeResult(
        sop_instance_uid=uid,
        status=status,
        score=0.91,
        threshold=0.5,
        findings=found,
        member_scores={"densenet121": 0.93, "resnet50": 0.88},
    )


# --------------------------------------------------------------------------- helpers


def roundtrip(ds: Dataset, tmp_path: Path) -> tuple[Path, Dataset]:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = tmp_path / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
    path.write_bytes(buffer.getvalue())
    return path, pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def assert_dciodvfy_clean(path: Path) -> None:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}:\n{text}"


def dsrdump(path: Path) -> str:
    assert DSRDUMP, "dsrdump (dcmtk) is required"
    out = subprocess.run(
        [DSRDUMP, "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


def _report(sr: Dataset) -> hd.sr.MeasurementReport:
    content = sr.content  # type: ignore[attr-defined]
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def by_modality(objects: list[Dataset]) -> dict[str, Dataset]:
    return {o.Modality: o for o in objects}


# --------------------------------------------------------------------------- tests

SOURCES = ["CT_small.dcm", "chrH31.dcm", "chrX1.dcm", "sloppy"]


def _source(name: str) -> Dataset:
    return sloppy_source() if name == "sloppy" else _read(name)


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("status", list(Status))
def test_objects_are_valid_and_round_trip(name, status, tmp_path):
    source = _source(name)
    result = result_for(source, status)
    objects = build_results(source, result, MODEL, ResultOptions(gsps=True))
    kinds = [o.Modality for o in objects]
    assert kinds == (["SR", "OT", "PR"] if status is Status.POSITIVE else ["SR", "OT"])
    ref = reference_dataset(source)
    for obj in objects:
        path, back = roundtrip(obj, tmp_path)
        assert_dciodvfy_clean(path)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert back.StudyInstanceUID == ref.StudyInstanceUID
        assert uids.is_valid_uid(back.SOPInstanceUID)
        assert (back.PatientID or "") == (ref.PatientID or "")
        assert str(back.PatientName or "") == str(ref.PatientName or "")
        if back.Modality == "SR":
            report = hd.sr.srread(path)
            assert report.VerificationFlag == "UNVERIFIED"
            assert report.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
            groups = _report(report).get_planar_roi_measurement_groups()
            assert len(groups) == len(result.findings)
            for group, finding in zip(groups, result.findings, strict=True):
                assert group.finding_type == codes.finding_code(finding.label)
                roi = group.roi
                assert roi is not None and roi.GraphicType == "POLYLINE"
                points = np.asarray(roi.value)
                assert points.shape == (5, 2) and np.array_equal(points[0], points[-1])
                assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
                    ref.SOPInstanceUID
                )
                assert group.get_measurements()[0].value == pytest.approx(finding.score)
        elif back.Modality == "OT":
            image = hd.imread(path)
            assert image.BurnedInAnnotation == "YES"
            assert list(image.ImageType) == ["DERIVED", "SECONDARY"]
            assert image.PhotometricInterpretation == "MONOCHROME2"
            assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
            assert image.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
        else:
            # highdicom 0.28 has no GSPS reader: check the graphics with pydicom
            annotation = back.GraphicAnnotationSequence[0]
            assert len(annotation.GraphicObjectSequence) == len(result.findings)
            assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
                ref.SOPInstanceUID
            )
            texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
            assert texts[0].startswith("1. Spondylolisthesis 0.81")


@pytest.mark.parametrize("status", list(Status))
def test_sr_renders_in_dsrdump_with_findings_and_reason(status, tmp_path):
    source = _read("CT_small.dcm")
    result = result_for(source, status)
    sr = build_results(source, result, MODEL, ResultOptions())[0]
    path, _ = roundtrip(sr, tmp_path)
    text = dsrdump(path)
    assert "Imaging Measurement Report" in text
    assert "UNVERIFIED" in text
    assert '"Plain radiography"' in text
    assert codes.NOT_FOR_DIAGNOSTIC_USE in text
    assert MODEL.name in text and MODEL.version in text
    assert "member_weights=" in text and "densenet121" in text
    # nothing about the study as a whole: a later image could make it false
    assert "Study AI triage priority" not in text and "Study priority" not in text
    expected = {
        Status.POSITIVE: '"Abnormal"',
        Status.NEGATIVE: '"Normal"',
        Status.NOT_PROCESSED: '"Not processed"',
    }[status]
    assert expected in text
    for finding in result.findings:
        assert display_label(finding.label) in text
    if status is Status.NOT_PROCESSED:
        assert "Not a spine radiograph: body part CHEST" in text
        assert '"Probability")' not in text
    else:
        assert f'"Probability")="{result.score}"' in text
    if status is Status.POSITIVE:
        assert "Meyerding grade II" in text
        assert "Tracking Unique Identifier" in text


def test_large_cr_radiograph_positive(tmp_path):
    source = _read("RG1_UNCR.dcm")  # MONOCHROME1 computed radiograph
    result = result_for(source, Status.POSITIVE)
    objects = by_modality(build_results(source, result, MODEL, ResultOptions(gsps=True)))
    for obj in objects.values():
        path, _ = roundtrip(obj, tmp_path)
        assert_dciodvfy_clean(path)
    assert objects["PR"].PresentationLUTShape == "INVERSE"  # keeps bone bright
    assert (
        objects["SR"]
        .CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPClassUID
        == pydicom.uid.ComputedRadiographyImageStorage
    )


def test_uids_are_deterministic_and_change_with_bundle_version():
    source = _read("CT_small.dcm")
    result = result_for(source, Status.POSITIVE)
    options = ResultOptions(gsps=True)

    def identity(objects):
        return [uid for o in objects for uid in (o.SOPInstanceUID, o.SeriesInstanceUID)]

    first = build_results(source, result, MODEL, options)
    second = build_results(source, result, MODEL, options)
    assert identity(first) == identity(second)
    newer = ModelInfo(name=MODEL.name, version="1.0.1", parameters=MODEL.parameters)
    third = build_results(source, result, newer, options)
    assert not set(identity(first)) & set(identity(third))
    assert len({o.SOPInstanceUID for o in first}) == 3
    assert len({o.SeriesInstanceUID for o in first}) == 3


def test_images_of_one_study_share_result_series():
    a = _read("CT_small.dcm")
    b = _read("CT_small.dcm")
    b.SOPInstanceUID = a.SOPInstanceUID + ".2"
    ra, rb = result_for(a, Status.NEGATIVE), result_for(b, Status.NEGATIVE)
    oa, ob = build_results(a, ra, MODEL), build_results(b, rb, MODEL)
    assert [o.SeriesInstanceUID for o in oa] == [o.SeriesInstanceUID for o in ob]
    assert not {o.SOPInstanceUID for o in oa} & {o.SOPInstanceUID for o in ob}


def test_tracking_uids_are_deterministic(tmp_path):
    source = _read("CT_small.dcm")
    result = result_for(source, Status.POSITIVE)

    def tracking(model):
        sr = build_results(source, result, model)[0]
        path, _ = roundtrip(sr, tmp_path)
        groups = _report(hd.sr.srread(path)).get_planar_roi_measurement_groups()
        return [g.tracking_uid for g in groups]

    assert tracking(MODEL) == tracking(MODEL)
    assert not set(tracking(MODEL)) & set(tracking(DEMO))


def test_demo_flag_appears_in_every_object(tmp_path):
    source = _read("CT_small.dcm")
    result = result_for(source, Status.POSITIVE)
    objects = by_modality(build_results(source, result, DEMO, ResultOptions(gsps=True)))
    for obj in objects.values():
        assert codes.DEMO_TEXT in obj.SeriesDescription
    path, _ = roundtrip(objects["SR"], tmp_path)
    assert codes.DEMO_TEXT in dsrdump(path)
    assert codes.DEMO_TEXT in objects["OT"].ImageComments
    assert codes.DEMO_TEXT in banner_lines(result, DEMO)
    banner = objects["PR"].GraphicAnnotationSequence[1].TextObjectSequence[0].UnformattedTextValue
    assert codes.DEMO_TEXT in banner and codes.NOT_FOR_DIAGNOSTIC_USE in banner

    plain = by_modality(build_results(source, result, MODEL, ResultOptions(gsps=True)))
    for obj in plain.values():
        assert codes.DEMO_TEXT not in obj.SeriesDescription
    assert codes.DEMO_TEXT not in banner_lines(result, MODEL)


def test_overlay_pixels_show_image_boxes_and_banner():
    source = _read("CT_small.dcm")
    display = imaging.decode(source).pixels
    base = np.clip(np.rint(display * 255.0), 0, 255).astype(np.uint8)
    k = upscale_factor(base.shape[1])
    enlarged = np.kron(base, np.ones((k, k), dtype=np.uint8))

    negative = by_modality(build_results(source, result_for(source, Status.NEGATIVE), MODEL))["OT"]
    pixels = negative.pixel_array
    banner_rows = pixels.shape[0] - enlarged.shape[0]
    assert banner_rows > 0 and pixels.shape[1] == enlarged.shape[1]
    assert len(np.unique(pixels)) > 10
    # below the banner: the display image itself, untouched when there are no findings
    assert np.array_equal(pixels[banner_rows:], enlarged)
    # the banner is text on black, nothing like the source
    banner = pixels[:banner_rows]
    assert (banner == 0).mean() > 0.5 and (banner == 255).any()

    positive_result = result_for(source, Status.POSITIVE)
    positive = by_modality(build_results(source, positive_result, MODEL))["OT"].pixel_array
    assert positive.shape[0] > pixels.shape[0] - 1  # findings line adds banner rows
    body = positive[positive.shape[0] - enlarged.shape[0] :]
    assert not np.array_equal(body, enlarged)
    x0, _, x1, y1 = (round(v * k) for v in positive_result.findings[1].box)
    assert (body[y1, x0 + 5 : x1 - 5] == 255).mean() > 0.9  # bottom edge of box 2 is white


def test_negative_and_not_processed_get_sr_and_overlay_but_no_gsps():
    source = _read("CT_small.dcm")
    options = ResultOptions(gsps=True)
    for status in (Status.NEGATIVE, Status.NOT_PROCESSED):
        kinds = [
            o.Modality for o in build_results(source, result_for(source, status), MODEL, options)
        ]
        assert kinds == ["SR", "OT"]
    positive_without_boxes = result_for(source, Status.POSITIVE, findings=False)
    kinds = [o.Modality for o in build_results(source, positive_without_boxes, MODEL, options)]
    assert kinds == ["SR", "OT"]


def test_not_processed_without_decodable_pixels_gives_sr_only(tmp_path):
    source = _read("CT_small.dcm")
    del source.PixelData
    objects = build_results(source, result_for(source, Status.NOT_PROCESSED), MODEL)
    assert [o.Modality for o in objects] == ["SR"]
    path, _ = roundtrip(objects[0], tmp_path)
    assert_dciodvfy_clean(path)
    assert "Not a spine radiograph" in dsrdump(path)


def test_options_switch_objects_and_series():
    source = _read("CT_small.dcm")
    result = result_for(source, Status.POSITIVE)
    assert [o.Modality for o in build_results(source, result, MODEL)] == ["SR", "OT"]
    options = ResultOptions(secondary_capture=False, sr_series_number=77, institution_name="Clinic")
    (sr,) = build_results(source, result, MODEL, options)
    assert (sr.SeriesNumber, sr.SeriesDescription, sr.InstitutionName) == (
        77,
        "AI spine triage SR",
        "Clinic",
    )


def test_sloppy_source_gets_valid_derived_study_uid():
    source = sloppy_source()
    ref = reference_dataset(source)
    assert ref.StudyInstanceUID == uids.usable_or_derived(source.StudyInstanceUID, "study")
    assert ref.StudyInstanceUID.startswith("2.25.")
    assert ref.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
    assert ref.StudyDate is None and ref.PatientSex is None and ref.PatientName is None
    assert "PatientOrientation" not in ref and "Laterality" not in ref
    again = build_results(source, result_for(source, Status.NEGATIVE), MODEL)
    assert again[0].StudyInstanceUID == ref.StudyInstanceUID


def test_valid_orientation_and_laterality_are_kept():
    source = _read("CT_small.dcm")
    source.PatientOrientation = ["L", "PF"]
    source.Laterality = "R"
    sc = by_modality(build_results(source, result_for(source, Status.NEGATIVE), MODEL))["OT"]
    assert list(sc.PatientOrientation) == ["L", "PF"] and sc.Laterality == "R"


def test_odd_character_set_is_written_as_utf8(tmp_path):
    source = _read("chrH31.dcm")  # ISO 2022 IR 87 (Japanese)
    sr = build_results(source, result_for(source, Status.NEGATIVE), MODEL)[0]
    path, back = roundtrip(sr, tmp_path)
    assert str(back.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert "山田" in path.read_bytes().decode("utf-8", errors="ignore")


def test_bad_inputs_are_refused():
    source = _read("CT_small.dcm")
    result = result_for(source, Status.NEGATIVE)
    other = CascadeResult(
        sop_instance_uid="1.2.3", status=Status.NEGATIVE, score=0.1, threshold=0.5
    )
    with pytest.raises(ValueError, match="does not match"):
        build_results(source, other, MODEL)
    with pytest.raises(TypeError, match="source"):
        build_results("file.dcm", result, MODEL)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options"):
        build_results(source, result, MODEL, {"gsps": True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sr_series_number"):
        ResultOptions(sr_series_number=0)
    with pytest.raises(ValueError, match="sc_series_description"):
        ResultOptions(sc_series_description="x" * 65)
    with pytest.raises(TypeError, match="gsps"):
        ResultOptions(gsps="yes")  # type: ignore[arg-type]
    no_uid = _read("CT_small.dcm")
    del no_uid.SOPInstanceUID
    no_uid.file_meta = FileMetaDataset()
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        reference_dataset(no_uid)


def test_threshold_is_stated_never_defaulted():
    """The bundle's threshold is required; only a not_processed result may go without it."""
    with pytest.raises(TypeError, match="threshold"):
        CascadeResult(sop_instance_uid="1.2.3", status=Status.NEGATIVE, score=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="needs the bundle's threshold"):
        CascadeResult(sop_instance_uid="1.2.3", status=Status.POSITIVE, score=0.9, threshold=None)
    with pytest.raises(ValueError, match="threshold must be in"):
        CascadeResult(sop_instance_uid="1.2.3", status=Status.POSITIVE, score=0.9, threshold=1.5)
    refused = CascadeResult(
        sop_instance_uid="1.2.3", status=Status.NOT_PROCESSED, reason="no pixels", threshold=None
    )
    assert CascadeResult.from_json(refused.to_json()) == refused
    assert refused.to_json()["threshold"] is None


def test_display_values_map_to_8_bits_as_rounded_clipped_products() -> None:
    """The overlay's 8-bit conversion is round(255 v) clipped to 0..255 (half to even, as
    numpy.rint), NaN and -inf 0, +inf 255, for float32 and float64 input."""
    rng = np.random.default_rng(3)
    values = (rng.random((64, 48)) * 1.4 - 0.2).astype(np.float32)
    values[0, :8] = [np.nan, np.inf, -np.inf, 0.5 / 255, 1.5 / 255, 2.5 / 255, 1.0, 0.0]
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.clip(np.rint(np.nan_to_num(values) * np.float32(255.0)), 0, 255)
    for array in (values, values.astype(np.float64)):
        got = to_uint8(array)
        assert got.dtype == np.uint8 and got.shape == values.shape
        np.testing.assert_array_equal(got, expected.astype(np.uint8))
    assert list(to_uint8(values)[0, :8]) == [0, 255, 0, 0, 2, 2, 255, 0]

"""The optional GSPS never spoils a result (issue 9 point 5).

Sources whose presentation attributes broke the GSPS (window and VOI LUT both present, LUT
data in another VR or packing, decimal strings with commas, odd photometric, a Modality LUT
Sequence) still get their SR and overlay; the GSPS is built with a safe VOI, or left out
with a logged reason. Every object written is read back and checked by dciodvfy.
"""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from spine_node.results.builder import ResultOptions, build_results
from spine_node.results.gsps import GSPSUnavailable, safe_presentation
from spine_node.results.reference import reference_dataset
from tests.results_kit import (
    MODEL,
    dciodvfy_errors,
    dx_source,
    positive,
    save_object,
    write_and_read,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTIONS = ResultOptions(gsps=True)


def _lut_item(data, descriptor, vr_data: str = "OW") -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    item.add_new("LUTData", vr_data, data)
    item.LUTExplanation = "Site LUT"
    return item


def _build(source, tmp_path):
    objects = build_results(source, positive(source), MODEL, OPTIONS)
    saved = [save_object(o, tmp_path) for o in objects]
    for path, _ in saved:
        assert dciodvfy_errors(path) == [], path.name
    return {back.Modality: back for _, back in saved}


def _gsps_lut(pr: Dataset) -> tuple[list[int], np.ndarray]:
    lut = pr.SoftcopyVOILUTSequence[0].VOILUTSequence[0]
    descriptor = [int(v) for v in lut.LUTDescriptor]
    dtype = np.uint8 if descriptor[2] == 8 else np.dtype("<u2")
    return descriptor, np.frombuffer(lut.LUTData, dtype)[: descriptor[0] or 65536]


def test_window_and_voi_lut_both_present_gives_a_gsps_with_the_lut(tmp_path):
    source = dx_source()
    table = (np.arange(4096) // 16).astype("<u2")  # 12-bit input -> 8-bit output
    source.VOILUTSequence = [_lut_item(table.tobytes(), [4096, 0, 16])]
    objects = _build(write_and_read(source, tmp_path / "both.dcm"), tmp_path)
    assert sorted(objects) == ["OT", "PR", "SR"]
    descriptor, data = _gsps_lut(objects["PR"])
    # the descriptor overstated the bits: the data use 8, written as an 8-bit LUT
    assert descriptor == [4096, 0, 8] and np.array_equal(data, table)
    assert "WindowCenter" not in objects["PR"].SoftcopyVOILUTSequence[0]


def test_lut_data_in_us_vr_with_12_bit_entries(tmp_path):
    source = dx_source()
    table = [min(4095, v * 2) for v in range(4096)]
    source.VOILUTSequence = [_lut_item(table, [4096, 0, 12], vr_data="US")]
    objects = _build(write_and_read(source, tmp_path / "us.dcm"), tmp_path)
    descriptor, data = _gsps_lut(objects["PR"])
    # 12-bit entries become 16-bit ones, each the same fraction of the output range
    assert descriptor == [4096, 0, 16]
    assert np.allclose(data / 65535.0, np.asarray(table) / 4095.0, atol=1e-5)


def test_8_bit_lut_entries_packed_two_per_word(tmp_path):
    source = dx_source()
    table = (np.arange(4096) // 16).astype(np.uint8)
    source.VOILUTSequence = [_lut_item(table.tobytes(), [4096, 0, 8])]  # 2048 words
    objects = _build(write_and_read(source, tmp_path / "packed.dcm"), tmp_path)
    descriptor, data = _gsps_lut(objects["PR"])
    assert descriptor == [4096, 0, 8] and np.array_equal(data, table)


def test_unusable_lut_falls_back_to_the_window(tmp_path):
    source = dx_source()
    source.VOILUTSequence = [_lut_item(b"\x00\x01" * 10, [4096, 0, 16])]  # too short
    objects = _build(write_and_read(source, tmp_path / "short.dcm"), tmp_path)
    voi = objects["PR"].SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2048.0, 4096.0)
    assert "VOILUTSequence" not in voi


def test_decimal_strings_with_commas(tmp_path):
    source = dx_source()
    source.WindowCenter, source.WindowWidth = "2048.5", "3999.5"
    source.RescaleSlope, source.RescaleIntercept = "1", "0"
    path = tmp_path / "commas.dcm"
    source.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes().replace(b"2048.5", b"2048,5").replace(b"3999.5", b"3999,5"))
    objects = _build(pydicom.dcmread(path), tmp_path)
    voi = objects["PR"].SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2048.5, 3999.5)


def test_rescale_slope_zero_and_zero_window_width_give_identity_and_no_voi(tmp_path):
    source = dx_source()
    source.RescaleSlope, source.RescaleIntercept, source.RescaleType = 0, 0, "US"
    source.WindowWidth = 0
    objects = _build(write_and_read(source, tmp_path / "zero.dcm"), tmp_path)
    pr = objects["PR"]
    assert "SoftcopyVOILUTSequence" not in pr
    assert "RescaleSlope" not in pr  # identity modality transformation
    notes = safe_presentation(reference_dataset(source)).notes
    assert any("window width" in n for n in notes) and any("slope" in n for n in notes)


def test_rescale_is_carried_when_valid(tmp_path):
    source = dx_source()
    source.RescaleSlope, source.RescaleIntercept, source.RescaleType = 2, -1024, "US"
    objects = _build(write_and_read(source, tmp_path / "rescale.dcm"), tmp_path)
    pr = objects["PR"]
    assert (float(pr.RescaleSlope), float(pr.RescaleIntercept)) == (2.0, -1024.0)


def test_modality_lut_sequence_leaves_the_gsps_out_with_a_reason(tmp_path, caplog):
    source = dx_source()
    source.ModalityLUTSequence = [_lut_item(np.arange(4096, dtype="<u2").tobytes(), [4096, 0, 16])]
    source.ModalityLUTSequence[0].ModalityLUTType = "US"
    with pytest.raises(GSPSUnavailable, match="Modality LUT"):
        safe_presentation(reference_dataset(source))
    with caplog.at_level(logging.INFO, logger="spine_node.results.builder"):
        objects = _build(write_and_read(source, tmp_path / "mlut.dcm"), tmp_path)
    assert sorted(objects) == ["OT", "SR"]
    assert any("no GSPS" in r.message and "Modality LUT" in r.message for r in caplog.records)


def test_colour_source_keeps_sr_and_overlay_without_gsps(tmp_path, caplog):
    source = dx_source()
    grey = np.frombuffer(source.PixelData, "<u2").reshape(source.Rows, source.Columns)
    rgb = np.repeat((grey >> 4).astype(np.uint8)[..., None], 3, axis=2)
    source.SOPClassUID = SecondaryCaptureImageStorage
    source.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    source.PhotometricInterpretation = "RGB"
    source.SamplesPerPixel = 3
    source.PlanarConfiguration = 0
    source.BitsAllocated, source.BitsStored, source.HighBit = 8, 8, 7
    source.PixelData = rgb.tobytes()
    del source.WindowCenter, source.WindowWidth
    with caplog.at_level(logging.INFO, logger="spine_node.results.builder"):
        objects = _build(write_and_read(source, tmp_path / "rgb.dcm"), tmp_path)
    assert sorted(objects) == ["OT", "SR"]
    assert any("no GSPS" in r.message and "RGB" in r.message for r in caplog.records)

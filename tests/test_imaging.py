"""Tests for spine_node.imaging on pydicom's own test files and small synthetic datasets."""

from __future__ import annotations

import copy
import shutil
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as dicom_uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing

from spine_node import imaging
from spine_node.imaging import (
    ImageError,
    Letterbox,
    PrepParams,
    check_dimensions,
    clahe,
    decode,
    letterbox,
    prepare,
    prepare_array,
    read_dataset,
    resize_square,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _path(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom test file {name} is not installed"
    return path


def _load(name: str) -> Dataset:
    return pydicom.dcmread(_path(name), force=True)


def _reference(ds: Dataset) -> np.ndarray:
    """The textbook pydicom path, slow and float64: modality -> VOI/window -> [0,1] -> invert."""
    ds = copy.deepcopy(ds)  # pydicom's windowing rewrites some elements
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    raw = pixel_array(ds, index=frames // 2)
    values = apply_modality_lut(raw, ds)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        first = int(item.LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + int(item.LUTDescriptor[0])), ds)
        # output range 0 .. 2**bits - 1, bits from the data (DCMTK's --ignore-vlut-depth)
        top = (1 << max(8, int(table.max()).bit_length())) - 1
        out = apply_voi(values, ds).astype(np.float64) / top
    else:
        assert "WindowCenter" in ds, "reference needs a window or a VOI LUT"
        low, high = apply_windowing(np.array([-1e12, 1e12]), ds)
        out = (apply_windowing(values.astype(np.float64), ds) - low) / (high - low)
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if ds.PhotometricInterpretation == "MONOCHROME1" or inverse:
        out = 1.0 - out
    return out


def _native(arr: np.ndarray, **attrs: object) -> Dataset:
    """A small native (Explicit VR Little Endian) greyscale dataset around ``arr``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return ds


def _vindr_like(arr: np.ndarray, photometric: str) -> Dataset:
    """A VinDr-SpineXR-style dataset: J2K lossless, 16/12 bits, no SOP Class, no Modality."""
    ds = Dataset()
    ds.StudyInstanceUID = uuid.uuid4().hex  # 32 hex digits: not a valid DICOM UID
    ds.SeriesInstanceUID = uuid.uuid4().hex
    ds.SOPInstanceUID = uuid.uuid4().hex
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 1800
    ds.WindowWidth = 2600
    ds.compress(
        dicom_uid.JPEG2000Lossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False
    )
    return ds


def _phantom(rows: int = 240, columns: int = 180, seed: int = 0) -> np.ndarray:
    """12-bit image with structure: a gradient, a bright 'vertebra' column and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    img = 900 + 4 * y + 1500 * (np.abs(x - columns / 2) < columns / 8)
    img = img + rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


# --------------------------------------------------------------------------- decoding


LOSSLESS_PAIRS = [
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),  # CR, MONOCHROME1, JPEG 2000 lossless
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),  # CR, MONOCHROME1, 10 bits stored
    ("US1_UNCR.dcm", "US1_J2KR.dcm"),  # colour, YBR_RCT
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm"),  # multi-frame
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm"),
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG lossless SV1, colour
    # lossy files against their decompressed ("UNCI") versions
    ("RG1_UNCI.dcm", "RG1_J2KI.dcm"),
    ("MR2_UNCI.dcm", "MR2_J2KI.dcm"),
]


@pytest.mark.parametrize(("plain", "coded"), LOSSLESS_PAIRS)
def test_same_image_in_two_transfer_syntaxes_decodes_identically(plain: str, coded: str) -> None:
    a_ds, b_ds = _load(plain), _load(coded)
    assert a_ds.file_meta.TransferSyntaxUID != b_ds.file_meta.TransferSyntaxUID
    a, b = decode(a_ds), decode(b_ds)
    assert a.pixels.dtype == np.float32 and a.pixels.shape == (a.rows, a.columns)
    assert a.pixels.std() > 0.01  # a real image, not a flat one
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.frame == b.frame


def test_lossy_jpeg_baseline_is_close_to_the_original() -> None:
    original = decode(_load("SC_rgb.dcm")).pixels
    lossy = decode(_load("SC_rgb_jpeg_dcmtk.dcm")).pixels  # JPEG baseline, YBR_FULL
    assert not np.array_equal(original, lossy)
    assert np.abs(original - lossy).max() < 0.03
    assert np.abs(original - lossy).mean() < 0.01


@pytest.mark.parametrize(
    "name",
    [
        "RG1_UNCR.dcm",  # CR MONOCHROME1, window
        "RG3_J2KR.dcm",  # CR MONOCHROME1, 10 bits stored, J2K
        "MR_small.dcm",  # signed 16-bit, window
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless, 8 bit, window
        "J2K_pixelrep_mismatch.dcm",  # several windows: the first one is used
        "vlut_04.dcm",  # VOI LUT sequence
    ],
)
def test_decode_matches_the_pydicom_reference_path(name: str) -> None:
    ds = _load(name)
    got = decode(ds).pixels
    np.testing.assert_allclose(got, _reference(ds), atol=2e-6)


def test_rescale_then_window_matches_reference() -> None:
    ds = _load("CT_small.dcm")  # Rescale Intercept -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    got = decode(ds)
    np.testing.assert_allclose(got.pixels, _reference(ds), atol=2e-6)
    assert 0.0 < got.pixels.mean() < 1.0


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    ("function", "center", "width"),
    [
        ("LINEAR", 600, 1600),
        ("LINEAR_EXACT", 600, 1600),
        ("SIGMOID", 600, 1600),
        ("LINEAR", 600, 1),
    ],
)
def test_window_functions_match_pydicom(function: str, center: float, width: float) -> None:
    ds = _load("MR_small.dcm")
    ds.VOILUTFunction = function
    ds.WindowCenter, ds.WindowWidth = center, width
    np.testing.assert_allclose(decode(ds).pixels, _reference(ds), atol=2e-6)


def test_monochrome1_is_inverted_to_bone_bright() -> None:
    ds = _load("RG1_UNCR.dcm")
    raw = pixel_array(ds).astype(np.float64)
    mono1 = decode(ds)
    assert "inverted (MONOCHROME1)" in mono1.notes
    # In MONOCHROME1 high stored values are dark: prepared pixels anticorrelate with them.
    corr = np.corrcoef(raw.ravel()[::37], mono1.pixels.ravel()[::37])[0, 1]
    assert corr < -0.9
    as_mono2 = copy.deepcopy(ds)
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    mono2 = decode(as_mono2)
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert mono1.pixels.mean() == pytest.approx(1.0 - mono2.pixels.mean(), abs=1e-4)
    assert mono1.photometric == "MONOCHROME1"


def test_presentation_lut_inverse_inverts_once() -> None:
    ds = _load("MR_small.dcm")
    plain = decode(ds).pixels
    inverse = copy.deepcopy(ds)
    inverse.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(decode(inverse).pixels, 1.0 - plain, atol=1e-6)
    # MONOCHROME1 that also says INVERSE (DX style) is inverted once, not twice.
    mono1 = copy.deepcopy(ds)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    both = copy.deepcopy(mono1)
    both.PresentationLUTShape = "INVERSE"
    np.testing.assert_array_equal(decode(both).pixels, decode(mono1).pixels)
    np.testing.assert_allclose(decode(mono1).pixels, 1.0 - plain, atol=1e-6)


def test_voi_lut_sequence_takes_priority_over_window() -> None:
    ds = _load("vlut_04.dcm")
    lut_only = decode(ds).pixels
    both = copy.deepcopy(ds)
    both.WindowCenter, both.WindowWidth = 30, 20
    np.testing.assert_array_equal(decode(both).pixels, lut_only)
    window_only = copy.deepcopy(both)
    del window_only.VOILUTSequence
    windowed = decode(window_only).pixels
    assert np.abs(windowed - lut_only).mean() > 0.05
    np.testing.assert_allclose(windowed, _reference(window_only), atol=2e-6)


def test_modality_lut_sequence_is_applied_before_the_window() -> None:
    ds = _load("mlut_18.dcm")  # Modality LUT: signed 12-bit input -> 16-bit output
    got = decode(ds)
    assert "modality LUT applied" in got.notes
    mapped = apply_modality_lut(pixel_array(ds), ds).ravel()
    order = np.argsort(mapped, kind="stable")
    # The display is a non-decreasing function of the modality LUT output.
    assert np.all(np.diff(got.pixels.ravel()[order]) >= -1e-6)
    # A window in modality-LUT output units only makes sense after the LUT.
    ds.WindowCenter, ds.WindowWidth = 40000, 20000
    windowed = decode(ds)
    np.testing.assert_allclose(windowed.pixels, _reference(ds), atol=2e-6)
    without = copy.deepcopy(ds)
    del without.ModalityLUTSequence
    assert np.abs(decode(without).pixels - windowed.pixels).mean() > 0.1


def test_bits_stored_masks_garbage_in_unused_high_bits() -> None:
    clean = _phantom()
    rng = np.random.default_rng(1)
    dirty = clean | (rng.integers(0, 16, clean.shape, dtype=np.uint16) << 12)  # overlay junk
    attrs = {"BitsStored": 12, "HighBit": 11, "WindowCenter": 2048, "WindowWidth": 4096}
    got = decode(_native(dirty, **attrs)).pixels
    expected = decode(_native(clean, **attrs)).pixels
    np.testing.assert_array_equal(got, expected)
    ignored = decode(_native(dirty, WindowCenter=2048, WindowWidth=4096)).pixels  # 16 stored
    assert not np.array_equal(ignored, expected)


def test_no_window_uses_robust_percentile_range_in_both_code_paths() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(1000, 2000, (200, 200)).astype(np.uint16)
    img.ravel()[:50] = 0  # 0.125 % dark outliers
    img.ravel()[50:100] = 60000  # 0.125 % bright outliers
    rng.shuffle(img.ravel())
    lut_path = decode(_native(img))  # uint16: lookup-table path
    float_path = decode(_native(img.astype(np.int32)))  # 32-bit: direct float path
    note = "no window in header: scaled to the 0.5-99.5 percentile range"
    assert note in lut_path.notes and note in float_path.notes
    np.testing.assert_allclose(lut_path.pixels, float_path.pixels, atol=2e-3)
    # Outliers do not compress the range: the body of the histogram spans ~[0, 1].
    inner = lut_path.pixels[(img > 0) & (img < 60000)]
    assert inner.min() < 0.01 and inner.max() > 0.99
    assert 0.004 < np.mean(lut_path.pixels == 0.0) < 0.02
    assert 0.004 < np.mean(lut_path.pixels == 1.0) < 0.02


def test_multi_frame_uses_the_middle_frame() -> None:
    ds = _load("emri_small.dcm")  # 10 frames
    got = decode(ds)
    assert got.frame == 5
    assert any("middle frame (index 5 of 10" in note for note in got.notes)
    tagged = copy.deepcopy(ds)
    tagged.WindowCenter, tagged.WindowWidth = 600, 1200
    np.testing.assert_allclose(decode(tagged).pixels, _reference(tagged), atol=2e-6)
    other = pixel_array(ds, index=0)
    assert not np.array_equal(pixel_array(ds, index=5), other)


def test_colour_becomes_bt601_luminance() -> None:
    ds = _load("US1_UNCR.dcm")
    got = decode(ds)
    rgb = pixel_array(ds).astype(np.float64)
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    assert np.abs(got.pixels - luma).max() <= 0.5 / 255 + 1e-6
    assert any(note.startswith("colour") for note in got.notes)


def test_palette_colour_becomes_luminance() -> None:
    ds = _load("OT-PAL-8-face.dcm")
    got = decode(ds)
    rgb = apply_color_lut(pixel_array(ds), ds).astype(np.float64)
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 65535.0
    assert np.abs(got.pixels - luma).max() < 1e-4
    assert "colour (PALETTE COLOR): converted to luminance" in got.notes


def test_decode_leaves_the_dataset_unchanged() -> None:
    ds = _load("MR_small.dcm")
    ds.WindowCenter, ds.WindowWidth = "600", "1600"
    before = copy.deepcopy(ds)
    decode(ds)
    assert ds == before
    assert ds.file_meta == before.file_meta


def test_decode_memory_stays_near_the_output_size() -> None:
    rows = columns = 2048
    img = (np.arange(rows * columns, dtype=np.uint32) % 4096).astype(np.uint16).reshape(rows, -1)
    ds = _native(img, BitsStored=12, HighBit=11, WindowCenter=2000, WindowWidth=3000)
    output_bytes = rows * columns * 4
    tracemalloc.start()
    try:
        got = decode(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.pixels.nbytes == output_bytes
    # the decoded uint16 frame (0.5x) + the float32 output (1x) + small lookup tables
    assert peak < 2.0 * output_bytes


# --------------------------------------------------------------------------- refusals


def _huge_claim(encapsulated: bool) -> Dataset:
    ds = _native(np.zeros((2, 2), np.uint16))
    ds.Rows = ds.Columns = 65535
    if encapsulated:
        ds.file_meta.TransferSyntaxUID = dicom_uid.JPEG2000Lossless
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
        ds["PixelData"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("encapsulated", [False, True])
def test_huge_dimensions_are_refused_without_decoding(encapsulated: bool) -> None:
    ds = _huge_claim(encapsulated)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            prepare(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "image is 65535 x 65535 pixels, larger than the 16384 limit"
    assert str(info.value) == info.value.reason
    assert peak < 1_000_000  # 65535^2 uint16 would be 8.6 GB


def test_read_dataset_refuses_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.dcm"
    _huge_claim(False).save_as(path, enforce_file_format=False)
    with pytest.raises(ImageError, match="65535 x 65535"):
        read_dataset(path)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Rows": 10000, "Columns": 10000}, "more than the 64 megapixel limit"),
        ({"NumberOfFrames": 100000}, "claims 100000 frames"),
        ({"SamplesPerPixel": 4}, "4 samples per pixel"),
        ({"BitsAllocated": 12}, "12 bits per pixel"),
        ({"BitsStored": 17}, "17 bits stored in 16 bits allocated"),
        ({"Rows": None}, "lacks Rows"),
        ({"Columns": 0}, "it has no pixels"),
        ({"PhotometricInterpretation": None}, "lacks Photometric Interpretation"),
        ({"PixelData": None}, "no pixel data"),
    ],
)
def test_header_refusals_have_plain_reasons(change: dict[str, object], reason: str) -> None:
    ds = _native(np.zeros((4, 4), np.uint16))
    for key, value in change.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    with pytest.raises(ImageError) as info:
        check_dimensions(ds)
    assert reason in info.value.reason
    with pytest.raises(ImageError):
        decode(ds)


def test_missing_pixel_data_reason_is_exact() -> None:
    with pytest.raises(ImageError) as info:
        read_dataset(_path("rtplan.dcm"))
    assert info.value.reason == "no pixel data"


def test_truncated_and_corrupt_pixel_data_are_image_errors() -> None:
    with pytest.raises(ImageError, match="incomplete"):
        decode(_load("MR_truncated.dcm"))
    ds = _load("RG3_J2KR.dcm")
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x13" * 500])
    with pytest.raises(ImageError, match="could not be decoded") as info:
        decode(ds)
    assert info.value.__cause__ is not None


def test_twelve_bit_lossy_jpeg_needs_dcmtk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # gdcm and Pillow refuse 12-bit JPEG Extended and the GPL pylibjpeg-libjpeg is not used:
    # DCMTK's dcmdjpeg decodes it when installed (tests/test_edge.py compares its pixels)
    if shutil.which("dcmdjpeg"):
        image = decode(_load("JPGExtended.dcm"))
        assert (image.rows, image.columns) == (1024, 256)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="12-bit lossy JPEG"):
        decode(_load("JPGExtended.dcm"))


def test_read_dataset_refuses_a_non_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(3).bytes(4000))
    with pytest.raises(ImageError):
        read_dataset(path)


# --------------------------------------------------------------------------- VinDr style files


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("layout", ["meta", "no_meta", "missing_ts", "broken_ts", "wrong_ts"])
def test_vindr_style_file_is_read_as_it_is(tmp_path: Path, layout: str, photometric: str) -> None:
    arr = _phantom()
    ds = _vindr_like(arr, photometric)
    path = tmp_path / "image.dicom"
    if layout == "no_meta":
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    else:
        if layout == "missing_ts":
            del ds.file_meta.TransferSyntaxUID
        elif layout == "broken_ts":
            ds.file_meta.TransferSyntaxUID = dicom_uid.UID("1.2.3.4")
        elif layout == "wrong_ts":
            ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)

    read = read_dataset(path)
    assert "SOPClassUID" not in read and "Modality" not in read
    assert len(read.SOPInstanceUID) == 32
    assert read.file_meta.TransferSyntaxUID == dicom_uid.JPEG2000Lossless
    prepared = prepare(read)
    # Lossless: identical to the same pixels sent uncompressed.
    plain = _native(arr, BitsStored=12, HighBit=11, WindowCenter=1800, WindowWidth=2600)
    plain.PhotometricInterpretation = photometric
    np.testing.assert_array_equal(prepared.source.pixels, decode(plain).pixels)
    assert prepared.source.photometric == photometric
    assert prepared.triage.shape == (384, 384) and prepared.detect.shape == (640, 640)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
        "JPEG2000.dcm",  # JPEG 2000 lossy
        "RG3_J2KR.dcm",  # JPEG 2000 lossless
        "MR_small_RLE.dcm",  # RLE
        "MR_small_bigendian.dcm",  # native big endian
    ],
)
def test_missing_transfer_syntax_is_inferred_from_the_data(name: str) -> None:
    expected = decode(_load(name)).pixels
    ds = _load(name)
    del ds.file_meta.TransferSyntaxUID
    got = decode(ds)
    assert any(note.startswith("transfer syntax missing: inferred") for note in got.notes)
    np.testing.assert_array_equal(got.pixels, expected)


# --------------------------------------------------------------------------- enhancement


def _block_std(image: np.ndarray, block: int = 16) -> float:
    rows, columns = (s - s % block for s in image.shape)
    tiles = image[:rows, :columns].reshape(rows // block, block, columns // block, block)
    return float(tiles.std(axis=(1, 3)).mean())


def test_clahe_range_dtype_and_local_contrast() -> None:
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:256, 0:256]
    image = (0.4 + 0.2 * y / 255 + 0.02 * np.sin(x / 3.0) + rng.normal(0, 0.005, x.shape)).astype(
        np.float32
    )
    out = clahe(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert _block_std(out) > 2.0 * _block_std(image)
    stronger = clahe(image, clip_limit=4.0)
    assert _block_std(stronger) > _block_std(out)
    np.testing.assert_array_equal(clahe(image), out)  # deterministic


def test_resize_square_is_area_averaging() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4) / 15
    out = resize_square(image, 2)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, image.reshape(2, 2, 2, 2).mean(axis=(1, 3)), atol=1e-6)
    assert resize_square(np.zeros((300, 500)), 384).shape == (384, 384)


def test_letterbox_geometry_and_box_round_trip() -> None:
    image = np.full((300, 500), 0.9, dtype=np.float32)
    boxed, geometry = letterbox(image, 640)
    assert boxed.dtype == np.float32 and boxed.shape == (640, 640)
    assert geometry == Letterbox(
        scale=1.28, pad_x=0.0, pad_y=128.0, size=640, source_shape=(300, 500)
    )
    np.testing.assert_allclose(boxed[:128], 114 / 255)
    np.testing.assert_allclose(boxed[512:], 114 / 255)
    np.testing.assert_allclose(boxed[128:512], 0.9, atol=1e-6)
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, [500, 300], (20, 2))
    boxes = np.hstack([xy, xy + rng.uniform(1, 50, (20, 2))])
    boxes[:, 2:] = np.minimum(boxes[:, 2:], [500, 300])
    np.testing.assert_allclose(geometry.to_source(geometry.to_letterbox(boxes)), boxes, atol=1e-9)
    outside = geometry.to_source(np.array([[-10.0, 0.0, 700.0, 640.0]]))
    np.testing.assert_allclose(outside, [[0.0, 0.0, 500.0, 300.0]])
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        geometry.to_source(np.zeros((3, 5)))


@pytest.mark.parametrize("shape", [(1955, 1841), (300, 800), (333, 211)])
def test_letterbox_matches_ultralytics(shape: tuple[int, int]) -> None:
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import scale_boxes

    ours, geometry = letterbox(np.ones(shape, dtype=np.float32), 640)
    theirs = LetterBox(new_shape=(640, 640), auto=False, scaleup=True, center=True)(
        image=np.full((*shape, 3), 255, dtype=np.uint8)
    )
    np.testing.assert_array_equal(ours == np.float32(114 / 255), np.asarray(theirs)[..., 0] == 114)
    boxes = np.array([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 640.0, 640.0]])
    expected = np.asarray(scale_boxes((640, 640), boxes.copy(), shape))
    np.testing.assert_allclose(geometry.to_source(boxes), expected, atol=1e-3)


# --------------------------------------------------------------------------- entry points


def test_prepare_outputs_and_agreement_with_prepare_array() -> None:
    ds = _load("RG3_J2KR.dcm")
    params = PrepParams(triage_size=64, detect_size=96)
    prepared = prepare(ds, params)
    assert prepared.enhanced.shape == prepared.source.pixels.shape == (1760, 1760)
    for name, shape in (("enhanced", (1760, 1760)), ("triage", (64, 64)), ("detect", (96, 96))):
        array = getattr(prepared, name)
        assert array.dtype == np.float32 and array.shape == shape
        assert array.min() >= 0.0 and array.max() <= 1.0
    from_array = prepare_array(prepared.source.pixels, params)
    np.testing.assert_array_equal(from_array.enhanced, prepared.enhanced)
    np.testing.assert_array_equal(from_array.triage, prepared.triage)
    np.testing.assert_array_equal(from_array.detect, prepared.detect)
    assert from_array.letterbox == prepared.letterbox
    assert from_array.source.photometric == "MONOCHROME2"


def test_default_params_follow_the_spec() -> None:
    assert PrepParams() == imaging.DEFAULT_PARAMS
    assert (PrepParams().triage_size, PrepParams().detect_size) == (384, 640)
    assert (PrepParams().clip_limit, PrepParams().tiles) == (2.0, 8)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: prepare_array(np.full((8, 8), 1.5, np.float32)), ValueError),
        (lambda: prepare_array(np.full((8, 8), np.nan, np.float32)), ValueError),
        (lambda: prepare_array(np.zeros((8, 8), np.uint8)), TypeError),
        (lambda: prepare_array(np.zeros((8, 8, 3), np.float32)), ValueError),
        (lambda: prepare_array([[0.0]]), TypeError),  # type: ignore[arg-type]
        (lambda: PrepParams(triage_size=0), ValueError),
        (lambda: PrepParams(tiles="8"), TypeError),  # type: ignore[arg-type]
        (lambda: PrepParams(clip_limit=True), TypeError),
        (lambda: PrepParams(clip_limit=-1.0), ValueError),
        (lambda: clahe(np.zeros((8, 8), np.float32), tiles=0), ValueError),
        (lambda: resize_square(np.zeros((8, 8), np.float32), 0), ValueError),
        (lambda: letterbox(np.zeros((8, 8), np.float32), 64, fill=float("nan")), ValueError),
        (lambda: decode("not a dataset"), TypeError),  # type: ignore[arg-type]
        (lambda: read_dataset(42), TypeError),  # type: ignore[arg-type]
        (lambda: prepare(Dataset(), params="fast"), TypeError),  # type: ignore[arg-type]
        (lambda: ImageError(""), TypeError),
    ],
)
def test_bad_arguments_raise_named_errors(call: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()  # type: ignore[operator]


def test_rle_with_empty_offset_table_and_delimiter_bytes_in_a_fragment_decodes_exactly() -> None:
    """pydicom#1140: FE FF DD E0 inside RLE data must not end the pixel data early."""
    from pydicom.encaps import encapsulate, generate_frames

    stored = (np.arange(256 * 96, dtype=np.uint32).reshape(256, 96) * 7 % 4096).astype(np.uint16)
    for row in (10, 100, 200):
        stored[row, 40:44] = [0x03FE, 0x05FF, 0x07DD, 0x09E0]
    ds = _native(stored)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    plain = decode(copy.deepcopy(ds)).pixels
    ds.compress(dicom_uid.RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert b"\xfe\xff\xdd\xe0" in frame
    ds.PixelData = encapsulate([frame], has_bot=False)
    ds["PixelData"].is_undefined_length = True
    np.testing.assert_array_equal(decode(ds).pixels, plain)


def test_without_pixels_copies_the_header_and_leaves_the_dataset_whole() -> None:
    """The worker's header copy (for the SR helper and failure reports) must not take the pixel
    data from the dataset it still decodes; raw elements read back in their own encoding."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # explicit VR, ISO_IR 100
    header = imaging.without_pixels(ds)
    assert "PixelData" in ds and "PixelData" not in header
    assert header.original_encoding == ds.original_encoding
    assert header.original_character_set == ds.original_character_set
    assert header.file_meta is ds.file_meta
    assert str(header.PatientName) == str(ds.PatientName)
    assert len(header) == len(ds) - 1
    with pytest.raises(TypeError, match="ds must be a pydicom Dataset"):
        imaging.without_pixels({"PixelData": b""})  # type: ignore[arg-type]


def test_compact_preparation_hands_on_the_same_pixels_at_8_bits() -> None:
    """The node's preparation (prepare_compact) gives the models the same inputs, the overlay
    the same 8-bit pixels and the grader the same enhanced values, in a quarter of the bytes."""
    from pydicom.data import get_testdata_file

    from spine_node.models.grader import crop_box
    from spine_node.results.overlay import render_overlay
    from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # 16-bit, windowed
    full = prepare(ds, PrepParams(triage_size=64, detect_size=96))
    small = imaging.prepare_compact(ds, PrepParams(triage_size=64, detect_size=96))
    assert small.source.pixels.dtype == small.enhanced.dtype == np.uint8
    np.testing.assert_array_equal(small.source.pixels, imaging.to_uint8(full.source.pixels))
    np.testing.assert_array_equal(imaging.unit_float(small.enhanced), full.enhanced)  # bit for bit
    np.testing.assert_array_equal(small.triage, full.triage)
    np.testing.assert_array_equal(small.detect, full.detect)
    assert small.letterbox == full.letterbox
    box = (10.0, 12.0, 40.0, 44.0)
    np.testing.assert_array_equal(crop_box(small.enhanced, box, 32), crop_box(full.enhanced, box, 32))
    result = CascadeResult(sop_instance_uid=str(ds.SOPInstanceUID), status=Status.POSITIVE,
                           score=0.9, threshold=0.5, findings=(Finding("Osteophytes", 0.8, box),))
    model = ModelInfo(name="m", version="1")
    np.testing.assert_array_equal(render_overlay(small.source.pixels, result, model),
                                  render_overlay(full.source.pixels, result, model))
    with pytest.raises(TypeError, match="params must be PrepParams"):
        imaging.prepare_compact(ds, {})  # type: ignore[arg-type]

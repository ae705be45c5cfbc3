"""Grey values as DCMTK renders them: a corpus of LUT / window encodings found in the field.

Every variant is generated here (no committed binaries), written as a DICOM file, rendered by
DCMTK ``dcm2pnm`` (16-bit PNG) with the VOI choice the node makes for it, and compared with
the node's display image before CLAHE (:func:`spine_node.imaging.decode`): correlation >= 0.99
and mean absolute difference <= 2 % of the display range. Every variant must also pass the
gate and the cascade of the demo bundle (never "not processed").

Run with ``-s`` to see the agreement table.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from spine_node.imaging import ImageError, decode, read_lut
from training.phantom import PhantomSpec, render_phantom_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DX = "1.2.840.10008.5.1.4.1.1.1.1"
MIN_CORRELATION = 0.99
MAX_MAD = 0.02  # of the display range


def _phantom() -> np.ndarray:
    """A small AP spine phantom, 12-bit values, bone bright."""
    pixels, _ = render_phantom_image(
        np.random.default_rng(9), PhantomSpec(rows=384, columns=256, view="ap")
    )
    return pixels.astype(np.uint16)


PX12 = _phantom()


def _image(pixels: np.ndarray, *, bits_stored: int = 12, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Render^Test", "RENDER"
    ds.Modality, ds.BodyPartExamined = "DX", "LSPINE"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _lut_item(descriptor: list[int], data: bytes | list[int], *, vr: str = "OW") -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)
    item.add_new(0x00283006, vr, data)
    return item


def _curve(entries: int, bits: int, gamma: float = 0.8) -> np.ndarray:
    v = np.arange(entries, dtype=np.float64) / (entries - 1)
    return np.rint(((1 << bits) - 1) * v**gamma).astype(np.uint16)


def _words(values: np.ndarray) -> bytes:
    return values.astype("<u2").tobytes()


def _voi(ds: Dataset, *items: Dataset) -> Dataset:
    ds.VOILUTSequence = Sequence(list(items))
    return ds


def _implicit(ds: Dataset) -> Dataset:
    """``ds`` to be written in Implicit VR Little Endian (LUT Data VR then comes from the reader)."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _mlut(ds: Dataset, item: Dataset) -> Dataset:
    item.add_new(0x00283004, "LO", "US")
    ds.ModalityLUTSequence = Sequence([item])
    return ds


def _log_curve(entries: int, bits: int) -> np.ndarray:
    v = np.arange(entries, dtype=np.float64)
    top = (1 << bits) - 1
    knee = entries / 16.0
    return np.rint(top * np.log1p(v / knee) / np.log1p((entries - 1) / knee)).astype(np.uint16)


def _fitted(ds: Dataset, item: Dataset, stored: np.ndarray, curve: np.ndarray) -> Dataset:
    """``ds`` with a Modality LUT and the window a modality would set on its output (1-99 %)."""
    first = int(item.LUTDescriptor[1])
    if first >= 1 << 15 and stored.dtype.kind == "i":
        first -= 1 << 16
    mapped = curve[np.clip(stored.astype(np.int64) - first, 0, curve.size - 1)]
    low, high = np.percentile(mapped, [1, 99])
    ds.WindowCenter, ds.WindowWidth = round((low + high) / 2), max(2, round(high - low))
    return _mlut(ds, item)


def _mlut_window(stored: np.ndarray, descriptor: list[int], curve: np.ndarray, *,
                 packed: bool = False, bits_stored: int = 12, **attrs: object) -> Dataset:
    data = curve.astype(np.uint8).tobytes() if packed else _words(curve)
    return _fitted(_image(stored, bits_stored=bits_stored, **attrs),
                   _lut_item(descriptor, data), stored, curve)


def _mlut_voi() -> Dataset:
    """Modality LUT (12 bit) then a VOI LUT that is a ramp over the output's 1-99 % range."""
    curve = _log_curve(4096, 12)
    mapped = curve[PX12]
    low, high = (int(v) for v in np.percentile(mapped, [1, 99]))
    ramp = np.rint(np.linspace(0, 65535, high - low + 1)).astype(np.uint16)
    ds = _mlut(_image(PX12), _lut_item([4096, 0, 12], _words(curve)))
    return _voi(ds, _lut_item([ramp.size, low, 16], _words(ramp)))


def _signed() -> np.ndarray:
    return (PX12.astype(np.int32) - 2048).astype(np.int16)


def _wide16() -> np.ndarray:
    return (PX12.astype(np.uint32) * 16 + 7).astype(np.uint16)


def _high16() -> np.ndarray:
    return (PX12.astype(np.uint32) + 32768).astype(np.uint16)


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[], Dataset]
    dcmtk: tuple[str, ...]  # dcm2pnm VOI options giving the node's choice


W = {"WindowCenter": 1800, "WindowWidth": 2400}

VARIANTS = [
    Variant("window LINEAR", lambda: _image(PX12, **W), ("+Wi", "1")),
    Variant("window LINEAR_EXACT", lambda: _image(PX12, VOILUTFunction="LINEAR_EXACT", **W),
            ("+Wi", "1")),
    Variant("window SIGMOID", lambda: _image(PX12, VOILUTFunction="SIGMOID", **W),
            ("+Wi", "1", "+Wfs")),
    Variant("window, several (first used)",
            lambda: _image(PX12, WindowCenter=[1800, 900], WindowWidth=[2400, 600]), ("+Wi", "1")),
    Variant("MONOCHROME1 + window",
            lambda: _image(4095 - PX12, PhotometricInterpretation="MONOCHROME1", **W),
            ("+Wi", "1")),
    Variant("MONOCHROME1 + shape INVERSE",
            lambda: _image(4095 - PX12, PhotometricInterpretation="MONOCHROME1",
                           PresentationLUTShape="INVERSE", **W), ("+Wi", "1")),
    Variant("MONOCHROME2 + shape INVERSE",
            lambda: _image(4095 - PX12, PresentationLUTShape="INVERSE", **W), ("+Wi", "1")),
    Variant("8-bit pixels + window",
            lambda: _image((PX12 >> 4).astype(np.uint8), bits_stored=8, WindowCenter=112,
                           WindowWidth=150), ("+Wi", "1")),
    Variant("signed pixels + rescale + window",
            lambda: _image(_signed(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-1000,
                           WindowWidth=2400), ("+Wi", "1")),
    Variant("rescale slope 2 + window",
            lambda: _image(PX12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2600,
                           WindowWidth=4800), ("+Wi", "1")),
    Variant("rescale slope 0 (identity)",
            lambda: _image(PX12, RescaleSlope=0, RescaleIntercept=0, **W), ("+Wi", "1")),
    Variant("rescale slope missing (identity)",
            lambda: _image(PX12, RescaleIntercept=500, **W), ("+Wi", "1")),
    Variant("VOI LUT 16 bit", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 16], _words(_curve(4096, 16)))), ("+Wl", "1")),
    Variant("VOI LUT 14 bit", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 14], _words(_curve(4096, 14)))), ("+Wl", "1")),
    Variant("VOI LUT 12 bit", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 12], _words(_curve(4096, 12)))), ("+Wl", "1")),
    Variant("VOI LUT 10 bit", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 10], _words(_curve(4096, 10)))), ("+Wl", "1")),
    Variant("VOI LUT 8 bit, one per word", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 8], _words(_curve(4096, 8)))), ("+Wl", "1")),
    Variant("VOI LUT 8 bit, two per word", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 8], _curve(4096, 8).astype(np.uint8).tobytes())), ("+Wl", "1")),
    Variant("VOI LUT 16 bit declared, 12 bit data", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 16], _words(_curve(4096, 12)))), ("+Wl", "1", "+Mv")),
    Variant("VOI LUT data as US", lambda: _voi(_image(PX12), _lut_item(
        [4096, 0, 16], [int(v) for v in _curve(4096, 16)], vr="US")), ("+Wl", "1")),
    Variant("VOI LUT 65536 entries (descriptor 0)", lambda: _voi(
        _image(_wide16(), bits_stored=16), _lut_item([0, 0, 16], _words(_curve(65536, 16)))),
        ("+Wl", "1")),
    Variant("VOI LUT signed first mapped (-2048 as US)", lambda: _voi(
        _image(_signed()), _lut_item([4096, 0x10000 - 2048, 16], _words(_curve(4096, 16)))),
        ("+Wl", "1")),
    Variant("VOI LUT first mapped 32768, unsigned", lambda: _voi(
        _image(_high16(), bits_stored=16), _lut_item([4096, 32768, 16], _words(_curve(4096, 16)))),
        ("+Wl", "1")),
    Variant("VOI LUT partial range (first 1000)", lambda: _voi(
        _image(PX12), _lut_item([2048, 1000, 16], _words(_curve(2048, 16)))), ("+Wl", "1")),
    Variant("VOI LUT, several items (first used)", lambda: _voi(
        _image(PX12), _lut_item([4096, 0, 16], _words(_curve(4096, 16))),
        _lut_item([4096, 0, 16], _words(_curve(4096, 16)[::-1].copy()))), ("+Wl", "1")),
    Variant("VOI LUT and window both present", lambda: _voi(
        _image(PX12, WindowCenter=500, WindowWidth=300),
        _lut_item([4096, 0, 16], _words(_curve(4096, 16)))), ("+Wl", "1")),
    Variant("VOI LUT + MONOCHROME1", lambda: _voi(
        _image(4095 - PX12, PhotometricInterpretation="MONOCHROME1"),
        _lut_item([4096, 0, 12], _words(_curve(4096, 12)))), ("+Wl", "1")),
    Variant("modality LUT 16 bit + window",
            lambda: _mlut_window(PX12, [4096, 0, 16], _log_curve(4096, 16)), ("+Wi", "1")),
    Variant("modality LUT 12 bit + window",
            lambda: _mlut_window(PX12, [4096, 0, 12], _log_curve(4096, 12)), ("+Wi", "1")),
    Variant("modality LUT 8 bit, one per word + window",
            lambda: _mlut_window(PX12, [4096, 0, 8], _log_curve(4096, 8)), ("+Wi", "1")),
    Variant("modality LUT 8 bit, two per word + window",
            lambda: _mlut_window(PX12, [4096, 0, 8], _log_curve(4096, 8), packed=True),
            ("+Wi", "1")),
    Variant("modality LUT signed first mapped + window",
            lambda: _mlut_window(_signed(), [4096, 0x10000 - 2048, 16], _log_curve(4096, 12)),
            ("+Wi", "1")),
    Variant("modality LUT 65536 entries + window",
            lambda: _mlut_window(_wide16(), [0, 0, 16], _log_curve(65536, 16), bits_stored=16),
            ("+Wi", "1")),
    Variant("modality LUT wins over rescale",
            lambda: _mlut_window(PX12, [4096, 0, 16], _log_curve(4096, 12), RescaleSlope=3,
                                 RescaleIntercept=-500), ("+Wi", "1")),
    Variant("modality LUT 12 bit + VOI LUT ramp", _mlut_voi, ("+Wl", "1")),
    Variant("VOI LUT 8 bit, two per word, Implicit VR", lambda: _implicit(_voi(_image(PX12), _lut_item(
        [4096, 0, 8], _curve(4096, 8).astype(np.uint8).tobytes()))), ("+Wl", "1")),
    Variant("modality LUT 12 bit + window, Implicit VR", lambda: _implicit(
        _mlut_window(PX12, [4096, 0, 12], _log_curve(4096, 12))), ("+Wi", "1")),
]


@pytest.fixture(scope="module")
def dcm2pnm() -> str:
    path = shutil.which("dcm2pnm")
    assert path, "DCMTK dcm2pnm is required (apt install dcmtk)"
    return path


def _render(dcm2pnm: str, path: Path, options: tuple[str, ...]) -> np.ndarray:
    png = path.with_suffix(".png")
    out = subprocess.run([dcm2pnm, "+on2", *options, str(path), str(png)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint16, f"no 16-bit PNG from {options}"
    return image.astype(np.float64) / 65535.0


def _agreement(ours: np.ndarray, dcmtk: np.ndarray) -> tuple[float, float]:
    a, b = ours.astype(np.float64).ravel(), dcmtk.ravel()
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).mean())


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_display_image_matches_dcmtk(variant: Variant, dcm2pnm: str, tmp_path: Path) -> None:
    path = tmp_path / "v.dcm"
    variant.build().save_as(path, enforce_file_format=True)
    ours = decode(dcmread(path)).pixels
    dcmtk = _render(dcm2pnm, path, variant.dcmtk)
    assert ours.shape == dcmtk.shape
    corr, mad = _agreement(ours, dcmtk)
    print(f"\nDCMTK agreement | {variant.name} | dcm2pnm {' '.join(variant.dcmtk)} | "
          f"r = {corr:.5f} | MAD = {100 * mad:.3f} %")
    assert corr >= MIN_CORRELATION, f"{variant.name}: correlation {corr:.4f}"
    assert mad <= MAX_MAD, f"{variant.name}: mean absolute difference {100 * mad:.2f} %"


def test_no_window_uses_a_percentile_range_close_to_dcmtk_histogram_window(
    dcm2pnm: str, tmp_path: Path
) -> None:
    """The node's own rule (0.5-99.5 percentiles) against dcm2pnm's nearest (+Wh 1: 1 %)."""
    path = tmp_path / "plain.dcm"
    _image(PX12).save_as(path, enforce_file_format=True)
    corr, mad = _agreement(decode(dcmread(path)).pixels, _render(dcm2pnm, path, ("+Wh", "1")))
    print(f"\nDCMTK agreement | no VOI (percentiles) | dcm2pnm +Wh 1 | r = {corr:.5f} | "
          f"MAD = {100 * mad:.3f} %")
    assert corr >= MIN_CORRELATION and mad <= MAX_MAD


@pytest.fixture(scope="module")
def cascade():  # type: ignore[no-untyped-def]
    from spine_node.node import demo_bundle_path
    from spine_node.pipeline import Cascade

    return Cascade.load(demo_bundle_path(), device="cpu")


def _refused(cascade, tmp_path: Path, variants: list[Variant]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from spine_node.models.gate import check_tags
    from spine_node.results.types import Status

    datasets = []
    for i, variant in enumerate(variants):
        path = tmp_path / f"v{i}.dcm"
        variant.build().save_as(path, enforce_file_format=True)
        ds = dcmread(path)
        assert check_tags(ds).accepted, (variant.name, check_tags(ds).reason)
        datasets.append(ds)
    results = cascade.analyze(datasets)
    return {v.name: str(r.reason) for v, r in zip(variants, results, strict=True)
            if r.status is Status.NOT_PROCESSED}


def test_no_variant_ends_not_processed(cascade, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # demo-3's gate refused the two 8-bit modality-LUT variants (9.2 > 8.9); demo-4's accepts
    # every variant. How close the demo gate sits to its limits (rendered spines against
    # non-spine films): benchmarks/gate_renderings.py.
    refused = _refused(cascade, tmp_path, list(VARIANTS))
    assert not refused, refused


# --------------------------------------------------------------------------- read_lut details


def test_eight_bit_layouts_give_the_same_table() -> None:
    curve = _curve(4096, 8)
    one = _voi(_image(PX12), _lut_item([4096, 0, 8], _words(curve)))
    packed = _voi(_image(PX12), _lut_item([4096, 0, 8], curve.astype(np.uint8).tobytes()))
    notes: list[str] = []
    a = read_lut(one, "VOILUTSequence", signed_input=False, notes=[])
    b = read_lut(packed, "VOILUTSequence", signed_input=False, notes=notes)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a.data, curve)
    np.testing.assert_array_equal(b.data, curve)
    assert a.bits == b.bits == 8
    assert "VOI LUT: 8-bit entries packed two per word" in notes


def test_first_mapped_value_follows_the_input_sign() -> None:
    ds = _voi(_image(PX12), _lut_item([4096, 0x10000 - 2048, 16], _words(_curve(4096, 16))))
    signed = read_lut(ds, "VOILUTSequence", signed_input=True, notes=[])
    unsigned = read_lut(ds, "VOILUTSequence", signed_input=False, notes=[])
    assert signed is not None and unsigned is not None
    assert signed.first == -2048 and unsigned.first == 63488
    table = signed.apply(np.array([-5000, -2048, 0, 2047, 9000]))
    assert list(table) == [0, 0, int(signed.data[2048]), 65535, 65535]


def test_descriptor_zero_means_65536_entries_and_missing_parts_are_ignored() -> None:
    ds = _voi(_image(_wide16(), bits_stored=16), _lut_item([0, 0, 16], _words(_curve(65536, 16))))
    table = read_lut(ds, "VOILUTSequence", signed_input=False, notes=[])
    assert table is not None and table.data.size == 65536
    broken = _image(PX12)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    broken.VOILUTSequence = Sequence([item])
    notes: list[str] = []
    assert read_lut(broken, "VOILUTSequence", signed_input=False, notes=notes) is None
    assert notes == ["VOI LUT incomplete (descriptor or data missing): ignored"]
    assert decode(broken).pixels.shape == PX12.shape  # falls back to the percentile range
    with pytest.raises(ValueError, match="sequence must be"):
        read_lut(broken, "PaletteLUT", signed_input=False, notes=[])


def test_rescale_slope_zero_is_identity_with_a_note() -> None:
    zero = decode(_image(PX12, RescaleSlope=0, RescaleIntercept=0, **W))
    plain = decode(_image(PX12, **W))
    np.testing.assert_array_equal(zero.pixels, plain.pixels)
    assert "rescale slope 0 is invalid: modality transform ignored" in zero.notes
    missing = decode(_image(PX12, RescaleIntercept=500, **W))
    np.testing.assert_array_equal(missing.pixels, plain.pixels)
    assert "rescale slope missing or unreadable: modality transform ignored" in missing.notes


def test_unusable_lut_is_not_an_image_error() -> None:
    ds = _voi(_image(PX12, **W), _lut_item([4096, 0, 16], b""))
    try:
        got = decode(ds)
    except ImageError as exc:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"unusable VOI LUT made the image unreadable: {exc.reason}")
    np.testing.assert_array_equal(got.pixels, decode(_image(PX12, **W)).pixels)


def test_data_length_and_depth_mismatches_use_the_data() -> None:
    # descriptor says 4096 entries, the data holds 3000 (neither equal nor half): as DCMTK
    short = _voi(_image(PX12), _lut_item([4096, 0, 16], _words(_curve(3000, 16))))
    notes: list[str] = []
    table = read_lut(short, "VOILUTSequence", signed_input=False, notes=notes)
    assert table is not None and table.data.size == 3000
    assert "VOI LUT: descriptor says 4096 entries, data holds 3000: used the data" in notes
    # entries wider than the declared 12 bits: the output range follows the data (16 bits)
    wide = _voi(_image(PX12), _lut_item([4096, 0, 12], _words(_curve(4096, 16))))
    table = read_lut(wide, "VOILUTSequence", signed_input=False, notes=[])
    assert table is not None and table.bits == 16
    np.testing.assert_allclose(decode(wide).pixels,
                               decode(_voi(_image(PX12), _lut_item(
                                   [4096, 0, 16], _words(_curve(4096, 16))))).pixels)

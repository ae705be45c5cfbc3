"""DICOM image to model inputs: the one preparation shared by training and serving.

Pipeline (spec "Image preparation"):

1. :func:`check_dimensions` refuses absurd headers *before* anything is decoded.
2. :func:`decode` decodes one frame with pydicom 3's decoders, then maps stored values to
   display values in ``[0, 1]``: Modality LUT / rescale, then the VOI LUT Sequence (which
   takes priority over Window Center/Width), else the first window, else a robust min-max on
   the 0.5-99.5 percentile range; MONOCHROME1 and Presentation LUT Shape INVERSE are inverted
   so that bone is bright.
3. :func:`clahe` equalises local contrast (OpenCV, clip 2.0, 8x8 tiles).
4. :func:`resize_square` (384 x 384, ``cv2.INTER_AREA``) for triage and :func:`letterbox`
   (640, Ultralytics-style centred padding with 114/255) for detection.

Rules decided here (each one also leaves a line in :attr:`SourceImage.notes` when it fires):

* Multi-frame: the middle frame (index ``n // 2``, counting from 0) is used; only that frame
  is decoded. For tomosynthesis or cine sequences the middle frame is the most representative;
  first frames are often ramp-up or scout frames.
* Colour (RGB, YBR_*, PALETTE COLOR): converted to luminance with the ITU-R BT.601 weights
  (0.299 R + 0.587 G + 0.114 B, those of DICOM YBR_FULL) and scaled by the largest value the
  samples can hold; no windowing or inversion applies to colour.
* Modality LUT and VOI LUT Sequences are read by :func:`read_lut` (the node's own reader, as
  DCMTK's dcmimgle reads them; pydicom's helpers fail on several field encodings): the first
  item is used; 8 to 16 bits per entry; 8-bit entries one per word or packed two per word;
  descriptor 0 = 65536 entries; the first mapped value read signed or unsigned as the input
  is. A Modality LUT wins over Rescale Slope/Intercept; rescale needs both values; a slope of
  0 or an unreadable one leaves the values unchanged, with a note (DCMTK does the same).
* VOI LUT output is scaled to ``[0, 1]`` by ``2**bits - 1``, ``bits`` taken from the data
  (DCMTK ``--ignore-vlut-depth``: a LUT that declares 16 bits but holds 12-bit values still
  spans the display). When both a VOI LUT and a window are present, the VOI LUT is used (as
  ``dcm2pnm +Wl 1``; dcm2pnm applies neither unless told).
* Window: the first Window Center/Width pair is used with the VOI LUT Function (LINEAR,
  LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2); the result equals pydicom's
  ``apply_windowing`` scaled to ``[0, 1]``.
* Inversion: MONOCHROME1 *or* Presentation LUT Shape INVERSE inverts once (a DX MONOCHROME1
  image that also says INVERSE is inverted once, not twice).
* CLAHE runs on an 8-bit quantisation (``round(255 x)``) of the ``[0, 1]`` image: OpenCV's
  clip limit is relative to the mean histogram bin count, so clip 2.0 means what it means in
  every published 8-bit pipeline; on a 16-bit quantisation the histogram of a 12-bit image is
  sparse and the same clip limit behaves differently. The output is returned as float32.
* Letterbox: downscaling uses ``cv2.INTER_AREA``, upscaling ``cv2.INTER_LINEAR``.

Performance: integer images of 8 or 16 bits go through a single lookup table built over
every possible stored value (modality, VOI/window and inversion folded together), so the
full-size image is touched by one gather; no Python loop runs per pixel.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import uid as dicom_uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length

from spine_node import codecs

__all__ = [
    "DEFAULT_PARAMS",
    "PIXEL_DATA_KEYWORDS",
    "ImageError",
    "Letterbox",
    "LookupTable",
    "PrepParams",
    "PreparedImage",
    "SourceImage",
    "check_dimensions",
    "clahe",
    "decode",
    "letterbox",
    "prepare",
    "prepare_array",
    "prepare_compact",
    "read_dataset",
    "read_lut",
    "resize_square",
    "to_uint8",
    "unit_float",
    "without_pixels",
]

logger = logging.getLogger(__name__)

#: Percentile range used when the header carries no VOI LUT and no window.
ROBUST_PERCENTILES = (0.5, 99.5)
#: At most this many pixels (a regular sub-grid) are used to estimate the percentiles.
_PERCENTILE_SAMPLES = 1 << 20
#: ITU-R BT.601 luma weights (R, G, B).
_LUMA = (0.299, 0.587, 0.114)
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_BITS_ALLOCATED = frozenset({1, 8, 16, 32})
_WINDOW_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
# Syntaxes for which pydicom's "pylibjpeg" plugin means the GPL pylibjpeg-libjpeg backend.
_LIBJPEG_SYNTAXES = frozenset(dicom_uid.JPEGTransferSyntaxes + dicom_uid.JPEGLSTransferSyntaxes)
_ITEM_TAG = b"\xfe\xff\x00\xe0"
# Arrays up to this size (lookup-table domains) are computed in float64, larger in float32.
_FLOAT64_MAX_SIZE = 1 << 17

FloatArray = npt.NDArray[np.floating[Any]]


class ImageError(ValueError):
    """An image cannot be prepared.

    Parameters
    ----------
    reason : str
        A short sentence a radiologist understands, e.g. ``"no pixel data"``.
    """

    reason: str

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"reason must be a non-empty str, got {reason!r}")
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class SourceImage:
    """A decoded frame in display polarity (bone bright), float32 in ``[0, 1]``.

    Or uint8 ``round(255 v)`` (:func:`to_uint8`): what :func:`prepare_compact`, the node's
    preparation, hands on; the result objects draw at 8 bits, so they show the same pixels.
    """

    pixels: np.ndarray
    rows: int
    columns: int
    photometric: str
    frame: int
    notes: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_image(self.pixels, "pixels", allow_uint8=True)
        if self.pixels.dtype not in (np.float32, np.uint8):
            raise TypeError(f"pixels must be float32 or uint8, got {self.pixels.dtype}")
        if (self.rows, self.columns) != self.pixels.shape:
            raise ValueError(
                f"rows, columns ({self.rows}, {self.columns}) do not match pixels shape "
                f"{self.pixels.shape}"
            )
        if not isinstance(self.photometric, str):
            raise TypeError(f"photometric must be str, got {type(self.photometric).__name__}")
        _check_int(self.frame, "frame", minimum=0)
        if not isinstance(self.notes, tuple) or not all(isinstance(n, str) for n in self.notes):
            raise TypeError(f"notes must be a tuple of str, got {self.notes!r}")


@dataclass(frozen=True)
class Letterbox:
    """Geometry of a letterboxed image, to map boxes between it and the source image.

    ``scale`` is the source-to-letterbox factor; ``pad_x``/``pad_y`` are the left/top
    padding in letterbox pixels; ``source_shape`` is ``(rows, columns)`` of the source.
    Box mapping uses the exact per-axis factors of the resized content (each side is rounded
    to whole pixels), as Ultralytics' ``scale_boxes`` does.
    """

    scale: float
    pad_x: float
    pad_y: float
    size: int
    source_shape: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("scale", "pad_x", "pad_y"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        if self.pad_x < 0 or self.pad_y < 0:
            raise ValueError(f"pad_x/pad_y must be >= 0, got {self.pad_x!r}, {self.pad_y!r}")
        _check_int(self.size, "size", minimum=1)
        shape = self.source_shape
        if not (isinstance(shape, tuple) and len(shape) == 2):
            raise TypeError(f"source_shape must be a (rows, columns) tuple, got {shape!r}")
        for value in shape:
            _check_int(value, "source_shape", minimum=1)

    def _gains(self) -> tuple[float, float]:
        """Per-axis factors of the resized content (each side was rounded to whole pixels)."""
        rows, columns = self.source_shape
        new_w = max(1, round(columns * self.scale))
        new_h = max(1, round(rows * self.scale))
        return new_w / columns, new_h / rows

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``(N, 4)`` xyxy boxes from letterbox pixels to source pixels.

        Parameters
        ----------
        boxes : numpy.ndarray
            ``(N, 4)`` boxes ``x1, y1, x2, y2`` in letterbox pixel coordinates.

        Returns
        -------
        numpy.ndarray
            A new float64 ``(N, 4)`` array in source pixels, clipped to the source image.
        """
        out = _as_boxes(boxes)
        gain_x, gain_y = self._gains()
        out[:, 0::2] -= self.pad_x
        out[:, 1::2] -= self.pad_y
        out[:, 0::2] /= gain_x
        out[:, 1::2] /= gain_y
        rows, columns = self.source_shape
        np.clip(out[:, 0::2], 0.0, float(columns), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(rows), out=out[:, 1::2])
        return out

    def to_letterbox(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``(N, 4)`` xyxy boxes from source pixels to letterbox pixels (not clipped).

        Parameters
        ----------
        boxes : numpy.ndarray
            ``(N, 4)`` boxes ``x1, y1, x2, y2`` in source pixel coordinates.

        Returns
        -------
        numpy.ndarray
            A new float64 ``(N, 4)`` array in letterbox pixels.
        """
        out = _as_boxes(boxes)
        gain_x, gain_y = self._gains()
        out[:, 0::2] *= gain_x
        out[:, 1::2] *= gain_y
        out[:, 0::2] += self.pad_x
        out[:, 1::2] += self.pad_y
        return out


@dataclass(frozen=True)
class PrepParams:
    """Sizes and CLAHE settings of the preparation (defaults from the spec)."""

    triage_size: int = 384
    detect_size: int = 640
    clip_limit: float = 2.0
    tiles: int = 8
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        _check_int(self.triage_size, "triage_size", minimum=1)
        _check_int(self.detect_size, "detect_size", minimum=1)
        _check_clip(self.clip_limit)
        _check_int(self.tiles, "tiles", minimum=1)
        _check_int(self.max_pixels, "max_pixels", minimum=1)


@dataclass(frozen=True)
class PreparedImage:
    """Everything the models need from one image.

    ``enhanced`` is the CLAHE'd full-resolution image, float32 in ``[0, 1]`` from
    :func:`prepare`, or the same values as uint8 (exactly: CLAHE works at 8 bits) from
    :func:`prepare_compact`; :func:`unit_float` gives the float32 form of either.
    """

    source: SourceImage
    enhanced: np.ndarray
    triage: np.ndarray
    detect: np.ndarray
    letterbox: Letterbox


# --------------------------------------------------------------------------- checks


def _check_int(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_clip(clip_limit: object) -> None:
    if isinstance(clip_limit, bool) or not isinstance(clip_limit, int | float):
        raise TypeError(f"clip_limit must be a number, got {clip_limit!r}")
    if not math.isfinite(clip_limit) or clip_limit <= 0:
        raise ValueError(f"clip_limit must be finite and > 0, got {clip_limit!r}")


def _check_image(image: object, name: str, *, allow_uint8: bool = False) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(image).__name__}")
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {image.shape}")
    if image.dtype.kind != "f" and not (allow_uint8 and image.dtype == np.uint8):
        kinds = "floating-point or uint8" if allow_uint8 else "floating-point"
        raise TypeError(f"{name} must be a {kinds} array, got {image.dtype}")
    return image


def _as_boxes(boxes: object) -> np.ndarray:
    if not isinstance(boxes, np.ndarray):
        raise TypeError(f"boxes must be a numpy.ndarray, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
    return np.array(boxes, dtype=np.float64, copy=True)


def _header_int(ds: Dataset, keyword: str, *, required: bool, default: int = 0) -> int:
    """An integer pixel-module attribute, or ImageError naming it in plain words."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        if required:
            raise ImageError(f"image header lacks {_plain(keyword)}")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageError(f"image header has an unreadable {_plain(keyword)}: {value!r}") from None
    if not number.is_integer():
        raise ImageError(f"image header has an unreadable {_plain(keyword)}: {value!r}")
    return int(number)


def _plain(keyword: str) -> str:
    words = {
        "Rows": "Rows (image height)",
        "Columns": "Columns (image width)",
        "NumberOfFrames": "Number of Frames",
        "SamplesPerPixel": "Samples per Pixel",
        "BitsAllocated": "Bits Allocated",
        "BitsStored": "Bits Stored",
        "PixelRepresentation": "Pixel Representation",
    }
    return words.get(keyword, keyword)


def check_dimensions(
    ds: Dataset,
    *,
    max_pixels: int = 64_000_000,
    max_side: int = 16384,
    max_frames: int = 4096,
) -> None:
    """Refuse an image whose header claims too much, before any pixel data is decoded.

    Checks Pixel Data presence, Rows, Columns, Number of Frames, Samples per Pixel, Bits
    Allocated, Bits Stored, Pixel Representation and Photometric Interpretation.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The dataset; only header elements are read.
    max_pixels : int
        Largest ``Rows x Columns`` accepted (one frame).
    max_side : int
        Largest ``Rows`` or ``Columns`` accepted.
    max_frames : int
        Largest Number of Frames accepted.

    Raises
    ------
    ImageError
        With a plain-language ``reason`` (e.g. ``"image is 65535 x 65535 pixels, larger
        than the 16384 limit"``).
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    _check_int(max_pixels, "max_pixels", minimum=1)
    _check_int(max_side, "max_side", minimum=1)
    _check_int(max_frames, "max_frames", minimum=1)
    if "PixelData" not in ds:
        raise ImageError("no pixel data")
    rows = _header_int(ds, "Rows", required=True)
    columns = _header_int(ds, "Columns", required=True)
    if rows < 1 or columns < 1:
        raise ImageError(f"image is {rows} x {columns} pixels: it has no pixels")
    if rows > max_side or columns > max_side:
        raise ImageError(f"image is {rows} x {columns} pixels, larger than the {max_side} limit")
    if rows * columns > max_pixels:
        raise ImageError(
            f"image is {rows} x {columns} pixels ({rows * columns / 1e6:.1f} megapixels), "
            f"more than the {max_pixels / 1e6:g} megapixel limit"
        )
    frames = _header_int(ds, "NumberOfFrames", required=False, default=1)
    if frames < 1:
        raise ImageError(f"image claims {frames} frames")
    if frames > max_frames:
        raise ImageError(f"image claims {frames} frames, more than the {max_frames} limit")
    samples = _header_int(ds, "SamplesPerPixel", required=True)
    if samples not in (1, 3):
        raise ImageError(
            f"image has {samples} samples per pixel; only greyscale (1) or colour (3) "
            "images can be read"
        )
    allocated = _header_int(ds, "BitsAllocated", required=True)
    if allocated not in _BITS_ALLOCATED:
        raise ImageError(f"image uses {allocated} bits per pixel; only 1, 8, 16 or 32 can be read")
    stored = _header_int(ds, "BitsStored", required=True)
    if not 1 <= stored <= allocated:
        raise ImageError(
            f"image header is inconsistent: {stored} bits stored in {allocated} bits allocated"
        )
    representation = _header_int(ds, "PixelRepresentation", required=True)
    if representation not in (0, 1):
        raise ImageError(f"image header has an unknown Pixel Representation {representation}")
    if not str(ds.get("PhotometricInterpretation", "") or "").strip():
        raise ImageError("image header lacks Photometric Interpretation (greyscale or colour)")


# --------------------------------------------------------------------------- transfer syntax


def _is_encapsulated(ds: Dataset) -> bool:
    elem = ds["PixelData"]
    if elem.is_undefined_length:
        return True
    value = elem.value
    if not isinstance(value, bytes | bytearray) or value[:4] != _ITEM_TAG:
        return False
    # Native data could start with these bytes by chance: then its length is exact.
    return len(value) < _native_length(ds)


def _native_length(ds: Dataset) -> int:
    """Bytes that native (uncompressed) pixel data needs, per the header (all frames)."""
    return int(get_expected_length(ds, unit="bytes"))


def _sniff_codec(ds: Dataset) -> dicom_uid.UID | None:
    """Guess the transfer syntax of encapsulated pixel data from its first fragment."""
    try:
        fragments = generate_fragments(ds["PixelData"].value)
        next(fragments)  # Basic Offset Table item
        head = bytes(next(fragments)[:4096])
    except Exception:  # malformed encapsulation: nothing to sniff
        return None
    if head[:4] == b"\xff\x4f\xff\x51" or head[4:12] == b"jP  \r\n\x87\n":
        return _sniff_j2k(head)
    if head[:2] == b"\xff\xd8":
        return _sniff_jpeg(head)
    if len(head) >= 8:
        segments = int.from_bytes(head[:4], "little")
        first = int.from_bytes(head[4:8], "little")
        if 1 <= segments <= 15 and first == 64:
            return dicom_uid.RLELossless
    return None


def _sniff_j2k(head: bytes) -> dicom_uid.UID:
    if head.find(b"\xff\x50") >= 0:  # CAP marker: High-Throughput JPEG 2000
        return dicom_uid.HTJ2K
    cod = head.find(b"\xff\x52")
    if cod >= 0 and len(head) > cod + 13 and head[cod + 13] == 1:  # reversible 5-3 wavelet
        return dicom_uid.JPEG2000Lossless
    return dicom_uid.JPEG2000


def _sniff_jpeg(head: bytes) -> dicom_uid.UID | None:
    i = 2
    while i + 4 <= len(head) and head[i] == 0xFF:
        marker = head[i + 1]
        length = int.from_bytes(head[i + 2 : i + 4], "big")
        if marker == 0xC0:
            return dicom_uid.JPEGBaseline8Bit
        if marker in (0xC1, 0xC2):
            return dicom_uid.JPEGExtended12Bit
        if marker == 0xC3:
            return dicom_uid.JPEGLossless
        if marker == 0xF7:
            return _sniff_jpeg_ls(head, i + 4 + length - 2)
        i += 2 + length
    return None


def _sniff_jpeg_ls(head: bytes, start: int) -> dicom_uid.UID:
    sos = head.find(b"\xff\xda", start)
    if sos >= 0 and len(head) > sos + 5:
        components = head[sos + 4]
        near = sos + 5 + 2 * components
        if len(head) > near and head[near] == 0:
            return dicom_uid.JPEGLSLossless
    return dicom_uid.JPEGLSNearLossless


def _ensure_transfer_syntax(ds: Dataset) -> tuple[dicom_uid.UID, str | None]:
    """Return the transfer syntax, inferring it (and fixing file_meta) when missing/broken."""
    meta = getattr(ds, "file_meta", None)
    declared = meta.get("TransferSyntaxUID") if meta is not None else None
    encapsulated = _is_encapsulated(ds)
    if declared:
        ts = dicom_uid.UID(str(declared).strip())
        if ts in dicom_uid.AllTransferSyntaxes and ts.is_encapsulated == encapsulated:
            return ts, None
        problem = f"transfer syntax {str(declared)!r} is unknown or does not match the data"
    else:
        problem = "transfer syntax missing"
    if encapsulated:
        inferred = _sniff_codec(ds)
        if inferred is None:
            raise ImageError(
                f"pixel data is compressed in a format that could not be recognised ({problem})"
            )
    else:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if little is False:
            inferred = dicom_uid.ExplicitVRBigEndian
        elif implicit:
            inferred = dicom_uid.ImplicitVRLittleEndian
        else:
            inferred = dicom_uid.ExplicitVRLittleEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = inferred
    note = f"{problem}: inferred {inferred.name}"
    logger.info("%s", note)
    return inferred, note


# --------------------------------------------------------------------------- lookup tables


@dataclass(frozen=True)
class LookupTable:
    """A Modality or VOI LUT as read from a LUT Sequence item (PS3.3 C.11.1, C.11.2).

    Parameters
    ----------
    first : int
        First input value mapped (LUT Descriptor value 2, read as signed or unsigned as the
        input requires).
    data : numpy.ndarray
        1-D ``uint16`` table entries (8-bit entries widened to one per element).
    bits : int
        Bits per output entry used to scale a VOI LUT's output to the display range: taken
        from the data (``max(8, bit length of the largest entry)``), as DCMTK's
        ``--ignore-vlut-depth`` does, so a table declaring 16 bits but holding 12-bit values
        still spans the display.

    Notes
    -----
    Input values below ``first`` map to the first entry, values past the last entry to the
    last one (PS3.3 C.11.2.1.1).
    """

    first: int
    data: np.ndarray
    bits: int

    def __post_init__(self) -> None:
        _check_int(self.first, "first", minimum=-(1 << 16))
        if not isinstance(self.data, np.ndarray) or self.data.dtype != np.uint16:
            raise TypeError(f"data must be a uint16 numpy.ndarray, got {self.data!r:.60}")
        if self.data.ndim != 1 or self.data.size < 1:
            raise ValueError(f"data must be a non-empty 1-D array, got shape {self.data.shape}")
        _check_int(self.bits, "bits", minimum=1)
        if self.bits > 16:
            raise ValueError(f"bits must be <= 16, got {self.bits}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map ``values`` (any shape; floats are rounded) through the table.

        Returns
        -------
        numpy.ndarray
            ``uint16`` array of the same shape.
        """
        if values.dtype.kind not in "iu":
            values = np.rint(values)
        index = values.astype(np.int64) - self.first
        np.clip(index, 0, self.data.size - 1, out=index)
        return self.data[index]


def _descriptor(item: Dataset) -> list[int] | None:
    """The three LUT Descriptor values as raw unsigned 16-bit numbers, or None."""
    elem = item.get("LUTDescriptor")
    value = getattr(elem, "value", elem)
    if isinstance(value, bytes | bytearray):  # read as UN / OW: three little-endian words
        value = [int(v) for v in np.frombuffer(bytes(value)[:6], "<u2")]
    if isinstance(value, int | float):
        value = [value]
    try:
        numbers = [int(v) & 0xFFFF for v in value] if value is not None else []
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) >= 3 else None


def _lut_words(item: Dataset, little_endian: bool) -> np.ndarray | None:
    """LUT Data as 16-bit words, whatever VR it was stored with (OW, US, SS, OB)."""
    value = item.get("LUTData")
    value = getattr(value, "value", value)
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)[: len(value) // 2 * 2]
        return np.frombuffer(raw, "<u2" if little_endian else ">u2").astype(np.uint16)
    if isinstance(value, int | float):
        value = [value]
    try:
        return (np.asarray(list(value), dtype=np.int64) & 0xFFFF).astype(np.uint16)
    except (TypeError, ValueError):
        return None


def _little_endian(ds: Dataset) -> bool:
    encoding = getattr(ds, "original_encoding", (None, None))
    if encoding[1] is not None:
        return bool(encoding[1])
    ts = getattr(ds, "file_meta", FileMetaDataset()).get("TransferSyntaxUID")
    return ts != dicom_uid.ExplicitVRBigEndian


def read_lut(
    ds: Dataset, sequence: str, *, signed_input: bool, notes: list[str]
) -> LookupTable | None:
    """Read the first item of a Modality or VOI LUT Sequence the way DCMTK's dcmimgle does.

    Handles what real files carry: 8 to 16 bits per entry (also 10, 12, 14, which PS3.3 does
    not allow for Modality LUTs), 8-bit entries stored one per 16-bit word or packed two per
    word (CP-522), 65536 entries (descriptor value 0), a first mapped value stored as US
    though the input is signed (or the reverse), LUT Data as OW, US or SS, and several items
    (the first is used). A table whose data length disagrees with its descriptor is used
    with the entries present (DCMTK ``DiLookupTable::checkTable``).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The image dataset (its encoding decides the byte order of OW LUT Data).
    sequence : str
        ``"ModalityLUTSequence"`` or ``"VOILUTSequence"``.
    signed_input : bool
        Whether the values the table maps can be negative (Pixel Representation 1 for a
        Modality LUT; a signed modality output for a VOI LUT); decides how the first mapped
        value is read.
    notes : list of str
        Receives a line for every repair or choice made.

    Returns
    -------
    LookupTable or None
        None when the sequence is absent, or when its first item is unusable (a note says why).

    Sources
    -------
    PS3.3 C.11.1.1.1, C.11.2.1.1; DICOM CP-522; DCMTK ``dcmimgle/libsrc/diluptab.cc``.
    """
    if sequence not in ("ModalityLUTSequence", "VOILUTSequence"):
        raise ValueError(
            f"sequence must be ModalityLUTSequence or VOILUTSequence, got {sequence!r}"
        )
    items = ds.get(sequence)
    if not items:
        return None
    name = "modality LUT" if sequence == "ModalityLUTSequence" else "VOI LUT"
    if len(items) > 1:
        notes.append(f"{name}: used the first of {len(items)}")
    item = items[0]
    descriptor = _descriptor(item)
    words = _lut_words(item, _little_endian(ds))
    if descriptor is None or words is None or words.size == 0:
        notes.append(f"{name} incomplete (descriptor or data missing): ignored")
        return None
    entries = descriptor[0] or 1 << 16
    first = descriptor[1]
    if signed_input and first >= 1 << 15:
        first -= 1 << 16
    declared = descriptor[2]
    if words.size == entries:
        data = words
    elif words.size == (entries + 1) // 2:  # 8-bit entries packed two per word (CP-522)
        pairs = np.stack([words & 0xFF, words >> 8], axis=1).ravel()
        data = pairs[:entries].astype(np.uint16)
        notes.append(f"{name}: 8-bit entries packed two per word")
    else:
        notes.append(
            f"{name}: descriptor says {entries} entries, data holds {words.size}: used the data"
        )
        data = words
    allowed = (8, 16) if sequence == "ModalityLUTSequence" else (8, *range(10, 17))
    if declared not in allowed:
        notes.append(f"{name}: {declared} bits per entry declared (not allowed): used the data")
    largest = int(data.max())
    bits = max(8, largest.bit_length())
    return LookupTable(
        first=int(first), data=np.ascontiguousarray(data, dtype=np.uint16), bits=bits
    )


# --------------------------------------------------------------------------- decoding


def _decode_frame(ds: Dataset, ts: dicom_uid.UID, frame: int) -> np.ndarray:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageError(f"images compressed as {ts.name} cannot be decoded here") from None
    if ts.is_encapsulated:
        plugins = [
            name
            for name in decoder.available_plugins
            if not (name == "pylibjpeg" and ts in _LIBJPEG_SYNTAXES)
        ]
        if not plugins:
            raise ImageError(f"no decoder is installed for images compressed as {ts.name}")
    else:
        expected = _native_length(ds)
        actual = len(ds["PixelData"].value or b"")
        if actual < expected:
            raise ImageError(
                f"pixel data is incomplete: {actual} bytes where the header needs "
                f"{expected} (truncated file?)"
            )
        plugins = [""]
    failure: Exception | None = None
    for plugin in plugins:
        try:
            return pixel_array(ds, index=frame, decoding_plugin=plugin)
        except MemoryError:
            raise
        except Exception as exc:  # every decoder failure mode becomes a plain reason
            logger.debug("decoder %r failed on %s: %s", plugin, ts.name, exc)
            failure = exc
    if ts == dicom_uid.JPEGExtended12Bit and _header_int(ds, "BitsStored", required=True) > 8:
        # gdcm and Pillow refuse 12-bit samples: DCMTK's dcmdjpeg when installed
        if codecs.dcmdjpeg_path() is None:
            raise ImageError(
                "12-bit lossy JPEG (JPEG Extended) cannot be decoded here: DCMTK dcmdjpeg "
                "is not installed"
            ) from failure
        try:
            return codecs.decode_jpeg_extended(ds, frame)
        except codecs.CodecError as exc:
            raise ImageError(
                f"12-bit lossy JPEG (JPEG Extended) could not be decoded: {exc}"
            ) from exc
    raise ImageError(
        f"pixel data could not be decoded ({ts.name}): the data is corrupt or unsupported"
    ) from failure


def _first_number(ds: Dataset, keyword: str) -> tuple[float | None, int]:
    value = ds.get(keyword)
    count = 1
    if isinstance(value, MultiValue | list | tuple):
        count = len(value)
        value = value[0] if count else None
    if value is None or value == "":
        return None, 0
    try:
        return float(value), count
    except (TypeError, ValueError):
        return None, count


def _float_copy(values: np.ndarray) -> FloatArray:
    """A float copy to work on in place: float64 for small (LUT) arrays, else float32."""
    dtype = np.float64 if values.size <= _FLOAT64_MAX_SIZE else np.float32
    return values.astype(dtype)


def _modality(values: np.ndarray, ds: Dataset, notes: list[str]) -> tuple[np.ndarray, bool]:
    """Modality LUT or rescale (PS3.3 C.11.1) as DCMTK applies it.

    Returns the modality values and whether they can be negative (how a VOI LUT's first
    mapped value is then read). A Modality LUT Sequence wins over Rescale Slope/Intercept;
    rescale needs both values; a slope of 0 (or an unreadable one) means identity, with a
    note and a warning (DCMTK ``DiMonoModality::checkRescaling``).
    """
    signed = _header_int(ds, "PixelRepresentation", required=False) == 1
    table = read_lut(ds, "ModalityLUTSequence", signed_input=signed, notes=notes)
    if table is not None:
        notes.append("modality LUT applied")
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            notes.append("rescale slope/intercept ignored: the modality LUT is used")
        return table.apply(values), False
    slope, _ = _first_number(ds, "RescaleSlope")
    intercept, _ = _first_number(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        return values, bool(values.size) and float(values.min()) < 0
    if slope is None or intercept is None:
        notes.append(
            f"rescale {'slope' if slope is None else 'intercept'} missing or unreadable: "
            "modality transform ignored"
        )
        logger.warning("%s", notes[-1])
        return values, bool(values.size) and float(values.min()) < 0
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        notes.append(f"rescale slope {slope:g} is invalid: modality transform ignored")
        logger.warning("%s", notes[-1])
        return values, bool(values.size) and float(values.min()) < 0
    if slope == 1.0 and intercept == 0.0:
        return values, bool(values.size) and float(values.min()) < 0
    out = _float_copy(values)
    out *= slope
    out += intercept
    return out, bool(out.size) and float(out.min()) < 0


def _voi_lut(values: np.ndarray, ds: Dataset, signed: bool, notes: list[str]) -> FloatArray | None:
    """VOI LUT Sequence (first item) to ``[0, 1]``: entry / (2**bits - 1), as DCMTK scales it."""
    table = read_lut(ds, "VOILUTSequence", signed_input=signed, notes=notes)
    if table is None:
        return None
    if "WindowCenter" in ds:
        notes.append("VOI LUT used; the window in the header is ignored")
    out = _float_copy(table.apply(values))
    out *= 1.0 / ((1 << table.bits) - 1)
    return out


def _window(ds: Dataset, notes: list[str]) -> tuple[float, float, str] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, n_center = _first_number(ds, "WindowCenter")
    width, _ = _first_number(ds, "WindowWidth")
    if center is None or width is None or not (math.isfinite(center) and math.isfinite(width)):
        notes.append("window in header is unreadable: ignored")
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in _WINDOW_FUNCTIONS:
        notes.append(f"VOI LUT function {function!r} unknown: used LINEAR")
        function = "LINEAR"
    smallest_ok = 1.0 if function == "LINEAR" else math.nextafter(0.0, 1.0)
    if width < smallest_ok:
        notes.append(f"window width {width:g} is unusable: ignored")
        return None
    if n_center > 1:
        notes.append(f"several windows in header: used the first ({center:g}/{width:g})")
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> FloatArray:
    """PS3.3 C.11.2.1.2 windowing straight to [0, 1] (pydicom's apply_windowing, rescaled)."""
    out = _float_copy(values)
    if function == "SIGMOID":
        out -= center
        out *= -4.0 / width
        with np.errstate(over="ignore"):  # exp overflow -> inf -> display value 0
            np.exp(out, out=out)
        out += 1.0
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR":
        center -= 0.5
        width -= 1.0
        if width == 0:  # a step at the centre
            return np.greater(out, center).astype(out.dtype)
    out -= center
    out *= 1.0 / width
    out += 0.5
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _robust_range(values: np.ndarray, counts: np.ndarray | None) -> tuple[float, float]:
    low_q, high_q = ROBUST_PERCENTILES
    if counts is None:
        step = max(1, math.ceil(math.sqrt(values.size / _PERCENTILE_SAMPLES)))
        sample = values[::step, ::step] if values.ndim == 2 else values[::step]
        low, high = np.percentile(sample, [low_q, high_q])
        if high <= low:
            low, high = float(values.min()), float(values.max())
        return float(low), float(high)
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(counts[order])
    total = cumulative[-1]
    picks = np.searchsorted(cumulative, [total * low_q / 100, total * high_q / 100])
    low, high = (float(values[order[min(p, order.size - 1)]]) for p in picks)
    if high <= low:
        present = values[counts > 0]
        low, high = float(present.min()), float(present.max())
    return low, high


def _value_chain(
    values: np.ndarray,
    ds: Dataset,
    invert: bool,
    notes: list[str],
    counts: Callable[[], np.ndarray] | None,
) -> np.ndarray:
    """Modality -> VOI LUT | window | robust range -> inversion, on ``values`` (any shape)."""
    modality, signed = _modality(values, ds, notes)
    out = _voi_lut(modality, ds, signed, notes)
    if out is None:
        window = _window(ds, notes)
        if window is not None:
            out = _apply_window(modality, *window)
        else:
            low, high = _robust_range(modality, None if counts is None else counts())
            notes.append("no window in header: scaled to the 0.5-99.5 percentile range")
            out = _float_copy(modality)
            if high > low:
                out -= low
                out *= 1.0 / (high - low)
                np.clip(out, 0.0, 1.0, out=out)
            else:
                notes.append("image is uniform")
                out[...] = 0.0
    if invert:
        np.subtract(1.0, out, out=out)
    return out


def _monochrome_to_unit(arr: np.ndarray, ds: Dataset, invert: bool, notes: list[str]) -> np.ndarray:
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        # One float32 lookup table over every representable value; one gather per pixel.
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        index = arr.view(unsigned)
        domain = np.arange(1 << (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)

        def counts() -> np.ndarray:
            step = max(1, math.ceil(math.sqrt(index.size / _PERCENTILE_SAMPLES)))
            return np.bincount(index[::step, ::step].ravel(), minlength=domain.size)

        lut = _value_chain(domain, ds, invert, notes, counts).astype(np.float32)
        return lut[index]
    out = _value_chain(arr, ds, invert, notes, None)
    return np.asarray(out, dtype=np.float32)


def _luminance(rgb: np.ndarray, max_value: float) -> np.ndarray:
    if rgb.dtype not in (np.uint8, np.uint16, np.float32):
        rgb = rgb.astype(np.float32)
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)  # BT.601 weights
    out = grey.astype(np.float32)
    out *= np.float32(1.0 / max_value)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def decode(ds: Dataset, *, max_pixels: int = 64_000_000) -> SourceImage:
    """Decode one frame of ``ds`` to a float32 display image in ``[0, 1]``.

    Checks the header first (:func:`check_dimensions`), decodes only the chosen frame
    (the middle one of a multi-frame image), then applies Modality LUT/rescale, VOI LUT
    Sequence or the first window (else a 0.5-99.5 percentile range) and inversion for
    MONOCHROME1 / Presentation LUT Shape INVERSE. Colour becomes BT.601 luminance. A missing
    or unusable Transfer Syntax UID is inferred from the data and written into
    ``ds.file_meta`` (the only change made to ``ds``).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The dataset with Pixel Data.
    max_pixels : int
        Largest ``Rows x Columns`` accepted.

    Returns
    -------
    SourceImage
        The frame, bone bright, with ``notes`` listing every rule that fired.

    Raises
    ------
    ImageError
        When the image cannot be read; ``reason`` says why in plain words.
    """
    check_dimensions(ds, max_pixels=max_pixels)
    notes: list[str] = []
    ts, ts_note = _ensure_transfer_syntax(ds)
    if ts_note:
        notes.append(ts_note)
    frames = _header_int(ds, "NumberOfFrames", required=False, default=1)
    frame = frames // 2
    if frames > 1:
        notes.append(f"multi-frame: used the middle frame (index {frame} of {frames} frames)")
    rows = _header_int(ds, "Rows", required=True)
    columns = _header_int(ds, "Columns", required=True)
    samples = _header_int(ds, "SamplesPerPixel", required=True)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    arr = _decode_frame(ds, ts, frame)
    expected_shape = (rows, columns) if samples == 1 else (rows, columns, samples)
    if arr.shape != expected_shape:
        raise ImageError(
            f"decoded image is {arr.shape} but the header says {expected_shape}: corrupt data"
        )
    if samples == 3:
        stored = _header_int(ds, "BitsStored", required=True)
        pixels = _luminance(arr, float((1 << stored) - 1))
        notes.append(f"colour ({photometric}): converted to luminance")
    elif photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ImageError("palette colour image has an unusable colour table") from exc
        pixels = _luminance(rgb, float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind == "u" else 1)
        notes.append("colour (PALETTE COLOR): converted to luminance")
    elif photometric in _MONOCHROME:
        shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
        invert = photometric == "MONOCHROME1" or shape == "INVERSE"
        if invert:
            notes.append(
                "inverted (MONOCHROME1)"
                if photometric == "MONOCHROME1"
                else "inverted (Presentation LUT Shape INVERSE)"
            )
        pixels = _monochrome_to_unit(arr, ds, invert, notes)
    else:
        raise ImageError(f"photometric interpretation {photometric!r} cannot be read")
    logger.debug("decoded %dx%d %s frame %d: %s", rows, columns, photometric, frame, notes)
    return SourceImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        rows=rows,
        columns=columns,
        photometric=str(ds.PhotometricInterpretation),
        frame=frame,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- enhancement


def clahe(image: np.ndarray, *, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a ``[0, 1]`` image.

    The image is quantised to 8 bits (``round(255 x)``, saturated) for OpenCV, so the clip
    limit has its usual 8-bit meaning; the result is float32 in ``[0, 1]``.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image with values in ``[0, 1]``.
    clip_limit : float
        OpenCV clip limit (relative to the mean bin count of a tile histogram).
    tiles : int
        Number of tiles along each axis.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape with values in ``[0, 1]``.
    """
    _check_image(image, "image")
    _check_clip(clip_limit)
    _check_int(tiles, "tiles", minimum=1)
    return unit_float(_equalise(_quantise(image), clip_limit, tiles))


def _quantise(image: np.ndarray) -> np.ndarray:
    """``round(255 v)`` saturated to uint8 by OpenCV (for values in ``[0, 1]``, all that
    :func:`decode` produces, the same as :func:`to_uint8`, at a quarter of its cost)."""
    return np.asarray(cv2.convertScaleAbs(image, alpha=255.0))


def _equalise(quantised: np.ndarray, clip_limit: float, tiles: int) -> np.ndarray:
    """OpenCV's CLAHE of an 8-bit image (uint8 out)."""
    equaliser = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tiles, tiles))
    return np.asarray(equaliser.apply(quantised))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size x size`` with ``cv2.INTER_AREA`` (aspect ratio not kept).

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image with values in ``[0, 1]`` (the output is clipped to that range).
    size : int
        Output side in pixels.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(size, size)``.
    """
    _check_image(image, "image")
    _check_int(size, "size", minimum=1)
    source = image if image.dtype == np.float32 else image.astype(np.float32)
    out = np.asarray(cv2.resize(source, (size, size), interpolation=cv2.INTER_AREA))
    return np.clip(out, 0.0, 1.0, out=out)  # float rounding can step just past 1


def letterbox(
    image: np.ndarray, size: int = 640, *, fill: float = 114 / 255
) -> tuple[np.ndarray, Letterbox]:
    """Scale to fit ``size x size`` keeping the aspect ratio and pad the rest (centred).

    Geometry follows Ultralytics' ``LetterBox(auto=False, scaleup=True, center=True)``:
    ``r = min(size / rows, size / columns)``, new shape rounded, padding split
    ``round(d - 0.1)`` before and ``round(d + 0.1)`` after.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image with values in ``[0, 1]`` (the resized content is clipped to it).
    size : int
        Output side in pixels.
    fill : float
        Padding value (Ultralytics' grey 114 on the 0-255 scale).

    Returns
    -------
    tuple[numpy.ndarray, Letterbox]
        float32 ``(size, size)`` image and the geometry to map boxes back.
    """
    _check_image(image, "image")
    _check_int(size, "size", minimum=1)
    if isinstance(fill, bool) or not isinstance(fill, int | float) or not math.isfinite(fill):
        raise ValueError(f"fill must be a finite number, got {fill!r}")
    rows, columns = image.shape
    scale = min(size / rows, size / columns)
    new_w = max(1, round(columns * scale))
    new_h = max(1, round(rows * scale))
    source = image if image.dtype == np.float32 else image.astype(np.float32)
    if (new_h, new_w) != (rows, columns):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        source = cv2.resize(source, (new_w, new_h), interpolation=interpolation)
        np.clip(source, 0.0, 1.0, out=source)
    top = round((size - new_h) / 2 - 0.1)
    left = round((size - new_w) / 2 - 0.1)
    out = np.full((size, size), fill, dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = source
    geometry = Letterbox(
        scale=float(scale),
        pad_x=float(left),
        pad_y=float(top),
        size=int(size),
        source_shape=(int(rows), int(columns)),
    )
    return out, geometry


# --------------------------------------------------------------------------- 8-bit forms


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map display values in ``[0, 1]`` to 8 bits: ``round(255 * v)``, clipped to 0..255.

    Rounds half to even (as ``numpy.rint``); NaN gives 0, +inf 255, -inf 0. One float32
    temporary, clipped in place, and OpenCV's rounding conversion: a few ms for 2500 x 2000
    pixels, where ``clip(rint(nan_to_num(v) * 255))`` made five full-size temporaries. A uint8
    array is returned as it is.

    Parameters
    ----------
    pixels : numpy.ndarray
        float, shape (rows, columns), or uint8.

    Returns
    -------
    numpy.ndarray
        uint8, same shape.
    """
    if pixels.dtype == np.uint8:
        return pixels
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.multiply(pixels, np.float32(255.0), dtype=np.float32)
    np.fmax(scaled, 0.0, out=scaled)  # NaN -> 0, negatives -> 0 (convertScaleAbs takes |v|)
    np.minimum(scaled, 255.0, out=scaled)  # +inf -> 255
    return np.asarray(cv2.convertScaleAbs(scaled))  # rounds half to even, as numpy.rint


def unit_float(image: np.ndarray) -> np.ndarray:
    """The float32 ``[0, 1]`` form of a display or enhanced image: uint8 ``k`` -> ``k / 255``
    (as :func:`clahe` scales, so an 8-bit ``enhanced`` gives back the float one bit for bit);
    a float image as float32."""
    if image.dtype == np.uint8:
        return np.multiply(image, np.float32(1.0 / 255.0), dtype=np.float32)
    return np.asarray(image, dtype=np.float32)


# --------------------------------------------------------------------------- entry points

#: The spec's preparation settings (a frozen instance, safe as a default argument).
DEFAULT_PARAMS = PrepParams()


def _finish(source: SourceImage, params: PrepParams, *, compact: bool = False) -> PreparedImage:
    """CLAHE and the model inputs; with ``compact``, the display and enhanced images at 8 bits
    (the quantised display CLAHE starts from and CLAHE's own output: no extra work)."""
    quantised = _quantise(source.pixels)
    equalised = _equalise(quantised, params.clip_limit, params.tiles)
    enhanced = unit_float(equalised)  # = clahe(source.pixels)
    triage = resize_square(enhanced, params.triage_size)
    detect, geometry = letterbox(enhanced, params.detect_size)
    if compact:
        source, enhanced = replace(source, pixels=quantised), equalised
    return PreparedImage(
        source=source, enhanced=enhanced, triage=triage, detect=detect, letterbox=geometry
    )


def prepare(
    ds: Dataset, params: PrepParams = DEFAULT_PARAMS, *, compact: bool = False
) -> PreparedImage:
    """Decode a dataset and build every model input (the one preparation path).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Dataset with Pixel Data (see :func:`decode`).
    params : PrepParams
        Sizes and CLAHE settings.
    compact : bool
        The source frame and the CLAHE'd image at 8 bits (:func:`prepare_compact`).

    Returns
    -------
    PreparedImage
        Source frame, CLAHE'd full-resolution image, triage square and detection letterbox.

    Raises
    ------
    ImageError
        When the image cannot be read.
    """
    if not isinstance(params, PrepParams):
        raise TypeError(f"params must be PrepParams, got {type(params).__name__}")
    return _finish(decode(ds, max_pixels=params.max_pixels), params, compact=compact)


def prepare_compact(ds: Dataset, params: PrepParams = DEFAULT_PARAMS) -> PreparedImage:
    """:func:`prepare` with the two full-resolution images at 8 bits: the node's preparation.

    The models get the same inputs as from :func:`prepare`. ``source.pixels`` is the display
    quantised as CLAHE quantises it (``round(255 v)``: the pixels every result object draws,
    :func:`to_uint8`); ``enhanced`` is CLAHE's 8-bit output, which :func:`unit_float` turns
    back into :func:`prepare`'s float values bit for bit (the Meyerding grader's crop). A
    2500 x 2000 image's prepared arrays are 12 MB instead of 42 MB: what the isolated decoder
    copies to the worker, and what a claimed batch holds in memory.

    Raises
    ------
    ImageError
        When the image cannot be read.
    """
    return prepare(ds, params, compact=True)


def prepare_array(pixels: np.ndarray, params: PrepParams = DEFAULT_PARAMS) -> PreparedImage:
    """Build every model input from a display-ready ``[0, 1]`` greyscale array.

    Parameters
    ----------
    pixels : numpy.ndarray
        2-D float array, bone bright, values in ``[0, 1]`` (as :attr:`SourceImage.pixels`).
    params : PrepParams
        Sizes and CLAHE settings.

    Returns
    -------
    PreparedImage
        With ``source.photometric == "MONOCHROME2"`` and frame 0.
    """
    if not isinstance(params, PrepParams):
        raise TypeError(f"params must be PrepParams, got {type(params).__name__}")
    _check_image(pixels, "pixels")
    rows, columns = pixels.shape
    if rows * columns > params.max_pixels:
        raise ImageError(
            f"image is {rows} x {columns} pixels, more than the "
            f"{params.max_pixels / 1e6:g} megapixel limit"
        )
    low, high = float(pixels.min()), float(pixels.max())
    if not (low >= 0.0 and high <= 1.0):  # also false for NaN
        raise ValueError(f"pixels must lie in [0, 1], got range [{low}, {high}]")
    source = SourceImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        rows=int(rows),
        columns=int(columns),
        photometric="MONOCHROME2",
        frame=0,
        notes=("prepared from an array",),
    )
    return _finish(source, params)


#: Elements holding pixel data (PS3.3 C.7.6.3, C.7.6.3.1.5): what :func:`without_pixels` leaves out.
PIXEL_DATA_KEYWORDS: tuple[str, ...] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def without_pixels(ds: Dataset) -> Dataset:
    """A copy of ``ds``'s header: every element but the pixel data, ``ds`` left as it is.

    The elements themselves are shared (raw ones stay raw), with the file meta information and
    the encoding they were read in. ``Dataset(ds)`` and ``copy.copy(ds)`` would share ``ds``'s
    element dictionary: deleting the pixel data from them deletes it from ``ds``.

    Parameters
    ----------
    ds : pydicom.Dataset
        Any dataset.

    Returns
    -------
    pydicom.Dataset
        The header.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    pixel_tags = {tag_for_keyword(k) for k in PIXEL_DATA_KEYWORDS}
    header = Dataset({tag: element for tag, element in ds.items() if tag not in pixel_tags})
    is_implicit, is_little = ds.original_encoding
    if is_implicit is not None and is_little is not None:
        header.set_original_encoding(is_implicit, is_little, ds.original_character_set)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def read_dataset(path: str | os.PathLike[str], *, max_pixels: int = 64_000_000) -> pydicom.Dataset:
    """Read a DICOM file as it is (``force=True``) and check its header.

    Reads files without file meta, SOP Class UID or Modality and with non-conformant
    "UIDs" (VinDr-SpineXR style). A missing or unusable Transfer Syntax UID is inferred
    from the data (encapsulated codestream signature, else the encoding the file was read
    with) and written into ``file_meta``.

    Parameters
    ----------
    path : str or os.PathLike
        File to read.
    max_pixels : int
        Largest ``Rows x Columns`` accepted.

    Returns
    -------
    pydicom.dataset.Dataset
        The dataset, with a usable ``file_meta.TransferSyntaxUID``.

    Raises
    ------
    ImageError
        If the file is not readable DICOM or its header claims an unreadable image.
    OSError
        If the file cannot be opened.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be str or os.PathLike, got {type(path).__name__}")
    try:
        ds = pydicom.dcmread(os.fspath(path), force=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage input
        raise ImageError("file could not be read as DICOM") from exc
    check_dimensions(ds, max_pixels=max_pixels)
    _ensure_transfer_syntax(ds)
    return ds

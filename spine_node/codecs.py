"""Which transfer syntaxes the node can decode, in the order it prefers them.

The receiver negotiates from this module (:func:`image_transfer_syntaxes`) and the image
decoder falls back to it (:func:`decode_jpeg_extended`) for what pydicom's plugins cannot do,
so "accepted at negotiation" and "decodable in the worker" are one decision.

Preference (PS3.7 D.3.2: the acceptor picks one syntax per presentation context, pynetdicom
takes the first entry of the acceptor's list that the requestor proposed):

1. uncompressed (Explicit VR Little Endian first),
2. lossless compression (JPEG-LS, JPEG 2000, HTJ2K, JPEG lossless, RLE),
3. lossy compression (JPEG-LS near-lossless, JPEG 2000, HTJ2K, JPEG baseline, JPEG extended).

A syntax is offered for images only when a decoder for it is installed: one of pydicom's
pixel-data plugins (the GPL ``pylibjpeg-libjpeg`` backend is not counted for the JPEG and
JPEG-LS syntaxes, as :mod:`spine_node.imaging` never uses it), or for 12-bit lossy JPEG
(JPEG Extended, 1.2.840.10008.1.2.4.51, which gdcm and Pillow refuse at 12 bits) DCMTK's
``dcmdjpeg`` (BSD-style licence) found on ``PATH``. Without ``dcmdjpeg`` JPEG Extended is
refused at negotiation, so a sender falls back to a syntax the node decodes.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.pixels import get_decoder, pixel_array

__all__ = [
    "LOSSLESS",
    "LOSSY",
    "PREFERENCE",
    "UNCOMPRESSED",
    "CodecError",
    "dcmdjpeg_path",
    "decode_jpeg_extended",
    "image_transfer_syntaxes",
    "storage_transfer_syntaxes",
]

logger = logging.getLogger(__name__)

UNCOMPRESSED: tuple[str, ...] = (
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
)
LOSSLESS: tuple[str, ...] = (
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLossless,
    dicom_uid.RLELossless,
)
LOSSY: tuple[str, ...] = (
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000,
    dicom_uid.HTJ2K,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
)
#: Every syntax the node knows how to rank, best first.
PREFERENCE: tuple[str, ...] = UNCOMPRESSED + LOSSLESS + LOSSY

#: pydicom plugins never used for these syntaxes ("pylibjpeg" means GPL libjpeg there).
_GPL_PLUGIN_SYNTAXES = frozenset(dicom_uid.JPEGTransferSyntaxes + dicom_uid.JPEGLSTransferSyntaxes)
#: dcmdjpeg is given this long per image before it is killed.
DCMDJPEG_TIMEOUT_S = 60.0


class CodecError(ValueError):
    """An external decoder failed on an image (the message says why)."""


def dcmdjpeg_path() -> str | None:
    """Return the path of DCMTK's ``dcmdjpeg`` on ``PATH``, or None."""
    return shutil.which("dcmdjpeg")


def _pydicom_decodes(ts: str) -> bool:
    syntax = dicom_uid.UID(ts)
    if not syntax.is_encapsulated:
        return True
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return False
    plugins = [
        p
        for p in decoder.available_plugins
        if not (p == "pylibjpeg" and syntax in _GPL_PLUGIN_SYNTAXES)
    ]
    return bool(plugins)


def image_transfer_syntaxes(dcmdjpeg: str | None = None) -> tuple[str, ...]:
    """Transfer syntaxes accepted for image storage classes, best first.

    Parameters
    ----------
    dcmdjpeg : str or None
        Path of ``dcmdjpeg``; None means "look on ``PATH``" (:func:`dcmdjpeg_path`); pass
        ``""`` to decide as if it were absent.

    Returns
    -------
    tuple of str
        Uncompressed, then lossless, then lossy syntaxes that this process can decode.
        JPEG Extended (4.51) is included only with ``dcmdjpeg`` (12-bit samples).
    """
    tool = dcmdjpeg_path() if dcmdjpeg is None else dcmdjpeg
    out = []
    for ts in PREFERENCE:
        if ts == dicom_uid.JPEGExtended12Bit:
            if tool:
                out.append(ts)
            continue
        if _pydicom_decodes(ts):
            out.append(ts)
    return tuple(out)


def storage_transfer_syntaxes() -> tuple[str, ...]:
    """Transfer syntaxes accepted for objects that are stored but never decoded.

    Non-image objects (SR, presentation states, private classes, ...) are kept as received;
    any syntax pydicom can parse the header of is fine. Ranked by :data:`PREFERENCE`, then
    the rest of pydicom's list in its order.
    """
    rest = [str(ts) for ts in dicom_uid.AllTransferSyntaxes if str(ts) not in PREFERENCE]
    return PREFERENCE + tuple(rest)


_PIXEL_KEYWORDS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
)


def decode_jpeg_extended(
    ds: Dataset, frame: int, *, tool: str | None = None, timeout_s: float = DCMDJPEG_TIMEOUT_S
) -> np.ndarray:
    """Decode one frame of JPEG Extended (4.51) pixel data with DCMTK's ``dcmdjpeg``.

    Only the Image Pixel module is handed to ``dcmdjpeg`` (in a private temporary directory,
    with a made-up SOP Instance UID): no patient data is written for it. Runs wherever it
    is called from; in the node that is the isolated decoder child.

    Parameters
    ----------
    ds : pydicom.Dataset
        Dataset with encapsulated JPEG Extended pixel data.
    frame : int
        Frame index (0-based).
    tool : str, optional
        Path of ``dcmdjpeg`` (default: found on ``PATH``).
    timeout_s : float
        ``dcmdjpeg`` is killed after this long.

    Returns
    -------
    numpy.ndarray
        The decoded frame, as pydicom's ``pixel_array`` gives it for native data.

    Raises
    ------
    CodecError
        ``dcmdjpeg`` is not installed, fails, or times out.
    """
    exe = tool or dcmdjpeg_path()
    if not exe:
        raise CodecError("DCMTK dcmdjpeg is not installed")
    if frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame!r}")
    pixels = Dataset()
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            pixels[keyword] = ds[keyword]
    pixels.SOPClassUID = dicom_uid.SecondaryCaptureImageStorage
    pixels.SOPInstanceUID = dicom_uid.generate_uid()
    pixels.file_meta = FileMetaDataset()
    pixels.file_meta.TransferSyntaxUID = dicom_uid.JPEGExtended12Bit
    pixels.file_meta.MediaStorageSOPClassUID = pixels.SOPClassUID
    pixels.file_meta.MediaStorageSOPInstanceUID = pixels.SOPInstanceUID
    with tempfile.TemporaryDirectory(prefix="spine-dcmdjpeg-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        pixels.save_as(src, enforce_file_format=True)
        try:
            done = subprocess.run(
                [exe, str(src), str(dst)],
                capture_output=True,
                timeout=timeout_s,
                check=False,
                env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
            )
        except subprocess.TimeoutExpired:
            raise CodecError(f"dcmdjpeg did not finish within {timeout_s:g} s") from None
        except OSError as exc:
            raise CodecError(f"dcmdjpeg could not be run: {exc}") from None
        if done.returncode != 0 or not dst.is_file():
            message = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise CodecError(
                f"dcmdjpeg failed (exit {done.returncode}): "
                f"{message[-1] if message else 'no message'}"
            )
        decoded = dcmread(dst)
        return np.asarray(pixel_array(decoded, index=frame))

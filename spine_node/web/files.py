"""Reading the node's own files for the page, never anything outside the data directory."""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from pathlib import Path
from threading import Lock

logger = logging.getLogger(__name__)

#: SOP Class UIDs of the Secondary Capture images the node builds as overlays.
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)


class OutsideDataDir(ValueError):
    """A path resolves outside the data directory (through ``..``, a symlink or an absolute
    name)."""


def inside(root: Path, relative: str | Path, data_dir: Path) -> Path:
    """Join ``relative`` to ``root`` and check the real path stays inside ``data_dir``.

    Parameters
    ----------
    root : pathlib.Path
        The directory the name is relative to (spool or outbox).
    relative : str or pathlib.Path
        A name as stored in the database.
    data_dir : pathlib.Path
        The node's data directory: the resolved path must lie under its resolved path.

    Returns
    -------
    pathlib.Path
        The resolved path (symlinks followed).

    Raises
    ------
    OutsideDataDir
        When the name is absolute, or the resolved path (after ``..`` and symlinks) is not
        under ``data_dir``.
    """
    if Path(relative).is_absolute():
        raise OutsideDataDir(f"absolute name {str(relative)!r} refused")
    resolved = (root / relative).resolve()
    base = data_dir.resolve()
    if not resolved.is_relative_to(base):
        raise OutsideDataDir(f"{str(relative)!r} resolves outside the data directory")
    return resolved


def overlay_png(path: Path, max_side: int) -> bytes | None:
    """A PNG thumbnail of the Secondary Capture overlay stored at ``path``.

    Parameters
    ----------
    path : pathlib.Path
        A result object in the outbox (already checked with :func:`inside`).
    max_side : int
        Longest side of the thumbnail, pixels.

    Returns
    -------
    bytes or None
        The PNG, or None when the file is not a Secondary Capture image.

    Raises
    ------
    OSError
        When the file cannot be read.
    """
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    header = dcmread(path, stop_before_pixels=True)
    if str(header.get("SOPClassUID", "")) not in SECONDARY_CAPTURE_CLASSES:
        return None
    pixels = dcmread(path).pixel_array
    if pixels.ndim == 4 or (pixels.ndim == 3 and header.get("SamplesPerPixel", 1) == 1):
        pixels = pixels[0]  # first frame
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) * (255.0 / max(high - low, 1.0))).astype(np.uint8)
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = 255 - pixels
    image = Image.fromarray(pixels)
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def patient_name(path: Path) -> str | None:
    """Patient's Name of the DICOM file at ``path`` (None when absent or unreadable)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"])
    except Exception as exc:  # a file removed or damaged since: shown as unknown
        logger.debug("patient name not read from %s: %s", path.name, exc)
        return None
    value = ds.get("PatientName")
    return None if value is None else str(value).replace("^", " ").strip() or None


class PngCache:
    """A small least-recently-used cache of thumbnails, keyed by the result objects' UIDs.

    Parameters
    ----------
    size : int
        How many thumbnails are kept.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size!r}")
        self.size = size
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = Lock()

    def get(self, key: str) -> bytes | None:
        """The cached PNG, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        """Keep ``value``; the least recently used entry goes when full."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

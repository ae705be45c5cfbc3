"""Text carried from a source image into result objects: decoded, recovered, cut to VR limits.

Character-set policy (``docs/conformance.md``):

- every result object is written in UTF-8 (``ISO_IR 192``);
- a source value is decoded with the source's Specific Character Set, ISO 2022 code
  extensions included (pydicom's decoder, all PN component groups kept in order);
- bytes that do not decode in the declared character set (the common mislabel: Latin-1
  bytes under ``ISO_IR 192``, or 8-bit bytes under the default repertoire) are recovered
  with the first of UTF-8, Windows-1252 and ISO 8859-1 that decodes them strictly; bytes
  declared ISO 8859-1 (or default) that form valid multi-byte UTF-8 are read as UTF-8 (the
  opposite mislabel; such byte pairs do not occur in Latin-1 names);
- a value never carries U+FFFD or a '?' standing for a lost character; control characters
  are removed (line breaks become spaces);
- length limits are applied to the UTF-8 encoded bytes (``LO`` 64, ``SH`` 16, ``PN`` 64
  per component group), cutting at a character boundary, because validators (dciodvfy)
  and many archives count bytes. A Person Name keeps its family and given names (cut when
  they alone are too long) and drops the middle name, prefix and suffix that do not fit.
"""

from __future__ import annotations

import logging
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS, PersonName

logger = logging.getLogger(__name__)

#: Specific Character Set of every object written.
OUTPUT_CHARACTER_SET = "ISO_IR 192"

#: Maximum UTF-8 bytes per value (per component group for PN).
VR_MAX_BYTES: dict[str, int] = {"PN": 64, "LO": 64, "SH": 16, "CS": 16, "ST": 1024, "LT": 10240}

_ESC = b"\x1b"
#: Tried in order when the declared character set does not decode a value.
FALLBACK_ENCODINGS: tuple[str, ...] = ("utf-8", "cp1252", "latin-1")
_LATIN1_NAMES = {"iso8859", "latin_1", "iso-8859-1", "iso8859_1"}
_PN_COMPONENTS = 5
_PN_KEEP = 2  # family and given names are cut to fit; later components are dropped


@dataclass(frozen=True)
class DecodedText:
    """A decoded source value.

    Attributes
    ----------
    text : str
        The value, without padding.
    recovered_with : str or None
        Python codec used because the declared character set did not decode the bytes
        (None when the declared one did).
    """

    text: str
    recovered_with: str | None = None


def declared_encodings(ds: Dataset) -> list[str]:
    """Return the Python codecs for ``ds``'s Specific Character Set (default repertoire if none).

    Unknown terms fall back to the default repertoire, as pydicom does (its warning is
    silenced: the decoder below recovers what the default cannot decode).
    """
    try:
        value = ds.get("SpecificCharacterSet")
    except Exception:  # an unreadable value counts as absent
        value = None
    terms: list[str]
    if value is None or value == "":
        terms = ["ISO_IR 6"]
    elif isinstance(value, str):
        terms = [value.strip()]
    else:
        terms = [str(v).strip() for v in value]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return convert_encodings(terms)
        except LookupError:
            return convert_encodings(["ISO_IR 6"])


def decode_value(raw: bytes, encodings: Sequence[str], vr: str) -> DecodedText:
    """Decode one encoded value, recovering bytes the declared character set cannot decode.

    Parameters
    ----------
    raw : bytes
        The element's value bytes as received.
    encodings : sequence of str
        Python codecs from :func:`declared_encodings`.
    vr : str
        Value representation; ``PN`` values are decoded group by group.

    Returns
    -------
    DecodedText
        Text without U+FFFD, with the codec used when recovery was needed.
    """
    if not isinstance(raw, bytes):
        raise TypeError(f"raw must be bytes, got {type(raw).__name__}")
    if not encodings:
        raise ValueError("encodings must not be empty")
    raw = raw.rstrip(b"\x00 ")
    if vr == "PN":
        parts = [_decode_part(group, encodings, PN_DELIMS) for group in raw.split(b"=")]
        recovered = next((p.recovered_with for p in parts if p.recovered_with), None)
        return DecodedText("=".join(p.text for p in parts), recovered)
    return _decode_part(raw, encodings, TEXT_VR_DELIMS)


def _decode_part(raw: bytes, encodings: Sequence[str], delimiters: set[int]) -> DecodedText:
    if not raw:
        return DecodedText("")
    declared = _strict_declared(raw, encodings, delimiters)
    if declared is not None:
        return DecodedText(declared)
    for codec in FALLBACK_ENCODINGS:
        try:
            return DecodedText(raw.decode(codec), codec)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")  # pragma: no cover


def _strict_declared(raw: bytes, encodings: Sequence[str], delimiters: set[int]) -> str | None:
    """Decode with the declared character set; None when it does not decode ``raw``."""
    if _ESC in raw and len(encodings) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                text = decode_bytes(raw, list(encodings), delimiters)
            except (UnicodeError, LookupError):
                return None
        return None if "\ufffd" in text else text
    first = encodings[0]
    if first in _LATIN1_NAMES and any(b > 0x7F for b in raw):
        if _is_multibyte_utf8(raw):
            return None  # UTF-8 bytes labelled Latin-1 or default: recovered as UTF-8
        if len(encodings) == 1 and _declared_default(encodings):
            return None  # 8-bit bytes under the 7-bit default repertoire
    try:
        text = raw.decode(first)
    except (UnicodeDecodeError, LookupError):
        return None
    return None if "\ufffd" in text else text


def _declared_default(encodings: Sequence[str]) -> bool:
    # pydicom maps both "ISO_IR 6" (ASCII) and "ISO_IR 100" to a Latin-1 codec; only the
    # caller knows which was declared, so the default is recognised by its codec name.
    return encodings[0] == "iso8859"


def _is_multibyte_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def element_text(ds: Dataset, keyword: str, vr: str) -> DecodedText:
    """Return a text attribute of ``ds`` decoded per the policy above; empty when absent.

    Reads the raw bytes when the element has not been decoded yet (a dataset read with
    ``dcmread``), so that undecodable bytes are recovered rather than replaced.
    """
    try:
        element = ds.get_item(keyword)
    except Exception as exc:  # a broken element counts as absent
        logger.warning("could not read %s from the source: %s", keyword, exc)
        return DecodedText("")
    if element is None:
        return DecodedText("")
    value = element.value
    if isinstance(element, RawDataElement) or isinstance(value, bytes):
        if value is None:
            return DecodedText("")
        return decode_value(bytes(value), declared_encodings(ds), vr)
    if isinstance(element, DataElement) and isinstance(value, PersonName):
        original = getattr(value, "original_string", None)
        if isinstance(original, bytes):
            return decode_value(original, value.encodings or declared_encodings(ds), "PN")
    if value is None:
        return DecodedText("")
    if isinstance(value, str | PersonName):
        text = str(value)
    else:
        text = "\\".join(str(v) for v in value)
    if "\ufffd" in text:
        logger.warning("%s arrived decoded with replacement characters; they are removed", keyword)
        text = text.replace("\ufffd", "")
    return DecodedText(text.rstrip("\x00 "))


def clean_characters(text: str) -> str:
    """Remove control characters and U+FFFD; line breaks and tabs become spaces."""
    out = []
    for char in text:
        if char in "\r\n\t\f":
            out.append(" ")
        elif char == "\ufffd" or unicodedata.category(char) in ("Cc", "Cs", "Co", "Cn"):
            continue
        else:
            out.append(char)
    return "".join(out).strip()


def fit_bytes(text: str, max_bytes: int) -> str:
    """Return the longest prefix of ``text`` whose UTF-8 encoding fits ``max_bytes``.

    The cut is at a character boundary (never inside a multi-byte character), and trailing
    spaces of the prefix are removed.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes!r}")
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore").rstrip()


def clean_string(text: str, vr: str) -> str:
    """Return a valid single value of a string VR (``LO``, ``SH``, ``ST``...) from ``text``.

    Control characters removed, backslash (the value separator) replaced by a space, cut to
    the VR's byte limit at a character boundary.
    """
    try:
        limit = VR_MAX_BYTES[vr]
    except KeyError:
        raise ValueError(f"vr must be one of {tuple(VR_MAX_BYTES)}, got {vr!r}") from None
    value = clean_characters(text)
    if vr != "ST" and vr != "LT":
        value = value.replace("\\", " ")
    return fit_bytes(value, limit)


def clean_person_name(text: str) -> str:
    """Return a valid Person Name (PN) from ``text``.

    At most three component groups (alphabetic, ideographic, phonetic) kept in order, at
    most five components each, each group at most 64 UTF-8 bytes: family and given names
    are cut at a character boundary when they alone are too long; middle name, prefix and
    suffix are dropped whole when they do not fit.
    """
    value = clean_characters(text).replace("\\", " ")
    groups = value.split("=")[:3]
    cleaned = [_fit_group(group) for group in groups]
    return "=".join(cleaned).rstrip("=")


def _fit_group(group: str) -> str:
    limit = VR_MAX_BYTES["PN"]
    components = [c.strip() for c in group.split("^")[:_PN_COMPONENTS]]
    kept: list[str] = []
    for index, component in enumerate(components):
        prefix = "^".join(kept)
        joined = f"{prefix}^{component}" if index else component
        if len(joined.encode("utf-8")) <= limit:
            kept.append(component)
            continue
        if index < _PN_KEEP:
            room = limit - len(prefix.encode("utf-8")) - (1 if index else 0)
            kept.append(fit_bytes(component, max(room, 0)))
        break
    return "^".join(kept).rstrip("^")

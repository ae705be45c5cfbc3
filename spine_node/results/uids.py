"""Deterministic DICOM UIDs for result objects.

Every UID is ``2.25.`` followed by the decimal integer of a name-based UUID (UUID version 5,
SHA-1, ITU-T X.667 / PS3.5 B.2), so it is at most 44 characters long. The name hashed is
built from stable inputs only, so a retry or a re-run produces the same UIDs and a PACS
replaces rather than duplicates an object:

- series UIDs: (Study Instance UID, object kind, bundle identity): all images of a study
  share one result series per kind;
- SOP Instance UIDs: (source SOP Instance UID, object kind, bundle identity);
- study summary SR UIDs: (Study Instance UID, bundle identity, revision);
- tracking UIDs: (source SOP Instance UID, bundle identity, finding key);
- the device observer UID: (manufacturer, device name, bundle identity).

The *bundle identity* is ``bundle_key(model)``: the model bundle name and version, so a new
bundle version produces new objects (the old results stay, for audit).

Identity policy: a source UID is carried *exactly as received* whenever it is usable: at
most 64 characters of digits and dots (``is_usable_uid``), even when it breaks PS3.5 9.1
(leading zeros such as ``.0123``, an odd length): PACS store such UIDs as they are, and
results must land in the same study and reference the same instances. Only an unusable
value (e.g. VinDr's 32-hex identifiers, letters, more than 64 characters) is replaced by a
UID derived deterministically from it (``usable_or_derived``); the SR then says so.
Every UID this module *creates* is a valid ``2.25`` UID.
"""

from __future__ import annotations

import enum
import re
import uuid

from spine_node.results.types import ModelInfo

#: Namespace of every name-based UUID this package derives.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:spine-node:dicom-uid")

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_USABLE_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_SEP = "\x1f"


class ResultKind(str, enum.Enum):
    """Kinds of result object; part of every derived UID."""

    SR = "sr"
    SC = "sc"
    GSPS = "gsps"
    STUDY_SR = "study-sr"
    HEATMAP = "heatmap"


def is_valid_uid(value: object) -> bool:
    """Return True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1).

    Parameters
    ----------
    value : object
        Candidate UID.

    Returns
    -------
    bool
        True for a string of at most 64 characters made of dot-separated numeric
        components without leading zeros.
    """
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.match(value) is not None


def is_usable_uid(value: object) -> bool:
    """Return True when ``value`` can be carried into result objects as it is.

    Parameters
    ----------
    value : object
        Candidate UID, as received (padding already removed).

    Returns
    -------
    bool
        True for a string of at most 64 characters made of at least two dot-separated
        runs of digits; leading zeros and odd lengths are allowed (PS3.5 9.1 forbids the
        former, archives store them anyway).
    """
    return isinstance(value, str) and len(value) <= 64 and _USABLE_RE.match(value) is not None


def uid_from_name(*parts: str) -> str:
    """Return a ``2.25`` UID derived from the given strings.

    Parameters
    ----------
    *parts : str
        Non-empty strings; their order matters.

    Returns
    -------
    str
        ``"2.25." + str(uuid5(NAMESPACE, parts).int)``.
    """
    if not parts:
        raise ValueError("uid_from_name needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"uid_from_name parts must be str, got {type(part).__name__}")
        if not part:
            raise ValueError(f"uid_from_name parts must be non-empty, got {parts!r}")
    return "2.25." + str(uuid.uuid5(NAMESPACE, _SEP.join(parts)).int)


def bundle_key(model: ModelInfo) -> str:
    """Return the bundle identity used in UIDs: ``"<name>/<version>"``, with ``"/r<n>"``
    appended for an analysis revision ``n`` > 1 (a re-sent image with other content)."""
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo, got {type(model).__name__}")
    if not model.name or not model.version:
        raise ValueError(f"model needs a name and a version, got {model.name!r}/{model.version!r}")
    if model.analysis_revision != 1:
        return f"{model.name}/{model.version}/r{model.analysis_revision}"
    return f"{model.name}/{model.version}"


def usable_or_derived(value: object, role: str) -> str:
    """Return ``value`` when it is a usable UID, otherwise a UID derived from it.

    Parameters
    ----------
    value : object
        UID as received (str, pydicom UID, or anything else); NUL and space padding is
        removed first.
    role : str
        What the UID identifies (``"study"``, ``"series"``, ``"instance"``); part of the
        derivation so the same unusable string maps to different UIDs per role.

    Returns
    -------
    str
        The received UID unchanged when ``is_usable_uid``; otherwise a valid ``2.25`` UID.
        Identical input gives identical output.

    Raises
    ------
    ValueError
        When ``value`` is empty (nothing to derive from) or ``role`` is empty.
    """
    if not isinstance(role, str) or not role:
        raise ValueError(f"role must be a non-empty str, got {role!r}")
    text = received_uid(value)
    if is_usable_uid(text):
        return text
    if not text:
        raise ValueError(f"no {role} UID to derive from, got {value!r}")
    return uid_from_name("source-uid", role, text)


def received_uid(value: object) -> str:
    """Return a received UID value without its NUL / space padding (``""`` for None)."""
    return "" if value is None else str(value).strip().rstrip("\x00").strip()


def series_instance_uid(study_instance_uid: str, kind: ResultKind | str, bundle: str) -> str:
    """Return the result series UID for a study, an object kind and a bundle.

    Parameters
    ----------
    study_instance_uid : str
        Study Instance UID of the source as carried (see ``usable_or_derived``).
    kind : ResultKind or str
        Object kind (``"sr"``, ``"sc"``, ``"gsps"``).
    bundle : str
        Bundle identity, ``bundle_key(model)``.

    Returns
    -------
    str
        The series UID shared by every result of that kind in the study.
    """
    return uid_from_name("series", _check_uid(study_instance_uid), ResultKind(kind).value, bundle)


def sop_instance_uid(source_sop_instance_uid: str, kind: ResultKind | str, bundle: str) -> str:
    """Return the SOP Instance UID of the result object of ``kind`` for one source image."""
    return uid_from_name(
        "instance", _check_uid(source_sop_instance_uid), ResultKind(kind).value, bundle
    )


def study_document_uid(study_instance_uid: str, bundle: str, revision: int) -> str:
    """Return the SOP Instance UID of revision ``revision`` (>= 1) of a study's summary SR.

    Each amendment is a new document with a new UID (derived from the study, the bundle
    identity and the revision), as DICOM amends SR documents.
    """
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ValueError(f"revision must be an int >= 1, got {revision!r}")
    return uid_from_name("study-document", _check_uid(study_instance_uid), bundle, str(revision))


def tracking_uid(source_sop_instance_uid: str, bundle: str, key: str) -> str:
    """Return the tracking UID of a finding (``key``, e.g. ``"finding-1"``) in an image."""
    return uid_from_name("tracking", _check_uid(source_sop_instance_uid), bundle, key)


def device_uid(manufacturer: str, device_name: str, bundle: str) -> str:
    """Return the Device Observer UID of this node running a given bundle."""
    return uid_from_name("device", manufacturer, device_name, bundle)


def _check_uid(value: str) -> str:
    if not is_usable_uid(value):
        raise ValueError(f"expected a usable DICOM UID (<= 64 digits and dots), got {value!r}")
    return value

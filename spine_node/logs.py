"""Log output of the node's processes: one line per event on stderr, plain or JSON.

Job-path log calls pass structured fields with ``extra=`` (:data:`LOG_FIELDS`); the formatters
emit them as JSON keys or as ``[key=value ...]`` after a plain line, with Study and SOP Instance
UIDs replaced by a hash unless ``log_phi`` is set. Times are ISO 8601 with the UTC offset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import datetime
from typing import Any

#: Fields a log call may pass with ``extra=``; emitted as JSON keys, or ``[k=v ...]`` in plain lines.
LOG_FIELDS = ("job_id", "send_id", "destination", "study_instance_uid", "sop_instance_uid")
#: Identifiers replaced by ``sha256:<first 16 hex digits>`` unless ``log_phi = true``.
PHI_FIELDS = frozenset({"study_instance_uid", "sop_instance_uid"})


def uid_hash(uid: str) -> str:
    """The logged stand-in for a UID when ``log_phi`` is false: ``sha256:`` + 16 hex digits.

    An administrator finds a study's lines with ``printf %s UID | sha256sum | cut -c1-16``.
    """
    return "sha256:" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def iso_time(created: float) -> str:
    """ISO 8601 local time with its UTC offset, milliseconds (``2026-11-30T15:26:29.123+01:00``)."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def record_fields(record: logging.LogRecord, log_phi: bool) -> dict[str, Any]:
    """The :data:`LOG_FIELDS` a record carries, UIDs hashed unless ``log_phi``."""
    fields: dict[str, Any] = {}
    for name in LOG_FIELDS:
        value = getattr(record, name, None)
        if value is None:
            continue
        if name in PHI_FIELDS and not log_phi:
            value = uid_hash(str(value))
        fields[name] = value
    return fields


class PlainFormatter(logging.Formatter):
    """``TIME LEVEL logger: message [job_id=7 study_instance_uid=sha256:...]``."""

    def __init__(self, log_phi: bool = False) -> None:
        super().__init__()
        self.log_phi = log_phi

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record, self.log_phi)
        text = f"{iso_time(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the :data:`LOG_FIELDS` as keys."""

    def __init__(self, log_phi: bool = False) -> None:
        super().__init__()
        self.log_phi = log_phi

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record, self.log_phi),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool, log_phi: bool = False) -> None:
    """Send one line per event to stderr (journald picks it up under systemd).

    Parameters
    ----------
    level : str
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    as_json : bool
        One JSON object per line instead of plain text.
    log_phi : bool
        Log Study/SOP Instance UIDs as they are instead of their hashes.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(log_phi) if as_json else PlainFormatter(log_phi))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet = max(logging.WARNING, root.level)
    # libraries' INFO lines are noise for an operator (highdicom logs every module it copies)
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running"
    # pydicom warns about every sloppy value it reads (e.g. VinDr's 32-hex "UIDs"); the node
    # handles those and reports what matters per job
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, root.level))

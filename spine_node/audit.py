"""Append-only audit trail of every object received and sent, for the site's records.

One JSON object per line in ``<data_dir>/audit.jsonl`` (:data:`AUDIT_FILE`), written by the
receiver after it answered a C-STORE and by the dispatcher after each delivery attempt. The
file is opened with ``O_APPEND`` and each record is written by one ``write`` call, so the
receiver and dispatcher processes can append to the same file without interleaving lines.
Lines are not fsynced one by one (the database holds the durable state; this file is the
human-readable trail). Nothing in it is ever rewritten; rotate it with logrotate's
``copytruncate`` or by moving it away (the next record creates a new file).

Each record (:class:`AuditRecord`): ``time`` (ISO 8601, UTC), ``direction`` (``received`` or
``sent``), ``peer`` (address, and AE titles when known), ``sop_class_uid``,
``sop_instance_uid``, ``study_instance_uid``, ``outcome`` and ``detail``. No patient names or
other demographics are written.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_FILE", "AuditLog", "AuditRecord", "Direction"]

logger = logging.getLogger(__name__)

#: File name of the audit trail inside ``data_dir``.
AUDIT_FILE = "audit.jsonl"


class Direction(str, enum.Enum):
    """Whether the node received or sent the object."""

    RECEIVED = "received"
    SENT = "sent"


@dataclass(frozen=True)
class AuditRecord:
    """One object received or sent.

    Attributes
    ----------
    time : str
        ISO 8601 timestamp with time zone (UTC).
    direction : Direction
    peer : str
        Peer address (``host:port``).
    calling_ae, called_ae : str
        AE titles of the association.
    sop_class_uid, sop_instance_uid, study_instance_uid : str
        The object's identity ("" when unknown).
    outcome : str
        ``stored``, ``duplicate``, ``own_object``, ``refused`` (receiving); ``sent``,
        ``failed``, ``dead`` (sending).
    detail : str
        Status code, category ("ignored: not an image", "out of scope", "queued") or error.
    """

    time: str
    direction: Direction
    peer: str
    calling_ae: str
    called_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    outcome: str
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.direction, Direction):
            raise TypeError(f"direction must be a Direction, got {type(self.direction).__name__}")
        if not self.outcome:
            raise ValueError("outcome must not be empty")

    @staticmethod
    def now() -> str:
        """The current time as ISO 8601 in UTC."""
        return datetime.now(UTC).isoformat(timespec="milliseconds")

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as one line."""
        data = asdict(self)
        data["direction"] = self.direction.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditRecord:
        """Inverse of :meth:`to_json`."""
        return cls(**{**data, "direction": Direction(data["direction"])})


class AuditLog:
    """Appends :class:`AuditRecord` lines to one file.

    Parameters
    ----------
    path : pathlib.Path
        The audit file (created 0600 with its directory when missing).
    """

    def __init__(self, path: Path) -> None:
        if not isinstance(path, Path):
            raise TypeError(f"path must be a Path, got {type(path).__name__}")
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: AuditRecord) -> None:
        """Append one record; an unwritable file is logged, never raised to the caller."""
        line = (json.dumps(record.to_json(), sort_keys=True, ensure_ascii=True) + "\n").encode()
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as exc:
            logger.error("audit record could not be written to %s: %s", self.path, exc)

    def read(self) -> list[AuditRecord]:
        """All records, oldest first (for tests and tools)."""
        if not self.path.is_file():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [AuditRecord.from_json(json.loads(line)) for line in fh if line.strip()]

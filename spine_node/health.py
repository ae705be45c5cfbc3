"""Liveness and readiness of a node process (``/healthz``, ``/readyz``).

Liveness says only that the process answers. Readiness says that what the node needs is
there: the database answers, the model bundle is known (configured, every file's hash
verified), and the spool and outbox directories are writable; each failing check is named
with its reason, so a load balancer or an administrator sees why (HTTP 503).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_node.config import Settings
from spine_node.store import JobStore

#: The checks of :func:`readiness`, in the order they are reported.
CHECKS = ("database", "bundle", "spool", "outbox")


@dataclass(frozen=True)
class Readiness:
    """The result of the readiness checks.

    Attributes
    ----------
    problems : dict
        Check name (:data:`CHECKS`) -> what is wrong; a passing check is absent.
    """

    problems: dict[str, str]

    @property
    def ready(self) -> bool:
        """True when every check passed."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """``{"ready": bool, "checks": {name: "ok" | problem}}``."""
        return {
            "ready": self.ready,
            "checks": {name: self.problems.get(name, "ok") for name in CHECKS},
        }


def _database_problem(store: JobStore) -> str | None:
    """Run ``SELECT 1`` on a raw connection (no write lock taken, unlike the queue's
    ``BEGIN IMMEDIATE`` transactions)."""
    try:
        conn = store.engine.raw_connection()
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            cursor.close()
        finally:
            conn.close()
    except Exception as exc:  # any driver error means "not reachable"
        return f"database not reachable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def _writable_problem(directory: Path, what: str) -> str | None:
    try:
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{what} {str(directory)!r} not writable: {exc.strerror or exc}"
    return None


def readiness(settings: Settings, store: JobStore, bundle_known: bool) -> Readiness:
    """Check what this node needs to work.

    Parameters
    ----------
    settings : Settings
        Where the spool and outbox are, which bundle is configured.
    store : JobStore
        The queue database.
    bundle_known : bool
        Whether the configured bundle was found and verified
        (:func:`spine_node.metrics.load_bundle_info` gave a bundle).

    Returns
    -------
    Readiness
    """
    problems: dict[str, str] = {}
    database = _database_problem(store)
    if database:
        problems["database"] = database
    if not bundle_known:
        shown = settings.bundle or "none"
        problems["bundle"] = f"model bundle {shown!r} not configured or not verified"
    for key, directory in (("spool", settings.spool_dir), ("outbox", settings.outbox_dir)):
        problem = _writable_problem(directory, f"{key} directory")
        if problem:
            problems[key] = problem
    return Readiness(problems)

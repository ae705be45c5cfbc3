"""Assemble the node's roles (receiver, worker, dispatcher) from settings and run them."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from spine_node.audit import AuditLog
from spine_node.config import Settings
from spine_node.spool import ensure_private_dir, remove_stale_parts
from spine_node.store import JobStore

logger = logging.getLogger(__name__)

ROLES = ("receiver", "worker", "dispatcher")


class NoBundle(RuntimeError):
    """No model bundle is configured, so the worker cannot run."""


def demo_bundle_path() -> Path:
    """Path of the embedded demo bundle shipped inside the package."""
    return Path(str(resources.files("spine_node") / "demo_bundle"))


def resolve_bundle(setting: str | None) -> Path:
    """Turn the ``bundle`` setting into a directory.

    Raises
    ------
    NoBundle
        When no bundle is configured, or it does not exist.
    """
    if not setting:
        raise NoBundle(
            'no model bundle is configured: set bundle = "demo" (the phantom-trained demo) '
            'or bundle = "/path/to/bundle" in the configuration; the worker is not started'
        )
    path = demo_bundle_path() if setting == "demo" else Path(setting)
    if not (path / "manifest.json").is_file():
        raise NoBundle(
            f"model bundle {str(path)!r} has no manifest.json; the worker is not started"
        )
    return path


def prepare_data_dir(settings: Settings) -> None:
    """Create data, spool and outbox directories (0700) and clear crash leftovers."""
    ensure_private_dir(settings.data_dir)
    ensure_private_dir(settings.spool_dir)
    ensure_private_dir(settings.outbox_dir)
    removed = remove_stale_parts(settings.spool_dir) + remove_stale_parts(settings.outbox_dir)
    if removed:
        logger.info("removed %d partial files left by an interrupted write", removed)


def open_store(settings: Settings) -> JobStore:
    """Open the queue database; a SQLite file is made private (0600)."""
    if settings.database_url is None:
        ensure_private_dir(settings.data_dir)
    store = JobStore.open(settings.db_url, busy_timeout_s=settings.db_busy_timeout_s)
    if settings.db_url.startswith("sqlite:///"):
        db = Path(settings.db_url.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                os.chmod(path, 0o600)
    return store


def load_cascade(settings: Settings) -> Any:
    """Load the configured bundle's cascade (models warm on the chosen device)."""
    from spine_node.imaging import prepare
    from spine_node.isolation import IsolatedPreparer
    from spine_node.pipeline import Cascade

    preparer: Any = (
        IsolatedPreparer(prepare, settings.decode_timeout_s) if settings.decode_isolation else prepare
    )
    return Cascade.load(
        resolve_bundle(settings.bundle),
        device=settings.device,
        backend=settings.backend,
        preparer=preparer,
        intended_modalities=settings.intended_modalities,
    )


def build_worker(settings: Settings, store: JobStore, cascade: Any) -> Any:
    """Create a worker over a loaded cascade."""
    from spine_node.results.builder import ResultOptions, build_results
    from spine_node.results.priority import study_priority
    from spine_node.worker import Worker, WorkerSettings

    r = settings.results
    options = ResultOptions(
        sr_series_number=r.sr_series_number,
        sc_series_number=r.sc_series_number,
        gsps_series_number=r.gsps_series_number,
        sr_series_description=r.sr_series_description,
        sc_series_description=r.sc_series_description,
        gsps_series_description=r.gsps_series_description,
        secondary_capture=r.secondary_capture,
        gsps=r.gsps,
        institution_name=r.institution_name,
    )

    def builder(source: Any, result: Any, model: Any, priority: Any) -> list[Any]:
        return build_results(source, result, model, options, priority)

    return Worker(
        store,
        cascade,
        builder,
        study_priority,
        settings.spool_dir,
        settings.outbox_dir,
        WorkerSettings(
            owner=f"{socket.gethostname()}:{os.getpid()}",
            batch_size=settings.worker_batch_size,
            lease_s=settings.lease_s,
            poll_s=settings.worker_poll_s,
            max_attempts=settings.job_max_attempts,
            retry_delay_s=settings.job_retry_delay_s,
            destinations=tuple(d.name for d in settings.destinations),
            webhook=bool(settings.webhook_url),
        ),
    )


@dataclass
class RunningNode:
    """Handles of a started node, for an orderly stop."""

    store: JobStore
    server: Any = None
    scheduler: Any = None
    worker_thread: threading.Thread | None = None
    stop_event: threading.Event | None = None
    cascade: Any = None

    def stop(self) -> None:
        """Stop accepting, let the worker finish its batch, stop the sweeps, close the queue."""
        if self.server is not None:
            self.server.shutdown()
        if self.stop_event is not None:
            self.stop_event.set()
        if self.worker_thread is not None:
            self.worker_thread.join()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        close = getattr(getattr(self.cascade, "preparer", None), "close", None)
        if callable(close):
            close()
        self.store.close()


def start_node(
    settings: Settings, roles: tuple[str, ...] = ROLES, cascade: Any = None
) -> RunningNode:
    """Start the requested roles in this process.

    Parameters
    ----------
    settings : Settings
        Validated settings.
    roles : tuple of str
        Any of ``receiver``, ``worker``, ``dispatcher``.
    cascade : optional
        A loaded cascade to use instead of loading the configured bundle.

    Raises
    ------
    NoBundle
        When the worker role is requested alone and no bundle is configured.
    """
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    prepare_data_dir(settings)
    store = open_store(settings)
    node = RunningNode(store=store)
    if "worker" in roles:
        try:
            if cascade is None:
                cascade = load_cascade(settings)
        except NoBundle as exc:
            if roles == ("worker",):
                store.close()
                raise
            logger.warning("%s", exc)
            cascade = None
        if cascade is not None:
            node.cascade = cascade
            worker = build_worker(settings, store, cascade)
            node.stop_event = threading.Event()
            node.worker_thread = threading.Thread(
                target=worker.run, args=(node.stop_event,), name="worker", daemon=False
            )
            node.worker_thread.start()
    if "dispatcher" in roles or "worker" in roles:
        from spine_node.dispatcher import Dispatcher, dispatch_settings, start_scheduler

        dispatcher = None
        if "dispatcher" in roles:
            dispatcher = Dispatcher(
                store,
                settings.destinations,
                settings.outbox_dir,
                dispatch_settings(settings),
                random.Random(),
                audit=AuditLog(settings.audit_path),
            )
        node.scheduler = start_scheduler(settings, store, dispatcher)
    if "receiver" in roles:
        from spine_node.receiver import start_receiver

        node.server = start_receiver(settings, store)
    return node

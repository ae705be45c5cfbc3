"""Assemble the node's roles (receiver, worker, dispatcher, web) from settings and run them."""

from __future__ import annotations

import logging
import os
import random
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spine_node.audit import AuditLog
from spine_node.config import Settings
from spine_node.spool import ensure_private_dir, remove_stale_parts
from spine_node.store import DestinationKind, DestinationRef, JobStore, Monitor, WorkerIdentity

if TYPE_CHECKING:
    from spine_node.metrics import BundleInfo
    from spine_node.worker import DispatchNotice, Progress

logger = logging.getLogger(__name__)

#: The roles that move images: receive, analyse, deliver (``start_node``'s default).
PIPELINE_ROLES = ("receiver", "worker", "dispatcher")
#: Every role; ``web`` serves the status page (``[web]``).
ROLES = (*PIPELINE_ROLES, "web")


def serve_roles(settings: Settings) -> tuple[str, ...]:
    """The roles ``spine-node serve`` starts without ``--role``: the pipeline, and the web
    page when ``web.enabled``."""
    return (*PIPELINE_ROLES, "web") if settings.web.enabled else PIPELINE_ROLES


class StartupError(RuntimeError):
    """A role cannot work with these settings; the message is one line naming path and problem.

    The command line prints it and exits with status 2 (as for a bad setting).
    """


class NoBundle(StartupError):
    """No model bundle is configured, or the configured one cannot be loaded."""


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
    if not path.is_dir():
        raise NoBundle(f"model bundle {str(path)!r}: no such directory; the worker is not started")
    if not (path / "manifest.json").is_file():
        raise NoBundle(
            f"model bundle {str(path)!r} has no manifest.json; the worker is not started"
        )
    return path


def check_bundle(setting: str | None) -> tuple[Path, str]:
    """Resolve the ``bundle`` setting and verify its manifest and every file's SHA-256.

    Returns
    -------
    (pathlib.Path, str)
        The bundle directory and the SHA-256 of its ``manifest.json`` (which records every
        file's hash, so it identifies the whole bundle).

    Raises
    ------
    NoBundle
        Not configured, missing, bad manifest or a hash mismatch: one line naming the path.
    """
    from spine_node.models.bundle import BundleError, load_manifest, sha256_file

    path = resolve_bundle(setting)
    try:
        load_manifest(path)
    except BundleError as exc:
        raise NoBundle(f"{exc} The worker is not started.") from None
    return path, sha256_file(path / "manifest.json")


def _probe_writable(directory: Path, key: str) -> None:
    try:
        ensure_private_dir(directory)
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise StartupError(
            f"{key} {str(directory)!r} is not usable: {exc.strerror or exc}"
        ) from None


def prepare_data_dir(settings: Settings) -> None:
    """Create data, spool and outbox directories (0700) and clear crash leftovers.

    Raises
    ------
    StartupError
        When a directory cannot be created or written (naming it and the reason).
    """
    _probe_writable(settings.data_dir, "data_dir")
    _probe_writable(settings.spool_dir, "spool directory")
    _probe_writable(settings.outbox_dir, "outbox directory")
    removed = remove_stale_parts(settings.spool_dir) + remove_stale_parts(settings.outbox_dir)
    if removed:
        logger.info("removed %d partial files left by an interrupted write", removed)


def check_tls_files(settings: Settings, roles: tuple[str, ...]) -> None:
    """Read every TLS file the requested roles will use, and build their contexts once.

    Raises
    ------
    StartupError
        Naming the setting, the file and the problem (missing, unreadable, not a key/cert).
    """
    from spine_node.tls import client_ssl_context, server_ssl_context, settings_problem

    checks: list[tuple[str, Any, Any]] = []
    if "receiver" in roles and settings.tls.enabled:
        checks.append(("tls", settings.tls, server_ssl_context))
    if "dispatcher" in roles:
        checks += [
            (f"destinations.{d.name}.tls", d.tls, client_ssl_context)
            for d in settings.dicom_destinations
            if d.tls.enabled
        ]
    for key, tls, build in checks:
        problem = settings_problem(tls, key, build)
        if problem is not None:
            raise StartupError(problem)


def open_store(settings: Settings) -> JobStore:
    """Open the queue database; a SQLite file is made private (0600).

    Raises
    ------
    StartupError
        When the data directory or the database cannot be opened.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    if settings.database_url is None:
        _probe_writable(settings.data_dir, "data_dir")
    try:
        store = JobStore.open(settings.db_url, busy_timeout_s=settings.db_busy_timeout_s)
    except SQLAlchemyError as exc:
        shown = make_url(settings.db_url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise StartupError(f"database {shown} cannot be opened: {reason}") from None
    if settings.db_url.startswith("sqlite:///"):
        db = Path(settings.db_url.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                os.chmod(path, 0o600)
    return store


def load_cascade(settings: Settings) -> Any:
    """Load the configured bundle's cascade (models warm on the chosen device).

    Raises
    ------
    NoBundle
        When the bundle is not configured or cannot be loaded (one line naming the path).
    """
    path, _digest = check_bundle(settings.bundle)  # before the heavy imports: fail fast

    from spine_node.imaging import prepare_compact
    from spine_node.isolation import IsolatedPreparer
    from spine_node.models.bundle import BundleError
    from spine_node.models.triage import TTA_VIEW_NAMES
    from spine_node.pipeline import Cascade

    # 8-bit display and enhanced images: what the results draw, a quarter of the bytes to copy
    preparer: Any = (
        IsolatedPreparer(prepare_compact, settings.decode_timeout_s)
        if settings.decode_isolation
        else prepare_compact
    )
    try:
        return Cascade.load(
            path,
            device=settings.device,
            backend=settings.backend,
            precision=settings.precision,
            # a claimed batch is one forward per member (images x TTA views) and one detector pass
            max_batch=settings.worker_batch_size * len(TTA_VIEW_NAMES),
            detector_batch=settings.worker_batch_size,
            preparer=preparer,
            intended_modalities=settings.intended_modalities,
            heatmaps=settings.results.heatmap,
            heatmap_method=settings.results.heatmap_method,
        )
    except (BundleError, ValueError) as exc:
        close = getattr(preparer, "close", None)
        if callable(close):
            close()
        raise NoBundle(f"model bundle {str(path)!r} cannot be loaded: {exc}") from None


def destination_refs(settings: Settings) -> tuple[DestinationRef, ...]:
    """Name and kind of every configured destination (what the worker and reporter queue for)."""
    return tuple(DestinationRef(d.name, DestinationKind(d.kind)) for d in settings.destinations)


def build_worker(
    settings: Settings,
    store: JobStore,
    cascade: Any,
    dispatch: DispatchNotice | None = None,
) -> Any:
    """Create a worker over a loaded cascade.

    ``dispatch`` is the dispatcher loop of the same process (``DispatchLoop``: woken whenever the
    worker has queued sends, see ``Worker``); None when the dispatcher runs elsewhere (it polls).
    """
    from spine_node.oru import hl7_headers
    from spine_node.results.builder import ResultOptions, build_results
    from spine_node.results.parallel import ParallelBuilder, helper_wanted
    from spine_node.study_report import StudyReporter, StudyReportSettings
    from spine_node.worker import Worker, WorkerSettings

    r = settings.results
    options = ResultOptions(
        sr_series_number=r.sr_series_number,
        sc_series_number=r.sc_series_number,
        gsps_series_number=r.gsps_series_number,
        study_sr_series_number=r.study_sr_series_number,
        sr_series_description=r.sr_series_description,
        sc_series_description=r.sc_series_description,
        gsps_series_description=r.gsps_series_description,
        study_sr_series_description=r.study_sr_series_description,
        heatmap_series_number=r.heatmap_series_number,
        heatmap_series_description=r.heatmap_series_description,
        secondary_capture=r.secondary_capture,
        gsps=r.gsps,
        heatmap=r.heatmap,
        heatmap_method=r.heatmap_method,
        institution_name=r.institution_name,
    )

    builder: Any
    if helper_wanted():  # the SR in a helper process while the worker draws the overlay
        builder = ParallelBuilder(options)
    else:

        def builder(source: Any, result: Any, model: Any) -> list[Any]:
            return build_results(source, result, model, options)

    reporter = StudyReporter(
        store,
        settings.outbox_dir,
        cascade.model_info,
        options,
        StudyReportSettings(
            destinations=destination_refs(settings),
            hl7_headers=hl7_headers(settings.destinations),
        ),
    )
    return Worker(
        store,
        cascade,
        builder,
        reporter.report,
        settings.spool_dir,
        settings.outbox_dir,
        WorkerSettings(
            owner=worker_owner(),
            batch_size=settings.worker_batch_size,
            lease_s=settings.lease_s,
            poll_s=settings.worker_poll_s,
            max_attempts=settings.job_max_attempts,
            retry_delay_s=settings.job_retry_delay_s,
            destinations=destination_refs(settings),
        ),
        dispatch=dispatch,
    )


def worker_owner() -> str:
    """The lease owner and heartbeat name of this worker process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def bundle_summary(setting: str | None) -> dict[str, Any] | None:
    """Name, version, demo flag, intended use and manifest SHA-256 of the configured bundle,
    for the status page (None when none is configured or its manifest cannot be read)."""
    from spine_node.models.bundle import BundleError, load_manifest

    try:
        path = resolve_bundle(setting)
        manifest = load_manifest(path)
    except (NoBundle, BundleError, OSError, ValueError):
        return None
    return {
        "name": manifest.name,
        "version": manifest.version,
        "demo": bool(manifest.demo),
        "intended_use": manifest.intended_use,
        "sha256": bundle_sha256(setting),
    }


def bundle_info(setting: str | None) -> BundleInfo | None:
    """The configured bundle as the metrics and monitoring see it: identity, threshold and
    drift reference (None when none is configured or it does not verify).

    Every file's hash is verified (:func:`check_bundle`).
    """
    from spine_node.metrics import BundleInfo
    from spine_node.models.bundle import load_manifest

    try:
        path, digest = check_bundle(setting)
    except NoBundle:
        return None
    manifest = load_manifest(path)
    return BundleInfo(
        name=manifest.name,
        version=manifest.version,
        sha256=digest,
        demo=manifest.demo,
        threshold=manifest.threshold,
        score_reference=manifest.score_reference,
    )


def check_web(settings: Settings) -> str | None:
    """Check the web role's settings before anything starts; return the access token.

    Raises
    ------
    StartupError
        When ``web.bind_address`` is not loopback and no ``web.token_file`` (nor a required
        client certificate) is configured, the token file cannot be read or holds too short
        a token, or an HTTPS file cannot be read or used.
    """
    from spine_node.web.auth import TokenFileError, check_exposure, read_token
    from spine_node.web.server import WebStartupError, check_https, is_loopback

    try:
        check_exposure(settings.web, is_loopback(settings.web.bind_address))
        check_https(settings.web)
        return None if settings.web.token_file is None else read_token(settings.web.token_file)
    except (TokenFileError, WebStartupError, ValueError) as exc:
        raise StartupError(str(exc)) from None


def start_web_role(settings: Settings, store: JobStore, token: str | None) -> Any:
    """Build the web application and bind its port (:class:`StartupError` when it cannot)."""
    from spine_node.web import create_app, start_web
    from spine_node.web.auth import Guard
    from spine_node.web.server import WebStartupError

    guard = Guard(token=token, max_age_s=settings.web.session_max_age_s)
    app = create_app(settings, store, guard=guard, bundle=bundle_summary(settings.bundle),
                     bundle_info=bundle_info(settings.bundle))
    try:
        return start_web(settings, app)
    except WebStartupError as exc:
        raise StartupError(str(exc)) from None


def bundle_sha256(setting: str | None) -> str:
    """SHA-256 of the configured bundle's manifest.json ("" when there is none)."""
    from spine_node.models.bundle import sha256_file

    try:
        return sha256_file(resolve_bundle(setting) / "manifest.json")
    except (NoBundle, OSError):
        return ""


class Heartbeat:
    """Writes a worker's heartbeat row every ``interval_s`` until ``stop`` is set.

    A separate thread, so a long batch on a slow CPU never looks like a dead worker; the row is
    removed when the worker stops cleanly and goes stale when the process dies.

    Parameters
    ----------
    monitor : Monitor
        Heartbeat table access.
    identity : WorkerIdentity
        Owner, host, pid and bundle of this worker.
    interval_s : float
        Seconds between beats.
    stop : threading.Event
        Set when the worker stops.
    """

    def __init__(
        self, monitor: Monitor, identity: WorkerIdentity, interval_s: float, stop: threading.Event
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.monitor = monitor
        self.identity = identity
        self.interval_s = interval_s
        self.stop = stop
        self.started_at = time.time()

    def run(self) -> None:
        """Beat until stopped, then remove the row."""
        while True:
            try:
                self.monitor.beat(self.identity, self.started_at)
            except Exception as exc:  # a locked or unreachable database: try again next beat
                logger.warning("worker %s: heartbeat not written: %s", self.identity.owner, exc)
            if self.stop.wait(self.interval_s):
                break
        try:
            self.monitor.worker_stopped(self.identity.owner)
        except Exception as exc:
            logger.warning("worker %s: heartbeat not removed: %s", self.identity.owner, exc)


@dataclass
class RunningNode:
    """Handles of a started node, for an orderly stop."""

    store: JobStore
    server: Any = None
    web: Any = None
    scheduler: Any = None
    dispatch_loop: Any = None
    worker_thread: threading.Thread | None = None
    heartbeat_thread: threading.Thread | None = None
    stop_event: threading.Event | None = None
    cascade: Any = None
    result_builder: Any = None
    worker_progress: Progress | None = None
    worker_stall_s: float = 600.0

    def problem(self) -> str | None:
        """Why the node no longer works, or None while it does (the watchdog is pinged then).

        The worker, heartbeat and dispatcher threads must be alive, the sweep scheduler running
        and the worker's loop must have moved within ``worker_stall_s`` (the job lease: a batch
        that has not finished by then is hung, its leases renewed for nothing). A role whose
        thread died or hangs leaves the process up but useless; the missing watchdog pings let
        systemd restart it.
        """
        for name, thread in (("worker", self.worker_thread), ("heartbeat", self.heartbeat_thread)):
            if thread is not None and not thread.is_alive():
                return f"the {name} thread stopped"
        if self.web is not None and not self.web.thread.is_alive():
            return "the web server thread stopped"
        if self.dispatch_loop is not None and not self.dispatch_loop.is_alive():
            return "the dispatch loop stopped"
        if self.scheduler is not None and not self.scheduler.running:
            return "the sweep scheduler stopped"
        if self.worker_progress is not None:
            idle = self.worker_progress.idle_s()
            if idle > self.worker_stall_s:
                return f"the worker's batch has not finished for {idle:.0f} s (hung)"
        return None

    def alive(self) -> bool:
        """True while :meth:`problem` finds none."""
        return self.problem() is None

    def stop(self) -> None:
        """Stop accepting, let the worker finish its batch, stop the sweeps, close the queue."""
        if self.server is not None:
            self.server.shutdown()
        if self.web is not None:
            self.web.stop()
        if self.stop_event is not None:
            self.stop_event.set()
        if self.worker_thread is not None:
            self.worker_thread.join()
        if self.heartbeat_thread is not None:
            self.heartbeat_thread.join()
        if self.dispatch_loop is not None:
            self.dispatch_loop.stop()  # after the worker: its last wake is not needed
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        for owner in (getattr(self.cascade, "preparer", None), self.result_builder):
            close = getattr(owner, "close", None)
            if callable(close):
                close()
        self.store.close()


def schedule_drift_check(scheduler: Any, settings: Settings, store: JobStore, cascade: Any) -> None:
    """Check score drift every ``monitoring.check_interval_s`` in a worker process.

    The reference is the worker's bundle's (``manifest.score_reference``; a bundle without
    one gives "no reference"), compared with that bundle's results only (its
    ``model_info.version``, which the worker records with each result). The first check runs
    at start. Several workers may check: the alarm state in the database makes the WARNING
    appear once per crossing.
    """
    from datetime import UTC, datetime

    from spine_node.monitoring import drift_check_job

    manifest = getattr(cascade, "manifest", None)
    reference = getattr(manifest, "score_reference", None)
    threshold = getattr(manifest, "threshold", None)
    version = getattr(getattr(cascade, "model_info", None), "version", None)
    scheduler.add_job(
        drift_check_job,
        "interval",
        seconds=settings.monitoring.check_interval_s,
        args=[store, reference, settings.monitoring, threshold, version],
        id="drift",
        next_run_time=datetime.now(UTC),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )


def _listen(settings: Settings, store: JobStore) -> Any:
    """Start the receiver; a port that cannot be bound is a :class:`StartupError`."""
    from spine_node.receiver import start_receiver

    try:
        return start_receiver(settings, store)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {settings.bind_address}:{settings.port}: "
            f"{exc.strerror or exc} (is another node or DICOM service using port "
            f"{settings.port}?)"
        ) from None


def start_node(
    settings: Settings, roles: tuple[str, ...] = PIPELINE_ROLES, cascade: Any = None
) -> RunningNode:
    """Start the requested roles in this process.

    Parameters
    ----------
    settings : Settings
        Validated settings.
    roles : tuple of str
        Any of ``receiver``, ``worker``, ``dispatcher``, ``web`` (default: the first three).
    cascade : optional
        A loaded cascade to use instead of loading the configured bundle.

    Raises
    ------
    StartupError
        Before anything starts, when a role cannot work: the worker's bundle is not configured
        or cannot be loaded (:class:`NoBundle`), the data directory, spool or outbox is not
        writable, the database cannot be opened, a TLS file cannot be read, the DICOM port
        cannot be bound, or the web page would be reachable from other hosts without a token,
        its token file cannot be read or its port cannot be bound (then nothing else is left
        running).
    """
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    prepare_data_dir(settings)
    check_tls_files(settings, roles)
    if "worker" in roles and cascade is None:
        check_bundle(settings.bundle)  # before the database is created or anything listens
    token = check_web(settings) if "web" in roles else None
    store = open_store(settings)
    node = RunningNode(store=store)
    try:
        if "receiver" in roles:  # listen first: a port in use stops the node before anything runs
            node.server = _listen(settings, store)
        if "web" in roles:
            node.web = start_web_role(settings, store, token)
        if "worker" in roles and cascade is None:
            cascade = load_cascade(settings)
        if "dispatcher" in roles:
            from spine_node.dispatcher import Dispatcher, dispatch_settings, start_dispatch_loop

            dispatcher = Dispatcher(
                store,
                settings.destinations,
                settings.outbox_dir,
                dispatch_settings(settings),
                random.Random(),
                audit=AuditLog(settings.audit_path),
            )
            node.dispatch_loop = start_dispatch_loop(settings, dispatcher)
        if "worker" in roles:
            node.cascade = cascade
            # in one process the worker wakes the dispatcher when it has queued sends
            worker = build_worker(settings, store, cascade, dispatch=node.dispatch_loop)
            node.result_builder = worker.build_results
            node.stop_event = threading.Event()
            node.worker_thread = threading.Thread(
                target=worker.run, args=(node.stop_event,), name="worker", daemon=False
            )
            node.worker_thread.start()
            node.worker_progress = worker.progress
            node.worker_stall_s = settings.lease_s
            info = cascade.model_info
            identity = WorkerIdentity(
                owner=worker.settings.owner,
                host=socket.gethostname(),
                pid=os.getpid(),
                bundle_name=str(info.name),
                bundle_version=str(info.version),
                bundle_sha256=bundle_sha256(settings.bundle),
            )
            heartbeat = Heartbeat(Monitor(store), identity, settings.heartbeat_s, node.stop_event)
            node.heartbeat_thread = threading.Thread(target=heartbeat.run, name="heartbeat")
            node.heartbeat_thread.start()
        if "dispatcher" in roles or "worker" in roles:
            from spine_node.dispatcher import start_scheduler

            node.scheduler = start_scheduler(settings, store)
            if "worker" in roles:
                schedule_drift_check(node.scheduler, settings, store, cascade)
    except BaseException:
        node.stop()  # what did start is stopped: never a half-running node
        raise
    return node

"""Prometheus metrics, read from the durable database at scrape time.

The node runs as several processes (receiver, workers, dispatcher, web), maybe on several
hosts sharing PostgreSQL; a counter kept in one process's memory would show only that
process's share. So :class:`NodeCollector` derives every metric from the database rows when
``/metrics`` is scraped (a custom collector, as the prometheus_client documentation
describes for "proxies" of other systems): counters are counts of durable rows (they fall
only when rows are removed, e.g. ``spine-node reprocess`` drops an image's old result; a
fall reads as a counter reset to Prometheus), histograms are bucketed in SQL.

Metric names follow the Prometheus naming conventions (``spine_node_`` prefix, base units,
``_total`` for counters, ``_seconds`` for durations); docs/operations.md lists them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from spine_node.config import MonitoringSettings
from spine_node.drift import ScoreReference
from spine_node.monitoring import REASON_KINDS, reason_kind_sql, score_window
from spine_node.results.types import Status
from spine_node.store import (
    Instance,
    Job,
    JobStageTime,
    JobState,
    JobStore,
    Outbound,
    Result,
    SendState,
    WorkerBeat,
)
from spine_node.timing import Stage

#: Upper bounds (seconds) of the receive-to-result and receive-to-delivery histograms.
LATENCY_BUCKETS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
#: Upper bounds (seconds) of the per-stage inference time histogram.
STAGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: Job states counted as waiting in the queue (queued, or failed and waiting for a retry).
WAITING_STATES = (JobState.QUEUED.value, JobState.FAILED.value)


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts of one histogram series.

    Attributes
    ----------
    buckets : tuple of (float, int)
        ``(upper bound, observations <= bound)``, increasing bounds, without +Inf.
    count : int
        All observations (the +Inf bucket).
    total : float
        Sum of the observations.
    """

    buckets: tuple[tuple[float, int], ...]
    count: int
    total: float

    def family_buckets(self) -> list[tuple[str, float]]:
        """The buckets as prometheus_client takes them (``le`` text, cumulative count)."""
        out = [(_le(bound), float(n)) for bound, n in self.buckets]
        return [*out, ("+Inf", float(self.count))]


def _le(bound: float) -> str:
    return repr(float(bound))


def _histogram_columns(value: Any, bounds: Sequence[float]) -> list[Any]:
    return [func.count(value), func.coalesce(func.sum(value), 0.0)] + [
        func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in bounds
    ]


def _histogram(row: Sequence[Any], bounds: Sequence[float]) -> Histogram:
    count, total, *cumulative = row
    return Histogram(
        tuple((float(b), int(n)) for b, n in zip(bounds, cumulative, strict=True)),
        int(count),
        float(total),
    )


@dataclass(frozen=True)
class NodeMetrics:
    """Everything ``/metrics`` reports about the queue, read in one transaction."""

    received: Mapping[str, int]
    outcomes: Mapping[str, int]
    not_processed: Mapping[str, int]
    jobs: Mapping[str, int]
    queue_depth: int
    oldest_queued_age_s: float
    result_latency: Histogram
    delivery_latency: Mapping[str, Histogram]
    sends: Mapping[tuple[str, str], int]
    send_failures: Mapping[str, int]
    dead_jobs: int
    dead_sends: int
    decoder_crashes: int
    stage_seconds: Mapping[str, Histogram]
    live_workers: int


def read_metrics(store: JobStore, *, live_worker_age_s: float) -> NodeMetrics:
    """Read :class:`NodeMetrics` from the database.

    Parameters
    ----------
    store : JobStore
        The queue database.
    live_worker_age_s : float
        A worker whose heartbeat is younger than this counts as live.
    """
    now = store.clock()

    def read(s: Session) -> NodeMetrics:
        received = {"image": 0, "not_image": 0, "out_of_scope": 0}
        for category, n in s.execute(
            select(Instance.category, func.count()).group_by(Instance.category)
        ):
            received[str(category)] = int(n)
        outcomes = {status.value: 0 for status in Status}
        for status, n in s.execute(select(Result.status, func.count()).group_by(Result.status)):
            outcomes[str(status)] = int(n)
        jobs = {state.value: 0 for state in JobState}
        for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs[str(state)] = int(n)
        outcomes["dead"] = jobs[JobState.DEAD.value]
        kind = reason_kind_sql(Result.reason)
        not_processed = dict.fromkeys(REASON_KINDS, 0)
        for name, n in s.execute(
            select(kind, func.count())
            .where(Result.status == Status.NOT_PROCESSED.value)
            .group_by(kind)
        ):
            not_processed[str(name)] = int(n)
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state.in_(WAITING_STATES)))
        waited = Result.created_at - Instance.received_at
        result_latency = _histogram(
            s.execute(
                select(*_histogram_columns(waited, LATENCY_BUCKETS_S)).join(
                    Instance, Instance.id == Result.instance_id
                )
            ).one(),
            LATENCY_BUCKETS_S,
        )
        delivered = Outbound.sent_at - Instance.received_at
        delivery = {
            str(row[0]): _histogram(row[1:], LATENCY_BUCKETS_S)
            for row in s.execute(
                select(Outbound.destination, *_histogram_columns(delivered, LATENCY_BUCKETS_S))
                .join(Result, Result.id == Outbound.result_id)
                .join(Instance, Instance.id == Result.instance_id)
                .where(Outbound.state == SendState.SENT.value)
                .group_by(Outbound.destination)
            )
        }
        sends: dict[tuple[str, str], int] = {}
        failures: dict[str, int] = {}
        for dest, state, n, failed in s.execute(
            select(
                Outbound.destination,
                Outbound.state,
                func.count(),
                func.coalesce(func.sum(Outbound.failures), 0),
            ).group_by(Outbound.destination, Outbound.state)
        ):
            for st in SendState:
                sends.setdefault((str(dest), st.value), 0)
            sends[(str(dest), str(state))] = int(n)
            failures[str(dest)] = failures.get(str(dest), 0) + int(failed)
        stages = {
            str(row[0]): _histogram(row[1:], STAGE_BUCKETS_S)
            for row in s.execute(
                select(JobStageTime.stage, *_histogram_columns(JobStageTime.seconds,
                                                               STAGE_BUCKETS_S))
                .group_by(JobStageTime.stage)
            )
        }
        crashes = s.scalar(select(func.coalesce(func.sum(Job.decoder_crashes), 0))) or 0
        live = s.scalar(
            select(func.count()).where(WorkerBeat.last_seen_at >= now - live_worker_age_s)
        ) or 0
        return NodeMetrics(
            received=received,
            outcomes=outcomes,
            not_processed=not_processed,
            jobs=jobs,
            queue_depth=sum(jobs[state] for state in WAITING_STATES),
            oldest_queued_age_s=0.0 if oldest is None else max(0.0, now - float(oldest)),
            result_latency=result_latency,
            delivery_latency=delivery,
            sends=sends,
            send_failures=failures,
            dead_jobs=jobs[JobState.DEAD.value],
            dead_sends=sum(n for (_, st), n in sends.items() if st == SendState.DEAD.value),
            decoder_crashes=int(crashes),
            stage_seconds=stages,
            live_workers=int(live),
        )

    return store.read(read)


@dataclass(frozen=True)
class BundleInfo:
    """The model bundle this node is configured with, as ``spine_node_bundle_info`` shows it."""

    name: str
    version: str
    sha256: str
    demo: bool
    threshold: float
    score_reference: ScoreReference | None


class NodeCollector(Collector):
    """The node's metrics for a :class:`prometheus_client.registry.CollectorRegistry`.

    Parameters
    ----------
    store : JobStore
        The queue database shared by every role.
    bundle : BundleInfo or None
        The configured bundle (None: none configured; no drift reference).
    monitoring : MonitoringSettings
        Drift window and threshold.
    live_worker_age_s : float
        A worker seen within this many seconds is live (3 heartbeats, as ``status``).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        bundle: BundleInfo | None,
        monitoring: MonitoringSettings,
        live_worker_age_s: float,
    ) -> None:
        self.store = store
        self.bundle = bundle
        self.monitoring = monitoring
        self.live_worker_age_s = live_worker_age_s

    def describe(self) -> list[Metric]:
        """No up-front description: the registry would otherwise call :meth:`collect`."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read the database and yield every metric family."""
        m = read_metrics(self.store, live_worker_age_s=self.live_worker_age_s)
        yield from _queue_families(m)
        yield from self._model_families()

    def _model_families(self) -> Iterator[Metric]:
        bundle = self.bundle
        info = GaugeMetricFamily(
            "spine_node_bundle_info",
            "The configured model bundle (value 1)",
            labels=["name", "version", "sha256", "demo"],
        )
        if bundle is not None:
            info.add_metric([bundle.name, bundle.version, bundle.sha256,
                             str(bundle.demo).lower()], 1.0)
        yield info
        window = score_window(
            self.store,
            None if bundle is None else bundle.score_reference,
            self.monitoring,
            None if bundle is None else bundle.threshold,
            bundle_version=None if bundle is None else bundle.version,
        )
        check = window.check
        yield GaugeMetricFamily(
            "spine_node_score_drift_psi",
            "Population Stability Index of the window's triage scores against the bundle's "
            "validation scores (NaN: no reference or too few images)",
            value=math.nan if check.psi is None else check.psi,
        )
        yield GaugeMetricFamily(
            "spine_node_score_drift_alert",
            "1 when the PSI is above monitoring.drift_threshold",
            value=1.0 if check.drifted else 0.0,
        )
        yield GaugeMetricFamily(
            "spine_node_score_drift_threshold",
            "The configured PSI threshold (monitoring.drift_threshold)",
            value=self.monitoring.drift_threshold,
        )
        yield GaugeMetricFamily(
            "spine_node_score_window_images",
            "Scored (positive or negative) images of the bundle in use in the drift window",
            value=float(check.n_window),
        )
        yield GaugeMetricFamily(
            "spine_node_score_window_other_bundle_images",
            "Scored images in the drift window left out of it: analysed by another bundle "
            "version, or recorded before the node kept the bundle's version",
            value=float(window.n_other_bundles),
        )
        yield GaugeMetricFamily(
            "spine_node_score_window_positive_ratio",
            "Fraction of the window's scored images at or above the bundle's threshold "
            "(NaN: none)",
            value=math.nan if window.positive_rate is None else window.positive_rate,
        )


def _queue_families(m: NodeMetrics) -> Iterator[Metric]:
    received = CounterMetricFamily(
        "spine_node_instances_received_total",
        "DICOM instances received and stored, by category (image, not_image, out_of_scope)",
        labels=["category"],
    )
    for category, n in sorted(m.received.items()):
        received.add_metric([category], n)
    yield received
    outcomes = CounterMetricFamily(
        "spine_node_job_outcomes_total",
        "Finished jobs by outcome (positive, negative, not_processed, dead)",
        labels=["outcome"],
    )
    for outcome, n in sorted(m.outcomes.items()):
        outcomes.add_metric([outcome], n)
    yield outcomes
    reasons = CounterMetricFamily(
        "spine_node_not_processed_total",
        "Images reported not processed, by reason kind",
        labels=["reason"],
    )
    for reason, n in m.not_processed.items():
        reasons.add_metric([reason], n)
    yield reasons
    jobs = GaugeMetricFamily("spine_node_jobs", "Jobs by current state", labels=["state"])
    for state, n in sorted(m.jobs.items()):
        jobs.add_metric([state], n)
    yield jobs
    yield GaugeMetricFamily(
        "spine_node_queue_depth", "Jobs waiting (queued, or failed and due for a retry)",
        value=m.queue_depth,
    )
    yield GaugeMetricFamily(
        "spine_node_queue_oldest_age_seconds",
        "Age of the oldest waiting job (0 when none waits)",
        value=m.oldest_queued_age_s,
    )
    latency = HistogramMetricFamily(
        "spine_node_result_latency_seconds",
        "From an image's receipt to its result recorded (result objects built)",
    )
    latency.add_metric([], m.result_latency.family_buckets(), m.result_latency.total)
    yield latency
    delivery = HistogramMetricFamily(
        "spine_node_delivery_latency_seconds",
        "From an image's receipt to the delivery of each of its result objects, per destination",
        labels=["destination"],
    )
    for dest, hist in sorted(m.delivery_latency.items()):
        delivery.add_metric([dest], hist.family_buckets(), hist.total)
    yield delivery
    sends = GaugeMetricFamily(
        "spine_node_sends", "Outbound objects by destination and state", labels=["destination",
                                                                                   "state"]
    )
    for (dest, state), n in sorted(m.sends.items()):
        sends.add_metric([dest, state], n)
    yield sends
    failures = CounterMetricFamily(
        "spine_node_send_failures_total", "Failed delivery attempts, per destination",
        labels=["destination"],
    )
    for dest, n in sorted(m.send_failures.items()):
        failures.add_metric([dest], n)
    yield failures
    dead = GaugeMetricFamily(
        "spine_node_dead_letters", "Dead jobs and dead sends waiting for spine-node replay",
        labels=["kind"],
    )
    dead.add_metric(["job"], m.dead_jobs)
    dead.add_metric(["send"], m.dead_sends)
    yield dead
    yield CounterMetricFamily(
        "spine_node_decoder_crashes_total",
        "Times the isolated decoder process crashed or hung on an image",
        value=m.decoder_crashes,
    )
    stages = HistogramMetricFamily(
        "spine_node_inference_stage_seconds",
        "Seconds one image spent in each inference stage (a batch's time shared among its "
        "images)",
        labels=["stage"],
    )
    for stage in Stage:
        spent = m.stage_seconds.get(stage.value)
        if spent is not None:
            stages.add_metric([stage.value], spent.family_buckets(), spent.total)
    yield stages
    yield GaugeMetricFamily(
        "spine_node_workers_live", "Workers whose heartbeat is recent", value=m.live_workers
    )


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry of its own holding only ``collector`` (no process-global registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


#: Every metric family name the collector yields (docs/operations.md lists them).
METRIC_NAMES = (
    "spine_node_instances_received_total",
    "spine_node_job_outcomes_total",
    "spine_node_not_processed_total",
    "spine_node_jobs",
    "spine_node_queue_depth",
    "spine_node_queue_oldest_age_seconds",
    "spine_node_result_latency_seconds",
    "spine_node_delivery_latency_seconds",
    "spine_node_sends",
    "spine_node_send_failures_total",
    "spine_node_dead_letters",
    "spine_node_decoder_crashes_total",
    "spine_node_inference_stage_seconds",
    "spine_node_workers_live",
    "spine_node_bundle_info",
    "spine_node_score_drift_psi",
    "spine_node_score_drift_alert",
    "spine_node_score_drift_threshold",
    "spine_node_score_window_images",
    "spine_node_score_window_other_bundle_images",
    "spine_node_score_window_positive_ratio",
)


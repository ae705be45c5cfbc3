"""Operations routes of the web app: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz`` and the
``/monitoring`` page (model monitoring plots, server-rendered SVG).

The metrics and the page read the durable database at request time
(:mod:`spine_node.metrics`, :mod:`spine_node.monitoring`), so any web process shows the whole
node. docs/operations.md lists the metrics.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spine_node.config import Settings
from spine_node.health import readiness
from spine_node.metrics import BundleInfo, NodeCollector, node_registry
from spine_node.monitoring import (
    REASON_KINDS,
    DayOutcomes,
    ScoreWindow,
    alarm_state,
    daily_outcomes,
    reason_counts,
    score_window,
)
from spine_node.store import JobStore
from spine_node.web.charts import PALETTE, Series, bar_chart, line_chart, stacked_bar_chart

#: Words for the reason kinds on the page.
REASON_TEXT = {
    "outside_intended_use": "outside the intended use",
    "content_gate": "not like a spine radiograph (content)",
    "decode_failed": "could not be decoded",
    "bad_header": "unreadable header",
    "image_too_small": "image too small",
    "not_spine_radiograph": "not a spine radiograph (tags)",
    "processing_failed": "processing failed",
    "other": "other",
}


def _bin_labels(edges: Sequence[float]) -> list[str]:
    return [f"{a:.2f}-{b:.2f}" for a, b in itertools.pairwise(edges)]


def _shares(counts: Sequence[int]) -> tuple[float | None, ...]:
    total = sum(counts)
    return tuple(c / total for c in counts) if total else tuple(None for _ in counts)


def score_chart(window: ScoreWindow) -> str | None:
    """Share of images per reference bin: validation against the window (None: no reference)."""
    ref = window.reference
    if ref is None:
        return None
    return bar_chart(
        f"Triage score distribution: last {window.window_days:g} days vs validation",
        _bin_labels(ref.bin_edges),
        [
            Series("validation", _shares(ref.counts), PALETTE[0]),
            Series(f"last {window.window_days:g} days", _shares(window.window_counts),
                   PALETTE[1]),
        ],
        y_label="share of images",
    )


def positive_rate_chart(days: Sequence[DayOutcomes], reference_rate: float | None) -> str:
    """Daily positive rate, with the validation positive rate as a dashed line."""
    return line_chart(
        "Daily positive rate (positives among analysed images)",
        [d.day[5:] for d in days],
        [Series("positive rate", tuple(d.positive_rate for d in days), PALETTE[3])],
        y_label="positive rate",
        reference=None if reference_rate is None else ("validation", reference_rate),
    )


def not_processed_chart(days: Sequence[DayOutcomes]) -> str:
    """Daily not-processed rate, stacked by reason kind (kinds seen in the period only)."""
    seen = [k for k in REASON_KINDS if any(d.not_processed_by_reason.get(k) for d in days)]
    series = [
        Series(
            REASON_TEXT.get(kind, kind),
            tuple(
                None if d.total == 0 else d.not_processed_by_reason.get(kind, 0) / d.total
                for d in days
            ),
            PALETTE[(i + 2) % len(PALETTE)],
        )
        for i, kind in enumerate(seen)
    ]
    return stacked_bar_chart(
        "Daily not-processed rate by reason",
        [d.day[5:] for d in days],
        series,
        y_label="share of results",
    )


def monitoring_view(
    settings: Settings, store: JobStore, bundle: BundleInfo | None
) -> dict[str, Any]:
    """Everything the monitoring page shows, read now."""
    monitoring = settings.monitoring
    reference = None if bundle is None else bundle.score_reference
    window = score_window(store, reference, monitoring,
                          None if bundle is None else bundle.threshold,
                          bundle_version=None if bundle is None else bundle.version)
    days = daily_outcomes(store, monitoring.history_days)
    totals = reason_counts(days)
    return {
        "monitoring": monitoring,
        "check": window.check,
        "window": window,
        "alarm": alarm_state(store),
        "days": days,
        "reasons": [(REASON_TEXT.get(k, k), totals[k]) for k in REASON_KINDS],
        "n_results": sum(d.total for d in days),
        "score_chart": score_chart(window),
        "positive_chart": positive_rate_chart(
            days, None if reference is None else reference.positive_rate
        ),
        "not_processed_chart": not_processed_chart(days),
    }


def add_operations_routes(
    app: FastAPI,
    settings: Settings,
    store: JobStore,
    *,
    bundle: BundleInfo | None,
    viewer: Callable[[Request], Any],
    render: Callable[..., HTMLResponse],
    nav: list[tuple[str, str]],
) -> None:
    """Add ``/metrics``, ``/healthz``, ``/readyz`` and ``/monitoring`` to ``app``.

    Parameters
    ----------
    app : fastapi.FastAPI
        The web application.
    settings : Settings
        Validated settings (``bundle``, ``[monitoring]``, data directory).
    store : JobStore
        The open queue.
    bundle : BundleInfo or None
        The configured, verified bundle (:func:`spine_node.node.bundle_info`); None: no
        bundle (``/readyz`` says so, no drift reference).
    viewer : callable
        ``request -> viewer``; raises when the request may not see the pages (the token).
    render : callable
        ``(request, template, viewer, **context) -> HTMLResponse`` of the app.
    nav : list of (str, str)
        The navigation bar; the monitoring page is appended.
    """
    registry = node_registry(
        NodeCollector(store, bundle=bundle, monitoring=settings.monitoring,
                      live_worker_age_s=3 * settings.heartbeat_s)
    )
    nav.append(("Monitoring", "/monitoring"))

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        viewer(request)  # a bearer token when the web token is set (Prometheus: authorization)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = readiness(settings, store, bundle_known=bundle is not None)
        return JSONResponse(ready.to_json(), status_code=200 if ready.ready else 503,
                            headers={"Cache-Control": "no-store"})

    @app.get("/monitoring", response_class=HTMLResponse)
    def monitoring_page(request: Request) -> HTMLResponse:
        who = viewer(request)
        return render(request, "monitoring.html", who, **monitoring_view(settings, store, bundle))

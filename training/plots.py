"""PNG plots of an evaluation: ROC curve, per-class precision-recall, confusion matrix.

Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas: no
pyplot, no display and no global figure registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spine_node.results.types import display_label
from training.evaluate import RECALL_THRESHOLDS, DetectionMetrics

if TYPE_CHECKING:
    from training.evaluate import EvaluationReport

logger = logging.getLogger(__name__)


def roc_points(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score (``score >= t`` is positive)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def plot_roc(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    auroc: float | None = None,
) -> Path:
    """Write the triage ROC curve (with the operating point at ``threshold``) as PNG."""
    fpr, tpr = roc_points(labels, scores)
    fig, ax = _figure(5, 5)
    try:
        title = "ROC" if auroc is None else f"ROC (AUROC {auroc:.3f})"
        ax.plot(fpr, tpr, lw=2, label="triage")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        if threshold is not None:
            y = np.asarray(labels).astype(bool)
            pred = np.asarray(scores) >= threshold
            sens = (pred & y).sum() / max(y.sum(), 1)
            fp_rate = (pred & ~y).sum() / max((~y).sum(), 1)
            ax.plot([fp_rate], [sens], "o", color="crimson", label=f"threshold {threshold:.3f}")
        ax.set(
            xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01)
        )
        ax.legend(loc="lower right")
        return _save(fig, path)
    finally:
        fig.clear()


def plot_pr_curves(
    metrics: DetectionMetrics, path: str | os.PathLike[str], *, iou: float = 0.5
) -> Path:
    """Write the per-class interpolated precision-recall curves (COCO, 101 points) as PNG."""
    t = int(np.flatnonzero(np.isclose(metrics.iou_thresholds, iou))[0])
    fig, ax = _figure(6, 5)
    try:
        for k, label in enumerate(metrics.labels):
            curve = metrics.precision[t, :, k]
            if np.any(curve < 0):
                continue
            ax.plot(
                RECALL_THRESHOLDS,
                curve,
                lw=1.5,
                label=f"{display_label(label)} ({np.mean(curve):.2f})",
            )
        ax.set(
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.01),
            title=f"Precision-recall per class, IoU {iou:g}",
        )
        ax.legend(loc="lower left", fontsize=7)
        return _save(fig, path)
    finally:
        fig.clear()


def plot_confusion(
    confusion: tuple[tuple[int, int], tuple[int, int]], path: str | os.PathLike[str]
) -> Path:
    """Write the triage confusion matrix ``((tn, fp), (fn, tp))`` as PNG."""
    matrix = np.asarray(confusion, dtype=np.int64)
    if matrix.shape != (2, 2):
        raise ValueError(f"confusion must be 2 x 2, got shape {matrix.shape}")
    fig, ax = _figure(4, 4)
    try:
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > matrix.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=14)
        ax.set_xticks([0, 1], ["normal", "abnormal"])
        ax.set_yticks([0, 1], ["normal", "abnormal"])
        ax.set(xlabel="predicted", ylabel="ground truth", title="Triage confusion matrix")
        return _save(fig, path)
    finally:
        fig.clear()


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(target, format="png")
    return target


def write_report_plots(
    report: EvaluationReport,
    out_dir: str | os.PathLike[str],
    *,
    labels: Mapping[str, int] | None = None,
    scores: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write every plot the report supports into ``out_dir``; returns the files written.

    ROC needs the per-image ``labels`` and ``scores``; PR curves need detection metrics;
    the confusion matrix needs classification metrics.
    """
    folder = Path(out_dir)
    written: list[Path] = []
    c = report.classification
    if c is not None:
        written.append(plot_confusion(c.confusion, folder / "confusion.png"))
        if labels is not None and scores is not None:
            ids = [i for i in labels if i in scores]
            written.append(
                plot_roc(
                    [labels[i] for i in ids],
                    [scores[i] for i in ids],
                    folder / "roc.png",
                    threshold=c.threshold,
                    auroc=c.auroc,
                )
            )
    if report.detection is not None:
        written.append(plot_pr_curves(report.detection, folder / "pr_curves.png"))
    logger.info("wrote %d plots to %s", len(written), folder)
    return written


__all__ = ["plot_confusion", "plot_pr_curves", "plot_roc", "roc_points", "write_report_plots"]

"""Metrics of the cascade: COCO-style detection AP and triage AUROC / sensitivity / specificity.

Detection AP follows the VinDr-SpineXR protocol exactly as pycocotools' ``COCOeval``
computes it (bbox, area range "all", no crowd regions), re-implemented in numpy:

* per class and image, detections are sorted by score (stable) and greedily matched to the
  unmatched ground-truth box of highest IoU (ties: the later box, as pycocotools) that reaches
  the IoU threshold;
* images without findings are included: their detections are false positives;
* precision is made monotone and sampled at 101 recall points (0, 0.01, ..., 1);
  AP is the mean of those 101 values.
* A class with no ground-truth box has no AP: pycocotools reports -1, we report ``None``
  (JSON ``null``) and leave it out of the mean (pycocotools does the same in its mean).

Detections of the same score are ordered as pycocotools orders them when the images carry
integer ids in the order of ``image_ids``: by image, then by input order.

Triage: AUROC (rank statistic, equal to ``sklearn.metrics.roc_auc_score``) with a seeded
percentile bootstrap 95% CI over images; an image is called abnormal when its score is
``>= threshold``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from spine_node.labels import LESION_LABELS

logger = logging.getLogger(__name__)

#: IoU thresholds of COCO's mAP@0.5:0.95 (as pycocotools builds them).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, round((0.95 - 0.5) / 0.05) + 1, endpoint=True)
#: The 101 recall points of COCO's interpolated AP.
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, round((1.00 - 0.0) / 0.01) + 1, endpoint=True)
DEFAULT_THRESHOLD = 0.478
DEFAULT_BOOTSTRAP = 1000


@dataclass(frozen=True)
class GroundTruthBox:
    """One ground-truth lesion box (source pixels, ``xmin, ymin, xmax, ymax``)."""

    image_id: str
    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True)
class Detection:
    """One predicted lesion box with its score."""

    image_id: str
    label: str
    score: float
    xmin: float
    ymin: float
    xmax: float
    ymax: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.score):
            raise ValueError(f"Detection score must be finite, got {self.score!r}")


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO-style AP results.

    Attributes
    ----------
    labels : tuple of str
        Class names (axis K of ``precision``).
    iou_thresholds : numpy.ndarray
        Shape (T,).
    precision : numpy.ndarray
        Interpolated precision, shape (T, 101, K); -1 for classes without ground truth.
    recall : numpy.ndarray
        Final recall, shape (T, K); -1 for classes without ground truth.
    n_ground_truth : Mapping[str, int]
        Ground-truth boxes per class.
    n_detections : Mapping[str, int]
        Detections evaluated per class.
    """

    labels: tuple[str, ...]
    iou_thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    n_ground_truth: Mapping[str, int]
    n_detections: Mapping[str, int]

    def _t(self, iou: float) -> int:
        hits = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        if not len(hits):
            raise ValueError(f"iou {iou!r} is not one of the evaluated thresholds")
        return int(hits[0])

    def ap(self, label: str, iou: float | None = 0.5) -> float | None:
        """AP of one class at one IoU threshold (None: every threshold averaged).

        Returns None for a class without ground truth.
        """
        k = self.labels.index(label)
        block = self.precision[:, :, k] if iou is None else self.precision[self._t(iou), :, k]
        if np.any(block < 0):
            return None
        return float(np.mean(block))

    @property
    def ap50(self) -> dict[str, float | None]:
        """AP at IoU 0.5 per class (None where the class has no ground truth)."""
        return {label: self.ap(label, 0.5) for label in self.labels}

    @property
    def ap50_95(self) -> dict[str, float | None]:
        """AP averaged over the IoU thresholds, per class."""
        return {label: self.ap(label, None) for label in self.labels}

    @property
    def map50(self) -> float | None:
        """Mean AP@0.5 over classes with ground truth (None when none has any)."""
        values = [v for v in self.ap50.values() if v is not None]
        return float(np.mean(values)) if values else None

    @property
    def map50_95(self) -> float | None:
        """Mean AP over IoU 0.5:0.95 and over classes with ground truth."""
        valid = self.precision[self.precision > -1]
        return float(np.mean(valid)) if valid.size else None


def box_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix of (D, 4) and (G, 4) ``xyxy`` boxes, computed as pycocotools does.

    Boxes are converted to ``x, y, w, h`` first (as COCO stores them); an intersection
    with ``w <= 0`` or ``h <= 0`` counts as 0.
    """
    dt = np.asarray(dt, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    dw, dh = dt[:, 2] - dt[:, 0], dt[:, 3] - dt[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    # pycocotools works on x, y, w, h and recomputes the far corner as x + w.
    iw = np.minimum((dt[:, 0] + dw)[:, None], (gt[:, 0] + gw)[None]) - np.maximum(
        dt[:, 0][:, None], gt[:, 0][None]
    )
    ih = np.minimum((dt[:, 1] + dh)[:, None], (gt[:, 1] + gh)[None]) - np.maximum(
        dt[:, 1][:, None], gt[:, 1][None]
    )
    valid = (iw > 0) & (ih > 0)
    inter = np.where(valid, iw * ih, 0.0)
    union = (dw * dh)[:, None] + (gw * gh)[None] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(valid, inter / union, 0.0)
    return np.asarray(iou)


def _match_image(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Greedy COCO matching of score-sorted detections; returns dt matched (T, D) bool."""
    n_t = len(thresholds)
    n_d, n_g = ious.shape
    dt_matched = np.zeros((n_t, n_d), dtype=bool)
    if n_g == 0 or n_d == 0:
        return dt_matched
    gt_taken = np.zeros((n_t, n_g), dtype=bool)
    limits = np.minimum(thresholds, 1 - 1e-10)[:, None]
    rows = np.arange(n_t)
    for d in range(n_d):
        row = ious[d][None, :]
        cand = (~gt_taken) & (row >= limits)
        if not cand.any():
            continue
        masked = np.where(cand, row, -1.0)[:, ::-1]
        best = n_g - 1 - np.argmax(masked, axis=1)  # last index among equal maxima
        ok = cand.any(axis=1)
        dt_matched[ok, d] = True
        gt_taken[rows[ok], best[ok]] = True
    return dt_matched


def coco_average_precision(
    image_ids: Sequence[str],
    ground_truth: Iterable[GroundTruthBox],
    detections: Iterable[Detection],
    *,
    labels: Sequence[str] = LESION_LABELS,
    iou_thresholds: Sequence[float] | np.ndarray = COCO_IOU_THRESHOLDS,
    max_detections: int | None = None,
) -> DetectionMetrics:
    """COCO-style AP per class, as pycocotools' COCOeval (bbox, area "all") computes it.

    Parameters
    ----------
    image_ids : sequence of str
        Every evaluated image, including images without findings (order breaks score ties).
    ground_truth : iterable of GroundTruthBox
        Ground-truth boxes (images must be in ``image_ids``).
    detections : iterable of Detection
        Predictions; those of images outside ``image_ids`` are ignored (with a warning).
    labels : sequence of str
        Classes to evaluate.
    iou_thresholds : sequence of float
        IoU thresholds (default COCO's 0.5:0.05:0.95).
    max_detections : int, optional
        Keep at most this many top-scoring detections per image and class (COCO's maxDets);
        None keeps all.

    Returns
    -------
    DetectionMetrics
    """
    labels = tuple(labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be distinct and not empty, got {labels!r}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0 or np.any((thresholds < 0) | (thresholds > 1)):
        raise ValueError(f"iou_thresholds must be values in [0, 1], got {iou_thresholds!r}")
    if max_detections is not None and (
        isinstance(max_detections, bool)
        or not isinstance(max_detections, int)
        or max_detections < 1
    ):
        raise ValueError(f"max_detections must be a positive int or None, got {max_detections!r}")
    order = {image_id: i for i, image_id in enumerate(dict.fromkeys(image_ids))}
    label_index = {label: k for k, label in enumerate(labels)}
    gts: dict[tuple[int, int], list[tuple[float, float, float, float]]] = defaultdict(list)
    for g in ground_truth:
        if g.image_id not in order:
            raise ValueError(f"ground truth of image {g.image_id!r} is not in image_ids")
        if g.label not in label_index:
            raise ValueError(f"ground-truth label {g.label!r} is not one of {labels}")
        gts[(label_index[g.label], order[g.image_id])].append((g.xmin, g.ymin, g.xmax, g.ymax))
    dts: dict[tuple[int, int], list[tuple[float, float, float, float, float]]] = defaultdict(list)
    dropped = 0
    for d in detections:
        if d.label not in label_index:
            raise ValueError(f"detection label {d.label!r} is not one of {labels}")
        if d.image_id not in order:
            dropped += 1
            continue
        dts[(label_index[d.label], order[d.image_id])].append(
            (d.score, d.xmin, d.ymin, d.xmax, d.ymax)
        )
    if dropped:
        logger.warning("%d detections of images outside the evaluated set were ignored", dropped)

    n_t, n_r, n_k = len(thresholds), len(RECALL_THRESHOLDS), len(labels)
    precision = -np.ones((n_t, n_r, n_k))
    recall = -np.ones((n_t, n_k))
    n_gt_out: dict[str, int] = {}
    n_dt_out: dict[str, int] = {}
    for k, label in enumerate(labels):
        images = sorted({i for (kk, i) in gts if kk == k} | {i for (kk, i) in dts if kk == k})
        scores_all: list[np.ndarray] = []
        matched_all: list[np.ndarray] = []
        n_gt = 0
        for i in images:
            g_arr = np.asarray(gts.get((k, i), []), dtype=np.float64).reshape(-1, 4)
            d_arr = np.asarray(dts.get((k, i), []), dtype=np.float64).reshape(-1, 5)
            n_gt += len(g_arr)
            if len(d_arr) == 0:
                continue
            keep = np.argsort(-d_arr[:, 0], kind="mergesort")
            if max_detections is not None:
                keep = keep[:max_detections]
            d_arr = d_arr[keep]
            scores_all.append(d_arr[:, 0])
            matched_all.append(_match_image(box_iou(d_arr[:, 1:], g_arr), thresholds))
        n_gt_out[label] = n_gt
        n_dt_out[label] = int(sum(len(s) for s in scores_all))
        if n_gt == 0:
            continue
        if scores_all:
            scores = np.concatenate(scores_all)
            matched = np.concatenate(matched_all, axis=1)
        else:
            scores = np.zeros(0)
            matched = np.zeros((n_t, 0), dtype=bool)
        sort = np.argsort(-scores, kind="mergesort")
        matched = matched[:, sort]
        tp_sum = np.cumsum(matched, axis=1).astype(float)
        fp_sum = np.cumsum(~matched, axis=1).astype(float)
        for t in range(n_t):
            tp, fp = tp_sum[t], fp_sum[t]
            nd = len(tp)
            rc = tp / n_gt
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, k] = rc[-1] if nd else 0.0
            q = np.zeros(n_r)
            if nd:
                pr = np.maximum.accumulate(pr[::-1])[::-1]
                inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                valid = inds < nd
                q[valid] = pr[inds[valid]]
            precision[t, :, k] = q
    return DetectionMetrics(
        labels=labels,
        iou_thresholds=thresholds,
        precision=precision,
        recall=recall,
        n_ground_truth=n_gt_out,
        n_detections=n_dt_out,
    )


# --------------------------------------------------------------------------------------------
# Triage (classification)
# --------------------------------------------------------------------------------------------


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney with mid-ranks for ties).

    Equals ``sklearn.metrics.roc_auc_score(labels, scores)``; raises ValueError when only one
    class is present.
    """
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative images")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _bootstrap_auroc(
    y: np.ndarray, s: np.ndarray, n_bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    values: list[np.ndarray] = []
    n = y.size
    chunk = max(1, min(n_bootstrap, 2_000_000 // max(n, 1)))
    done = 0
    while done < n_bootstrap:
        m = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(m, n))
        yy = y[idx]
        ss = s[idx]
        ranks = rankdata(ss, axis=1)
        n_pos = yy.sum(axis=1)
        n_neg = n - n_pos
        ok = (n_pos > 0) & (n_neg > 0)
        sum_pos = np.where(yy, ranks, 0.0).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = (sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        values.append(auc[ok])
        done += m
    return np.concatenate(values)


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    tn = float(np.sum(~pred & ~y))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sens": sens,
        "spec": spec,
        "prec": prec,
        "f1": f1,
    }


@dataclass(frozen=True)
class ClassificationMetrics:
    """Triage metrics at one threshold, with bootstrap 95% CIs (percentile method)."""

    auroc: float
    auroc_ci95: tuple[float, float]
    threshold: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    sensitivity_ci95: tuple[float, float]
    specificity_ci95: tuple[float, float]
    f1_ci95: tuple[float, float]
    confusion: tuple[tuple[int, int], tuple[int, int]]  # ((tn, fp), (fn, tp))
    n_positive: int
    n_negative: int
    n_bootstrap: int
    seed: int


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> ClassificationMetrics:
    """AUROC, sensitivity, specificity, precision and F1 with seeded bootstrap CIs.

    Parameters
    ----------
    labels : array-like of 0/1
        1 = abnormal image.
    scores : array-like of float
        Predicted probability of "abnormal".
    threshold : float
        An image is called abnormal when ``score >= threshold``.
    n_bootstrap : int
        Bootstrap resamples of images (0 disables the CIs: they are then NaN).
    seed : int
        Bootstrap seed.

    Returns
    -------
    ClassificationMetrics
    """
    y = np.asarray(labels).reshape(-1)
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 or 1")
    y = y.astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an int >= 0, got {n_bootstrap!r}")
    value = auroc(y, s)
    pred = s >= threshold
    r = _rates(y, pred)
    nan_ci = (float("nan"), float("nan"))
    auc_ci = sens_ci = spec_ci = f1_ci = nan_ci
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        boot = _bootstrap_auroc(y, s, n_bootstrap, rng)
        auc_ci = _percentile_ci(boot)
        idx = np.random.default_rng([seed, 1]).integers(0, y.size, size=(n_bootstrap, y.size))
        yy, pp = y[idx], pred[idx]
        tp = (yy & pp).sum(1)
        fp = (~yy & pp).sum(1)
        fn = (yy & ~pp).sum(1)
        tn = (~yy & ~pp).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            sens_ci = _percentile_ci(tp / (tp + fn))
            spec_ci = _percentile_ci(tn / (tn + fp))
            f1_ci = _percentile_ci(2 * tp / (2 * tp + fp + fn))
    return ClassificationMetrics(
        auroc=value,
        auroc_ci95=auc_ci,
        threshold=float(threshold),
        sensitivity=r["sens"],
        specificity=r["spec"],
        precision=r["prec"],
        f1=r["f1"],
        sensitivity_ci95=sens_ci,
        specificity_ci95=spec_ci,
        f1_ci95=f1_ci,
        confusion=((int(r["tn"]), int(r["fp"])), (int(r["fn"]), int(r["tp"]))),
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


def _percentile_ci(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(v, [2.5, 97.5])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------------------------
# Both together
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationReport:
    """Triage and/or detection metrics on one image set."""

    n_images: int
    classification: ClassificationMetrics | None = None
    detection: DetectionMetrics | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: fractions in [0, 1]; ``null`` for undefined values."""
        out: dict[str, Any] = {"n_images": self.n_images}
        c = self.classification
        if c is not None:
            out.update(
                {
                    "threshold": c.threshold,
                    "auroc": _num(c.auroc),
                    "auroc_ci95": [_num(x) for x in c.auroc_ci95],
                    "sensitivity": _num(c.sensitivity),
                    "sensitivity_ci95": [_num(x) for x in c.sensitivity_ci95],
                    "specificity": _num(c.specificity),
                    "specificity_ci95": [_num(x) for x in c.specificity_ci95],
                    "precision": _num(c.precision),
                    "f1": _num(c.f1),
                    "f1_ci95": [_num(x) for x in c.f1_ci95],
                    "confusion": {
                        "tn": c.confusion[0][0],
                        "fp": c.confusion[0][1],
                        "fn": c.confusion[1][0],
                        "tp": c.confusion[1][1],
                    },
                    "n_abnormal": c.n_positive,
                    "n_normal": c.n_negative,
                    "bootstrap": c.n_bootstrap,
                    "seed": c.seed,
                }
            )
        d = self.detection
        if d is not None:
            out.update(
                {
                    "map50": _num(d.map50),
                    "map50_95": _num(d.map50_95),
                    "ap50": {k: _num(v) for k, v in d.ap50.items()},
                    "ap50_95": {k: _num(v) for k, v in d.ap50_95.items()},
                    "n_ground_truth": dict(d.n_ground_truth),
                    "n_detections": dict(d.n_detections),
                }
            )
        out.update(self.extra)
        return out


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def evaluate(
    image_ids: Sequence[str],
    *,
    labels: Mapping[str, int] | None = None,
    scores: Mapping[str, float] | None = None,
    ground_truth: Iterable[GroundTruthBox] = (),
    detections: Iterable[Detection] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    max_detections: int | None = None,
) -> EvaluationReport:
    """Evaluate in-memory predictions (the library form of ``spine-train evaluate``).

    Parameters
    ----------
    image_ids : sequence of str
        The evaluated images (all of them, normal ones included).
    labels : Mapping[str, int], optional
        Image id -> 1 abnormal / 0 normal; needed with ``scores``.
    scores : Mapping[str, float], optional
        Image id -> triage score; every image must have one. None skips triage metrics.
    ground_truth : iterable of GroundTruthBox
        Lesion boxes.
    detections : iterable of Detection, optional
        None skips detection metrics.
    threshold, n_bootstrap, seed :
        See :func:`classification_metrics`.
    max_detections : int, optional
        See :func:`coco_average_precision`.

    Returns
    -------
    EvaluationReport
    """
    ids = list(dict.fromkeys(image_ids))
    if not ids:
        raise ValueError("image_ids must not be empty")
    cls = None
    if scores is not None:
        if labels is None:
            raise ValueError("labels are needed to evaluate scores")
        missing = [i for i in ids if i not in scores]
        if missing:
            raise ValueError(f"{len(missing)} images have no score, e.g. {missing[0]!r}")
        missing = [i for i in ids if i not in labels]
        if missing:
            raise ValueError(f"{len(missing)} images have no label, e.g. {missing[0]!r}")
        cls = classification_metrics(
            [labels[i] for i in ids],
            [scores[i] for i in ids],
            threshold=threshold,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    det = None
    if detections is not None:
        det = coco_average_precision(ids, ground_truth, detections, max_detections=max_detections)
    return EvaluationReport(n_images=len(ids), classification=cls, detection=det)


# --------------------------------------------------------------------------------------------
# Files and CLI
# --------------------------------------------------------------------------------------------


def read_detections_csv(path: str | os.PathLike[str]) -> list[Detection]:
    """Read ``image_id,lesion_type,score,xmin,ymin,xmax,ymax`` rows."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = ("image_id", "lesion_type", "score", "xmin", "ymin", "xmax", "ymax")
        missing = [c for c in need if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                out.append(
                    Detection(
                        row["image_id"].strip(),
                        row["lesion_type"].strip(),
                        float(row["score"]),
                        float(row["xmin"]),
                        float(row["ymin"]),
                        float(row["xmax"]),
                        float(row["ymax"]),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc
    return out


def read_scores_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read ``image_id,score`` rows."""
    out: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("image_id", "score") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            image_id = row["image_id"].strip()
            if image_id in out:
                raise ValueError(f"{path}:{line}: image {image_id!r} scored twice")
            try:
                out[image_id] = float(row["score"])
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: score {row['score']!r} is not a number") from exc
    return out


def evaluate_files(
    annotations: str | os.PathLike[str],
    *,
    predictions: str | os.PathLike[str] | None = None,
    scores: str | os.PathLike[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> EvaluationReport:
    """Evaluate prediction CSV files against a VinDr annotation CSV."""
    from training.vindr import read_annotations

    records = read_annotations(annotations, "test")
    ids = [r.image_id for r in records]
    gt = [
        GroundTruthBox(r.image_id, b.label, b.xmin, b.ymin, b.xmax, b.ymax)
        for r in records
        for b in r.boxes
    ]
    labels = {r.image_id: r.label for r in records}
    score_map = read_scores_csv(scores) if scores is not None else None
    if score_map is not None:
        extra = set(score_map) - set(ids)
        if extra:
            logger.warning("%d scored images are not in the annotations; ignored", len(extra))
    dets = read_detections_csv(predictions) if predictions is not None else None
    return evaluate(
        ids,
        labels=labels,
        scores=score_map,
        ground_truth=gt,
        detections=dets,
        threshold=threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` subcommand's arguments to ``parser``."""
    parser.add_argument("--annotations", required=True, type=Path, help="VinDr test.csv")
    parser.add_argument(
        "--predictions",
        type=Path,
        help="detections CSV: image_id,lesion_type,score,xmin,ymin,xmax,ymax",
    )
    parser.add_argument("--scores", type=Path, help="triage scores CSV: image_id,score")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"triage threshold, score >= threshold is abnormal (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        help=f"bootstrap resamples for the 95%% CIs (default {DEFAULT_BOOTSTRAP})",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--plots", type=Path, help="write ROC / PR / confusion PNGs here")


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train evaluate``; returns the exit status."""
    if args.predictions is None and args.scores is None:
        print("evaluate: give --predictions and/or --scores", file=sys.stderr)
        return 2
    report = evaluate_files(
        args.annotations,
        predictions=args.predictions,
        scores=args.scores,
        threshold=args.threshold,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    data = report.to_json()
    if args.plots is not None:
        from training import plots
        from training.vindr import read_annotations

        written = plots.write_report_plots(
            report,
            args.plots,
            labels={r.image_id: r.label for r in read_annotations(args.annotations, "test")},
            scores=read_scores_csv(args.scores) if args.scores is not None else None,
        )
        data["plots"] = [str(p) for p in written]
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0


__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_THRESHOLD",
    "RECALL_THRESHOLDS",
    "ClassificationMetrics",
    "Detection",
    "DetectionMetrics",
    "EvaluationReport",
    "GroundTruthBox",
    "add_arguments",
    "auroc",
    "box_iou",
    "classification_metrics",
    "coco_average_precision",
    "evaluate",
    "evaluate_files",
    "read_detections_csv",
    "read_scores_csv",
    "run",
]

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

* at most 100 detections per image and class count (COCO's ``maxDets`` for AP).

Detections of the same score are ordered as pycocotools orders them when the images carry
integer ids in the order of ``image_ids``: by image, then by input order.

Triage: AUROC (rank statistic, equal to ``sklearn.metrics.roc_auc_score``), sensitivity,
specificity and F1 at the bundle's threshold (an image is called abnormal when its score is
``>= threshold``; there is no default threshold). Images the node did not process
(``status`` ``not_processed`` in ``spine-train predict``'s ``scores.csv``) count as negative
calls with score 0 and are reported separately (``n_not_processed``).

95 % intervals: seeded percentile bootstrap (B = 1000) resampling STUDIES with replacement
(images of a study are correlated), the same resamples for every metric, mAP and per-class AP
included (detections are matched once and re-accumulated with the images' draw counts).

A test split evaluated for a bundle (``--run`` from ``spine-train predict`` or ``--bundle``)
is recorded in the bundle's ledger and model card; a second evaluation of the same split by a
changed bundle is refused unless ``--allow-retest REASON`` is given
(:mod:`training.model_card`).
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
DEFAULT_BOOTSTRAP = 1000
#: COCO's ``maxDets`` for AP (detections kept per image and class).
DEFAULT_MAX_DETECTIONS = 100


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


@dataclass(frozen=True)
class _ClassParts:
    """One class's detections, matched once: what AP (and its bootstrap) is computed from.

    ``scores``/``matched``/``image`` are in evaluation order (score descending, ties by image
    then input order, as pycocotools); ``gt_per_image`` counts ground truth per image index.
    """

    scores: np.ndarray  # (D,)
    matched: np.ndarray  # (T, D) bool
    image: np.ndarray  # (D,) image index
    gt_per_image: np.ndarray  # (n_images,)


def _class_parts(
    image_ids: Sequence[str],
    ground_truth: Iterable[GroundTruthBox],
    detections: Iterable[Detection],
    labels: tuple[str, ...],
    thresholds: np.ndarray,
    max_detections: int | None,
) -> list[_ClassParts]:
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
    n_t = len(thresholds)
    parts = []
    for k in range(len(labels)):
        images = sorted({i for (kk, i) in gts if kk == k} | {i for (kk, i) in dts if kk == k})
        gt_per_image = np.zeros(len(order), dtype=np.int64)
        scores_all: list[np.ndarray] = []
        matched_all: list[np.ndarray] = []
        image_all: list[np.ndarray] = []
        for i in images:
            g_arr = np.asarray(gts.get((k, i), []), dtype=np.float64).reshape(-1, 4)
            d_arr = np.asarray(dts.get((k, i), []), dtype=np.float64).reshape(-1, 5)
            gt_per_image[i] = len(g_arr)
            if len(d_arr) == 0:
                continue
            keep = np.argsort(-d_arr[:, 0], kind="mergesort")
            if max_detections is not None:
                keep = keep[:max_detections]
            d_arr = d_arr[keep]
            scores_all.append(d_arr[:, 0])
            matched_all.append(_match_image(box_iou(d_arr[:, 1:], g_arr), thresholds))
            image_all.append(np.full(len(d_arr), i, dtype=np.int64))
        if scores_all:
            scores = np.concatenate(scores_all)
            matched = np.concatenate(matched_all, axis=1)
            image = np.concatenate(image_all)
        else:
            scores = np.zeros(0)
            matched = np.zeros((n_t, 0), dtype=bool)
            image = np.zeros(0, dtype=np.int64)
        sort = np.argsort(-scores, kind="mergesort")
        parts.append(_ClassParts(scores[sort], matched[:, sort], image[sort], gt_per_image))
    return parts


def _accumulate(
    part: _ClassParts, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Interpolated precision (T, 101) and final recall (T,) of one class; None: no ground truth.

    ``weights`` (n_images,) counts how often each image is drawn (bootstrap); a detection of an
    image drawn twice counts twice, which equals evaluating the duplicated images.
    """
    if weights is None:
        n_gt = float(part.gt_per_image.sum())
        matched = part.matched
        det_w = np.ones(matched.shape[1])
    else:
        n_gt = float(np.dot(weights, part.gt_per_image))
        det_w = weights[part.image].astype(np.float64)
        keep = det_w > 0
        matched = part.matched[:, keep]
        det_w = det_w[keep]
    if n_gt == 0:
        return None
    n_t, n_r = matched.shape[0], len(RECALL_THRESHOLDS)
    tp_sum = np.cumsum(matched * det_w, axis=1)
    fp_sum = np.cumsum(~matched * det_w, axis=1)
    precision = np.zeros((n_t, n_r))
    recall = np.zeros(n_t)
    nd = matched.shape[1]
    if not nd:
        return precision, recall
    for t in range(n_t):
        tp, fp = tp_sum[t], fp_sum[t]
        rc = tp / n_gt
        pr = tp / (fp + tp + np.spacing(1))
        recall[t] = rc[-1]
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        valid = inds < nd
        precision[t, valid] = pr[inds[valid]]
    return precision, recall


def _check_detection_args(
    labels: Sequence[str],
    iou_thresholds: Sequence[float] | np.ndarray,
    max_detections: int | None,
) -> tuple[tuple[str, ...], np.ndarray]:
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
    return labels, thresholds


def coco_average_precision(
    image_ids: Sequence[str],
    ground_truth: Iterable[GroundTruthBox],
    detections: Iterable[Detection],
    *,
    labels: Sequence[str] = LESION_LABELS,
    iou_thresholds: Sequence[float] | np.ndarray = COCO_IOU_THRESHOLDS,
    max_detections: int | None = DEFAULT_MAX_DETECTIONS,
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
        Keep at most this many top-scoring detections per image and class (COCO's
        ``maxDets``, default 100 as in COCO's AP); None keeps all.

    Returns
    -------
    DetectionMetrics
    """
    labels, thresholds = _check_detection_args(labels, iou_thresholds, max_detections)
    parts = _class_parts(image_ids, ground_truth, detections, labels, thresholds, max_detections)
    return _metrics_from_parts(labels, thresholds, parts)


def _metrics_from_parts(
    labels: tuple[str, ...],
    thresholds: np.ndarray,
    parts: Sequence[_ClassParts],
    weights: np.ndarray | None = None,
) -> DetectionMetrics:
    n_t, n_r, n_k = len(thresholds), len(RECALL_THRESHOLDS), len(labels)
    precision = -np.ones((n_t, n_r, n_k))
    recall = -np.ones((n_t, n_k))
    for k, part in enumerate(parts):
        acc = _accumulate(part, weights)
        if acc is not None:
            precision[:, :, k], recall[:, k] = acc
    return DetectionMetrics(
        labels=labels,
        iou_thresholds=thresholds,
        precision=precision,
        recall=recall,
        n_ground_truth={
            lab: int(p.gt_per_image.sum()) for lab, p in zip(labels, parts, strict=True)
        },
        n_detections={lab: int(p.scores.size) for lab, p in zip(labels, parts, strict=True)},
    )


@dataclass(frozen=True)
class DetectionIntervals:
    """Percentile bootstrap 95 % intervals of the detection metrics (studies resampled)."""

    map50_ci95: tuple[float, float]
    map50_95_ci95: tuple[float, float]
    ap50_ci95: Mapping[str, tuple[float, float]]
    n_bootstrap: int
    seed: int


def detection_bootstrap(
    image_ids: Sequence[str],
    ground_truth: Iterable[GroundTruthBox],
    detections: Iterable[Detection],
    resamples: np.ndarray,
    *,
    seed: int = 0,
    labels: Sequence[str] = LESION_LABELS,
    max_detections: int | None = DEFAULT_MAX_DETECTIONS,
) -> DetectionIntervals:
    """Bootstrap 95 % intervals of mAP@0.5, mAP@0.5:0.95 and per-class AP@0.5.

    Detections are matched once; each resample re-accumulates them with the images' draw
    counts (an image drawn twice counts twice, as two copies of it would).

    Parameters
    ----------
    image_ids, ground_truth, detections, labels, max_detections
        As for :func:`coco_average_precision`.
    resamples : numpy.ndarray
        ``(B, n_images)`` draw counts per image (:func:`study_resamples`).
    seed : int
        Recorded only (the resamples carry the randomness).

    Returns
    -------
    DetectionIntervals
    """
    labels, thresholds = _check_detection_args(labels, COCO_IOU_THRESHOLDS, max_detections)
    ids = list(dict.fromkeys(image_ids))
    resamples = np.asarray(resamples)
    if resamples.ndim != 2 or resamples.shape[1] != len(ids):
        raise ValueError(f"resamples must have shape (B, {len(ids)}), got {resamples.shape}")
    parts = _class_parts(ids, ground_truth, detections, labels, thresholds, max_detections)
    t50 = int(np.flatnonzero(np.isclose(thresholds, 0.5))[0])
    map50, map5095 = [], []
    ap50: dict[str, list[float]] = {lab: [] for lab in labels}
    for w in resamples:
        m = _metrics_from_parts(labels, thresholds, parts, w.astype(np.float64))
        p50 = m.precision[t50]
        for k, lab in enumerate(labels):
            if np.all(p50[:, k] >= 0):
                ap50[lab].append(float(np.mean(p50[:, k])))
        v50 = [float(np.mean(p50[:, k])) for k in range(len(labels)) if np.all(p50[:, k] >= 0)]
        if v50:
            map50.append(float(np.mean(v50)))
        valid = m.precision[m.precision > -1]
        if valid.size:
            map5095.append(float(np.mean(valid)))
    return DetectionIntervals(
        map50_ci95=_percentile_ci(np.asarray(map50)),
        map50_95_ci95=_percentile_ci(np.asarray(map5095)),
        ap50_ci95={lab: _percentile_ci(np.asarray(v)) for lab, v in ap50.items()},
        n_bootstrap=int(resamples.shape[0]),
        seed=seed,
    )


def study_resamples(
    groups: Sequence[str] | None, n_images: int, n_bootstrap: int, seed: int
) -> np.ndarray:
    """Draw counts per image of ``n_bootstrap`` resamples of STUDIES (with replacement).

    Parameters
    ----------
    groups : sequence of str, optional
        Study id per image (None: every image is its own study).
    n_images : int
        Number of images.
    n_bootstrap : int
        Resamples.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    numpy.ndarray
        ``(n_bootstrap, n_images)`` int counts: each resample draws as many studies as there
        are, and every image of a drawn study counts once per draw.
    """
    if groups is None:
        study_of = np.arange(n_images)
    else:
        if len(groups) != n_images:
            raise ValueError(
                f"groups must have one study id per image ({n_images}), got {len(groups)}"
            )
        _, study_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_studies = int(study_of.max()) + 1 if n_images else 0
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_studies, size=(n_bootstrap, n_studies))
    counts = np.zeros((n_bootstrap, n_studies), dtype=np.int64)
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], drawn), 1)
    return counts[:, study_of]


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


def _weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``weights`` (B, n): images counted as often as they were drawn."""
    uniq, inv = np.unique(s, return_inverse=True)
    out = np.full(weights.shape[0], np.nan)
    yf = y.astype(np.float64)
    for b, w in enumerate(weights):
        pos = np.bincount(inv, weights=w * yf, minlength=uniq.size)
        neg = np.bincount(inv, weights=w * (1.0 - yf), minlength=uniq.size)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            continue
        below = np.cumsum(neg) - neg
        out[b] = float(np.sum(pos * (below + 0.5 * neg)) / (n_pos * n_neg))
    return out


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
    """Triage metrics at one threshold, with bootstrap 95% CIs (percentile method).

    ``n_not_processed`` images were refused by the node (not processed): they count as
    negative calls with score 0. CIs resample studies (``n_studies``) with replacement.
    """

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
    n_studies: int = 0
    n_not_processed: int = 0


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    not_processed: Sequence[bool] | np.ndarray | None = None,
    resamples: np.ndarray | None = None,
) -> ClassificationMetrics:
    """AUROC, sensitivity, specificity, precision and F1 with seeded bootstrap CIs.

    Parameters
    ----------
    labels : array-like of 0/1
        1 = abnormal image.
    scores : array-like of float
        Predicted probability of "abnormal" (0 for images not processed).
    threshold : float
        An image is called abnormal when ``score >= threshold`` (and it was processed).
        Give the bundle's threshold; there is no default.
    n_bootstrap : int
        Bootstrap resamples (0 disables the CIs: they are then NaN).
    seed : int
        Bootstrap seed.
    groups : sequence of str, optional
        Study id per image: the bootstrap resamples studies (default: each image alone).
    not_processed : array-like of bool, optional
        Images the node refused: always a negative call.
    resamples : numpy.ndarray, optional
        ``(B, n)`` draw counts (:func:`study_resamples`) to share with other metrics;
        overrides ``n_bootstrap``/``seed``/``groups`` for the CIs.

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
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an int >= 0, got {n_bootstrap!r}")
    refused = (
        np.zeros(y.size, dtype=bool)
        if not_processed is None
        else np.asarray(not_processed, dtype=bool).reshape(-1)
    )
    if refused.shape != y.shape:
        raise ValueError(f"not_processed must have one flag per image, got {refused.shape}")
    value = auroc(y, s)
    pred = (s >= threshold) & ~refused
    r = _rates(y, pred)
    nan_ci = (float("nan"), float("nan"))
    auc_ci = sens_ci = spec_ci = f1_ci = nan_ci
    if resamples is None and n_bootstrap:
        resamples = study_resamples(groups, y.size, n_bootstrap, seed)
    if resamples is not None and resamples.shape[0]:
        w = np.asarray(resamples, dtype=np.float64)
        auc_ci = _percentile_ci(_weighted_auroc(y, s, w))
        tp = w @ (y & pred)
        fp = w @ (~y & pred)
        fn = w @ (y & ~pred)
        tn = w @ (~y & ~pred)
        with np.errstate(divide="ignore", invalid="ignore"):
            sens_ci = _percentile_ci(tp / (tp + fn))
            spec_ci = _percentile_ci(tn / (tn + fp))
            f1_ci = _percentile_ci(2 * tp / (2 * tp + fp + fn))
    n_studies = y.size if groups is None else len(set(groups))
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
        n_bootstrap=0 if resamples is None else int(resamples.shape[0]),
        seed=seed,
        n_studies=n_studies,
        n_not_processed=int(refused.sum()),
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
    detection_ci: DetectionIntervals | None = None

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
                    "n_not_processed": c.n_not_processed,
                    "n_studies": c.n_studies,
                    "bootstrap": c.n_bootstrap,
                    "bootstrap_unit": "study",
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
                    "max_detections": DEFAULT_MAX_DETECTIONS,
                }
            )
        ci = self.detection_ci
        if ci is not None:
            out.update(
                {
                    "map50_ci95": [_num(x) for x in ci.map50_ci95],
                    "map50_95_ci95": [_num(x) for x in ci.map50_95_ci95],
                    "ap50_ci95": {k: [_num(x) for x in v] for k, v in ci.ap50_ci95.items()},
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
    threshold: float,
    labels: Mapping[str, int] | None = None,
    scores: Mapping[str, float] | None = None,
    ground_truth: Iterable[GroundTruthBox] = (),
    detections: Iterable[Detection] | None = None,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    max_detections: int | None = DEFAULT_MAX_DETECTIONS,
    studies: Mapping[str, str] | None = None,
    not_processed: Iterable[str] = (),
) -> EvaluationReport:
    """Evaluate in-memory predictions (the library form of ``spine-train evaluate``).

    Parameters
    ----------
    image_ids : sequence of str
        The evaluated images (all of them, normal ones included).
    threshold : float
        The bundle's decision threshold (``score >= threshold`` is abnormal).
    labels : Mapping[str, int], optional
        Image id -> 1 abnormal / 0 normal; needed with ``scores``.
    scores : Mapping[str, float], optional
        Image id -> triage score; every image must have one. None skips triage metrics.
    ground_truth : iterable of GroundTruthBox
        Lesion boxes.
    detections : iterable of Detection, optional
        None skips detection metrics.
    n_bootstrap, seed :
        Bootstrap resamples (of studies) and seed; the same resamples serve every CI.
    max_detections : int, optional
        See :func:`coco_average_precision` (COCO's 100 by default).
    studies : Mapping[str, str], optional
        Image id -> study id: the bootstrap resamples studies (default: images).
    not_processed : iterable of str
        Images the node refused: scored 0 and called negative.

    Returns
    -------
    EvaluationReport
    """
    ids = list(dict.fromkeys(image_ids))
    if not ids:
        raise ValueError("image_ids must not be empty")
    groups = None
    if studies is not None:
        missing = [i for i in ids if i not in studies]
        if missing:
            raise ValueError(f"{len(missing)} images have no study id, e.g. {missing[0]!r}")
        groups = [studies[i] for i in ids]
    resamples = study_resamples(groups, len(ids), n_bootstrap, seed) if n_bootstrap else None
    refused = set(not_processed)
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
            [0.0 if i in refused else scores[i] for i in ids],
            threshold=threshold,
            n_bootstrap=n_bootstrap,
            seed=seed,
            groups=groups,
            not_processed=[i in refused for i in ids],
            resamples=resamples,
        )
    det = None
    det_ci = None
    if detections is not None:
        gt_list = list(ground_truth)
        dt_list = list(detections)
        det = coco_average_precision(ids, gt_list, dt_list, max_detections=max_detections)
        if resamples is not None:
            det_ci = detection_bootstrap(
                ids, gt_list, dt_list, resamples, seed=seed, max_detections=max_detections
            )
    return EvaluationReport(
        n_images=len(ids), classification=cls, detection=det, detection_ci=det_ci
    )


# --------------------------------------------------------------------------------------------
# Files and CLI
# --------------------------------------------------------------------------------------------

#: ``status`` value of an image the node did not process (``spine-train predict``).
NOT_PROCESSED = "not_processed"


@dataclass(frozen=True)
class ScoreTable:
    """Triage scores read from a CSV (``image_id,score[,status]``)."""

    scores: Mapping[str, float]
    not_processed: frozenset[str] = frozenset()


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


def read_score_table(path: str | os.PathLike[str]) -> ScoreTable:
    """Read ``image_id,score[,status]`` rows.

    A row whose ``status`` is ``not_processed`` (the node refused the image) may leave the
    score empty: it is scored 0 and listed in ``not_processed``.
    """
    out: dict[str, float] = {}
    refused: set[str] = set()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("image_id", "score") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            image_id = row["image_id"].strip()
            if image_id in out:
                raise ValueError(f"{path}:{line}: image {image_id!r} scored twice")
            if (row.get("status") or "").strip() == NOT_PROCESSED:
                refused.add(image_id)
                out[image_id] = 0.0
                continue
            try:
                out[image_id] = float(row["score"])
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: score {row['score']!r} is not a number") from exc
    return ScoreTable(out, frozenset(refused))


def read_scores_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read ``image_id,score`` rows (not-processed rows score 0; see :func:`read_score_table`)."""
    return dict(read_score_table(path).scores)


def evaluate_files(
    annotations: str | os.PathLike[str],
    *,
    threshold: float,
    predictions: str | os.PathLike[str] | None = None,
    scores: str | os.PathLike[str] | None = None,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> EvaluationReport:
    """Evaluate prediction CSV files against a VinDr annotation CSV (bootstrap over studies)."""
    from training.vindr import read_annotations

    records = read_annotations(annotations, "test")
    ids = [r.image_id for r in records]
    gt = [
        GroundTruthBox(r.image_id, b.label, b.xmin, b.ymin, b.xmax, b.ymax)
        for r in records
        for b in r.boxes
    ]
    labels = {r.image_id: r.label for r in records}
    table = read_score_table(scores) if scores is not None else None
    if table is not None:
        extra = set(table.scores) - set(ids)
        if extra:
            logger.warning("%d scored images are not in the annotations; ignored", len(extra))
    dets = read_detections_csv(predictions) if predictions is not None else None
    return evaluate(
        ids,
        labels=labels,
        scores=None if table is None else table.scores,
        not_processed=() if table is None else table.not_processed,
        ground_truth=gt,
        detections=dets,
        threshold=threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
        studies={r.image_id: r.study_id for r in records},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` subcommand's arguments to ``parser``."""
    parser.add_argument(
        "--run",
        type=Path,
        help="output directory of `spine-train predict` (its scores.csv, detections.csv and "
        "predict.json give the annotations, the bundle and the split)",
    )
    parser.add_argument("--annotations", type=Path, help="VinDr annotation CSV (test.csv)")
    parser.add_argument(
        "--predictions",
        type=Path,
        help="detections CSV: image_id,lesion_type,score,xmin,ymin,xmax,ymax",
    )
    parser.add_argument("--scores", type=Path, help="triage scores CSV: image_id,score[,status]")
    parser.add_argument(
        "--bundle",
        type=Path,
        help="model bundle: its threshold is used and a test-split evaluation is recorded in "
        "its model card",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="triage threshold, score >= threshold is abnormal (default: the bundle's)",
    )
    parser.add_argument(
        "--allow-retest",
        metavar="REASON",
        help="evaluate a test split already evaluated with another bundle (recorded)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        help=f"bootstrap resamples of studies for the 95%% CIs (default {DEFAULT_BOOTSTRAP})",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON here")
    parser.add_argument("--plots", type=Path, help="write ROC / PR / confusion PNGs here")


#: Keys of a report kept in the model card's ledger.
LEDGER_FIGURES = (
    "threshold",
    "auroc",
    "auroc_ci95",
    "sensitivity",
    "sensitivity_ci95",
    "specificity",
    "specificity_ci95",
    "f1",
    "f1_ci95",
    "map50",
    "map50_ci95",
    "map50_95",
    "map50_95_ci95",
    "ap50",
    "ap50_ci95",
    "n_not_processed",
    "n_abnormal",
    "n_normal",
    "n_studies",
    "bootstrap",
    "seed",
)


def _command_line() -> str:
    args = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    return "spine-train " + " ".join(args)


def evaluate_and_record(
    annotations: Path,
    *,
    scores: Path | None = None,
    predictions: Path | None = None,
    bundle: Path | None = None,
    threshold: float | None = None,
    split: str | None = None,
    prediction_run: Any = None,
    allow_retest: str | None = None,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    command: str = "",
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate prediction files; record a test-split evaluation in the bundle's model card.

    Parameters
    ----------
    annotations : pathlib.Path
        The split's VinDr annotation CSV.
    scores, predictions : pathlib.Path, optional
        ``scores.csv`` / ``detections.csv`` (``spine-train predict``).
    bundle : pathlib.Path, optional
        The bundle that made the predictions: its threshold is the default and a test-split
        evaluation is recorded in its ledger and model card.
    threshold : float, optional
        Overrides the bundle's threshold; required without a bundle.
    split : str, optional
        Split name (default: the annotation file's stem).
    prediction_run : training.predict.PredictionRun, optional
        The predictions' provenance; its bundle hash must match ``bundle``.
    allow_retest : str, optional
        Reason to evaluate a test split already evaluated with another bundle.
    n_bootstrap, seed : int
        Bootstrap resamples of studies and seed.
    command : str
        The command line recorded in the ledger.
    plots_dir : pathlib.Path, optional
        Write ROC / PR / confusion PNGs here.

    Returns
    -------
    dict
        The report's JSON (see :meth:`EvaluationReport.to_json`) plus split and bundle hashes.

    Raises
    ------
    training.model_card.RetestRefusedError
        A test split already evaluated with another bundle, and no reason given.
    ValueError
        No threshold, or predictions made by another bundle.
    """
    from training import model_card

    digest = None
    version = ""
    if bundle is not None:
        from spine_node.models.bundle import load_manifest

        manifest = load_manifest(Path(bundle))
        version = manifest.version
        if threshold is None:
            threshold = manifest.threshold
        digest = model_card.bundle_hash(bundle)
        if prediction_run is not None and prediction_run.bundle_hash != digest:
            raise ValueError(
                f"the predictions were made by bundle hash {prediction_run.bundle_hash[:12]}, "
                f"but {bundle} has hash {digest[:12]}; run spine-train predict again"
            )
    if threshold is None:
        raise ValueError("give a bundle (its threshold is used) or a threshold")
    split = split or Path(annotations).stem
    split_digest = model_card.split_hash(annotations)
    record_it = split == "test" and bundle is not None and digest is not None
    reason = allow_retest
    if record_it:
        assert bundle is not None and digest is not None
        reason = model_card.check_retest(bundle, split_digest, digest, allow_retest)
    elif split == "test":
        logger.warning("test split evaluated without a bundle: not recorded in any model card")
    report = evaluate_files(
        annotations,
        predictions=predictions,
        scores=scores,
        threshold=float(threshold),
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    data = report.to_json()
    data["split"] = split
    data["split_hash"] = split_digest
    if digest is not None:
        data["bundle_hash"] = digest
    if plots_dir is not None:
        from training import plots
        from training.vindr import read_annotations

        written = plots.write_report_plots(
            report,
            plots_dir,
            labels={r.image_id: r.label for r in read_annotations(annotations, "test")},
            scores=read_scores_csv(scores) if scores is not None else None,
        )
        data["plots"] = [str(p) for p in written]
    if record_it:
        assert bundle is not None and digest is not None
        record = model_card.record_evaluation(
            bundle,
            model_card.EvaluationRecord(
                when=model_card.now_utc(),
                split=split,
                split_hash=split_digest,
                bundle_hash=digest,
                bundle_version=version,
                n_images=report.n_images,
                command=command,
                reason=reason,
                figures={k: data[k] for k in LEDGER_FIGURES if k in data},
                data=str(prediction_run.data if prediction_run is not None else annotations),
            ),
        )
        data["recorded_in"] = str(Path(bundle) / model_card.MODEL_CARD_NAME)
        data["retest_reason"] = record.reason
    return data


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train evaluate``; returns the exit status (2: bad use or refused re-test)."""
    from training import model_card
    from training.predict import PredictionRun

    annotations, scores, predictions = args.annotations, args.scores, args.predictions
    bundle = args.bundle
    split = None
    prediction_run: PredictionRun | None = None
    if args.run is not None:
        prediction_run = PredictionRun.read(args.run)
        annotations = annotations or prediction_run.annotations
        scores = scores or Path(args.run) / "scores.csv"
        predictions = predictions or Path(args.run) / "detections.csv"
        bundle = bundle or prediction_run.bundle
        split = prediction_run.split
    if annotations is None:
        print("evaluate: give --run DIR or --annotations CSV", file=sys.stderr)
        return 2
    if predictions is None and scores is None:
        print("evaluate: give --predictions and/or --scores", file=sys.stderr)
        return 2
    try:
        data = evaluate_and_record(
            Path(annotations),
            scores=scores,
            predictions=predictions,
            bundle=bundle,
            threshold=args.threshold,
            split=split,
            prediction_run=prediction_run,
            allow_retest=args.allow_retest
            or (prediction_run.allow_retest if prediction_run is not None else None),
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            command=_command_line(),
            plots_dir=args.plots,
        )
    except model_card.RetestRefusedError as exc:
        print(f"evaluate: refused: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(data, indent=2)
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(text)
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0


__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_MAX_DETECTIONS",
    "NOT_PROCESSED",
    "RECALL_THRESHOLDS",
    "ClassificationMetrics",
    "Detection",
    "DetectionIntervals",
    "DetectionMetrics",
    "EvaluationReport",
    "GroundTruthBox",
    "ScoreTable",
    "add_arguments",
    "auroc",
    "box_iou",
    "classification_metrics",
    "coco_average_precision",
    "detection_bootstrap",
    "evaluate",
    "evaluate_and_record",
    "evaluate_files",
    "read_detections_csv",
    "read_score_table",
    "read_scores_csv",
    "run",
    "study_resamples",
]

"""training.evaluate: COCO AP equals pycocotools, AUROC equals scikit-learn, CLI JSON."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import roc_auc_score

from spine_node.results.types import LESION_LABELS
from training import evaluate as ev
from training.vindr import NO_FINDING


def _random_case(
    seed: int, n_images: int = 40
) -> tuple[list[str], list[ev.GroundTruthBox], list[ev.Detection]]:
    """Random GT and predictions with realistic overlaps, duplicates, ties and empty images."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(n_images)]
    gts: list[ev.GroundTruthBox] = []
    dets: list[ev.Detection] = []
    labels = LESION_LABELS[:-1]  # the last class never has ground truth (AP undefined)
    for image_id in ids:
        boxes: list[tuple[str, float, float, float, float]] = []
        if rng.random() >= 0.35:  # else a normal image: no ground truth, maybe false positives
            for _ in range(int(rng.integers(1, 5))):
                x, y = rng.uniform(0, 400, 2)
                w, h = rng.uniform(8, 120, 2)
                boxes.append((str(rng.choice(labels)), x, y, x + w, y + h))
        for label, x0, y0, x1, y1 in boxes:
            gts.append(ev.GroundTruthBox(image_id, label, x0, y0, x1, y1))
            for _ in range(int(rng.integers(0, 3))):  # jittered hits, some duplicates
                jitter = rng.normal(0, 0.15 * (x1 - x0), 4)
                bx0, by0 = x0 + jitter[0], y0 + jitter[1]
                bx1 = max(bx0 + 1, x1 + jitter[2])
                by1 = max(by0 + 1, y1 + jitter[3])
                lab = label if rng.random() < 0.85 else str(rng.choice(LESION_LABELS))
                score = round(float(rng.random()), 2)  # coarse scores -> ties
                dets.append(ev.Detection(image_id, lab, score, bx0, by0, bx1, by1))
        for _ in range(int(rng.integers(0, 3))):  # pure false positives (all classes)
            x, y = rng.uniform(0, 400, 2)
            w, h = rng.uniform(8, 120, 2)
            lab = str(rng.choice(LESION_LABELS))
            dets.append(
                ev.Detection(image_id, lab, round(float(rng.random()), 2), x, y, x + w, y + h)
            )
    # An exact duplicate GT box pair, to exercise equal-IoU ties.
    gts.append(ev.GroundTruthBox(ids[0], labels[0], 10, 10, 50, 50))
    gts.append(ev.GroundTruthBox(ids[0], labels[0], 10, 10, 50, 50))
    dets.append(ev.Detection(ids[0], labels[0], 0.5, 12, 12, 50, 50))
    return ids, gts, dets


def _pycocotools(
    ids: list[str],
    gts: list[ev.GroundTruthBox],
    dets: list[ev.Detection],
    iou_thrs: np.ndarray,
) -> np.ndarray:
    """Run the real COCOeval; returns its precision array (T, R, K)."""
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(LESION_LABELS)]
    index = {image_id: i + 1 for i, image_id in enumerate(ids)}
    gt_json = {
        "images": [{"id": index[i], "width": 1000, "height": 1000} for i in ids],
        "categories": cats,
        "annotations": [
            {
                "id": n + 1,
                "image_id": index[g.image_id],
                "category_id": LESION_LABELS.index(g.label) + 1,
                "bbox": [g.xmin, g.ymin, g.xmax - g.xmin, g.ymax - g.ymin],
                "area": (g.xmax - g.xmin) * (g.ymax - g.ymin),
                "iscrowd": 0,
            }
            for n, g in enumerate(gts)
        ],
    }
    dt_json = [
        {
            "image_id": index[d.image_id],
            "category_id": LESION_LABELS.index(d.label) + 1,
            "bbox": [d.xmin, d.ymin, d.xmax - d.xmin, d.ymax - d.ymin],
            "score": d.score,
        }
        for d in dets
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_json)
        cocoeval = COCOeval(coco_gt, coco_dt, "bbox")
        cocoeval.params.iouThrs = iou_thrs
        cocoeval.params.maxDets = [100000]
        cocoeval.params.areaRng = [[0, 1e10]]
        cocoeval.params.areaRngLbl = ["all"]
        cocoeval.evaluate()
        cocoeval.accumulate()
    return np.asarray(cocoeval.eval["precision"][:, :, :, 0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_thrs", [np.array([0.5]), ev.COCO_IOU_THRESHOLDS])
def test_ap_equals_pycocotools(seed: int, iou_thrs: np.ndarray) -> None:
    ids, gts, dets = _random_case(seed)
    ours = ev.coco_average_precision(ids, gts, dets, iou_thresholds=iou_thrs)
    theirs = _pycocotools(ids, gts, dets, iou_thrs)
    assert ours.precision.shape == theirs.shape
    np.testing.assert_allclose(ours.precision, theirs, atol=1e-6, rtol=0)
    # Per-class AP and the means, as COCOeval.summarize computes them.
    for k, label in enumerate(LESION_LABELS):
        block = theirs[:, :, k] if len(iou_thrs) > 1 else theirs[0, :, k]
        if np.all(block == -1):
            assert ours.ap(label, None) is None
        else:
            expected = float(np.mean(block))
            got = ours.ap(label, None if len(iou_thrs) > 1 else 0.5)
            assert got is not None and abs(got - expected) < 1e-6
    valid = theirs[theirs > -1]
    assert ours.map50_95 is not None and abs(ours.map50_95 - float(np.mean(valid))) < 1e-6
    # The class without ground truth is null and left out of the mean.
    assert ours.ap50[LESION_LABELS[-1]] is None
    ap50 = [v for v in ours.ap50.values() if v is not None]
    assert ours.map50 is not None and abs(ours.map50 - float(np.mean(ap50))) < 1e-12


def test_ap_perfect_and_empty() -> None:
    ids = ["a", "b", "c"]
    gts = [ev.GroundTruthBox("a", "Osteophytes", 0, 0, 10, 10)]
    perfect = [ev.Detection("a", "Osteophytes", 0.9, 0, 0, 10, 10)]
    m = ev.coco_average_precision(ids, gts, perfect)
    assert m.ap50["Osteophytes"] == pytest.approx(1.0)
    assert m.map50 == pytest.approx(1.0)
    # A higher-scoring false positive on a normal image halves precision at full recall.
    fp = [ev.Detection("c", "Osteophytes", 0.95, 0, 0, 10, 10), *perfect]
    m2 = ev.coco_average_precision(ids, gts, fp)
    assert m2.ap50["Osteophytes"] == pytest.approx(0.5)
    none = ev.coco_average_precision(ids, gts, [])
    assert none.ap50["Osteophytes"] == 0.0
    assert none.ap50["Surgical implant"] is None


def test_ap_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="label"):
        ev.coco_average_precision(["a"], [], [ev.Detection("a", "Fracture", 0.5, 0, 0, 1, 1)])
    with pytest.raises(ValueError, match="image_ids"):
        ev.coco_average_precision(["a"], [ev.GroundTruthBox("b", "Osteophytes", 0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match="score"):
        ev.Detection("a", "Osteophytes", float("nan"), 0, 0, 1, 1)


@pytest.mark.parametrize("seed", [0, 3])
def test_auroc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.6 + 0.4 * y, 2)  # ties included
    assert ev.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError, match="both"):
        ev.auroc(np.ones(5), rng.random(5))


def test_classification_metrics_and_bootstrap() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    m = ev.classification_metrics(y, s, threshold=0.478, n_bootstrap=1000, seed=7)
    pred = s >= 0.478
    tp, fn = int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 1)))
    tn, fp = int(np.sum(~pred & (y == 0))), int(np.sum(pred & (y == 0)))
    assert m.sensitivity == pytest.approx(tp / (tp + fn))
    assert m.specificity == pytest.approx(tn / (tn + fp))
    assert m.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m.confusion == ((tn, fp), (fn, tp))
    lo, hi = m.auroc_ci95
    assert 0.0 <= lo < m.auroc < hi <= 1.0
    assert hi - lo < 0.15
    again = ev.classification_metrics(y, s, threshold=0.478, n_bootstrap=1000, seed=7)
    assert again.auroc_ci95 == m.auroc_ci95  # seeded
    other = ev.classification_metrics(y, s, threshold=0.478, n_bootstrap=1000, seed=8)
    assert other.auroc_ci95 != m.auroc_ci95


def _write_case(
    tmp_path: Path,
) -> tuple[
    Path, Path, Path, list[str], list[ev.GroundTruthBox], list[ev.Detection], dict[str, float]
]:
    ids, gts, dets = _random_case(11, n_images=30)
    rng = np.random.default_rng(11)
    abnormal = {g.image_id for g in gts}
    scores = {i: float(np.clip(rng.normal(0.6 if i in abnormal else 0.35, 0.2), 0, 1)) for i in ids}
    ann = tmp_path / "test.csv"
    with open(ann, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "study_id",
                "series_id",
                "image_id",
                "rad_id",
                "lesion_type",
                "xmin",
                "ymin",
                "xmax",
                "ymax",
            ]
        )
        for i in ids:
            mine = [g for g in gts if g.image_id == i]
            if not mine:
                w.writerow([f"s{i}", f"r{i}", i, "rad1", NO_FINDING, "", "", "", ""])
            for g in mine:
                w.writerow(
                    [
                        f"s{i}",
                        f"r{i}",
                        i,
                        "rad1",
                        g.label,
                        repr(float(g.xmin)),
                        repr(float(g.ymin)),
                        repr(float(g.xmax)),
                        repr(float(g.ymax)),
                    ]
                )
    det = tmp_path / "det.csv"
    with open(det, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "lesion_type", "score", "xmin", "ymin", "xmax", "ymax"])
        for d in dets:
            w.writerow(
                [
                    d.image_id,
                    d.label,
                    repr(float(d.score)),
                    repr(float(d.xmin)),
                    repr(float(d.ymin)),
                    repr(float(d.xmax)),
                    repr(float(d.ymax)),
                ]
            )
    cls = tmp_path / "cls.csv"
    with open(cls, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "score"])
        for i, s in scores.items():
            w.writerow([i, repr(float(s))])
    return ann, det, cls, ids, gts, dets, scores


def test_cli_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    ann, det, cls, ids, gts, dets, scores = _write_case(tmp_path)
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    args = parser.parse_args(
        [
            "--annotations",
            str(ann),
            "--predictions",
            str(det),
            "--scores",
            str(cls),
            "--json",
            "--plots",
            str(tmp_path / "plots"),
            "--bootstrap",
            "200",
            "--threshold",
            "0.478",
        ]
    )
    assert ev.run(args) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("map50", "map50_95", "auroc", "sensitivity", "specificity", "f1"):
        assert 0.0 <= data[key] <= 1.0, key
    assert set(data["ap50"]) == set(LESION_LABELS)
    assert data["ap50"][LESION_LABELS[-1]] is None
    assert all(0.0 <= x <= 1.0 for x in data["auroc_ci95"])
    assert data["threshold"] == pytest.approx(0.478)
    # Same numbers as the library on the same inputs (and as scikit-learn for AUROC).
    m = ev.coco_average_precision(ids, gts, dets)
    assert data["map50"] == pytest.approx(m.map50, abs=1e-9)
    y = [1 if any(g.image_id == i for g in gts) else 0 for i in ids]
    assert data["auroc"] == pytest.approx(roc_auc_score(y, [scores[i] for i in ids]), abs=1e-9)
    for name in ("roc.png", "pr_curves.png", "confusion.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000


def test_cli_needs_some_predictions(tmp_path: Path) -> None:
    import argparse

    ann, *_ = _write_case(tmp_path)
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    assert ev.run(parser.parse_args(["--annotations", str(ann)])) == 2
    # no bundle and no --threshold: there is no default threshold to fall back on
    _, _, cls, *_ = _write_case(tmp_path)
    assert ev.run(parser.parse_args(["--annotations", str(ann), "--scores", str(cls)])) == 2


def test_missing_scores_rejected() -> None:
    with pytest.raises(ValueError, match="no score"):
        ev.evaluate(["a", "b"], labels={"a": 1, "b": 0}, scores={"a": 0.3}, threshold=0.5)


def test_report_json_nulls() -> None:
    rep = ev.evaluate(["a"], detections=[], ground_truth=[], threshold=0.5)
    data = rep.to_json()
    assert data["map50"] is None
    assert all(v is None for v in data["ap50"].values())
    assert not math.isnan(data["n_images"])


def test_max_detections_is_cocos_100_as_pycocotools() -> None:
    """More than 100 detections of one class on one image: only the top 100 count (maxDets)."""
    rng = np.random.default_rng(4)
    ids = ["busy", "calm"]
    label = LESION_LABELS[0]
    gts = [ev.GroundTruthBox("busy", label, 10.0 * i, 0, 10.0 * i + 8, 8) for i in range(60)]
    gts.append(ev.GroundTruthBox("calm", label, 0, 0, 20, 20))
    dets = []
    for i in range(150):  # 150 detections on one image: hits and misses, distinct scores
        x = 10.0 * (i % 60) + (0 if i < 60 else 200)
        dets.append(ev.Detection("busy", label, float(rng.random()), x, 0, x + 8, 8))
    dets.append(ev.Detection("calm", label, 0.5, 0, 0, 20, 20))
    ours = ev.coco_average_precision(ids, gts, dets, iou_thresholds=np.array([0.5]))
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(LESION_LABELS)]
    gt_json = {
        "images": [{"id": 1, "width": 2000, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": cats,
        "annotations": [
            {"id": n + 1, "image_id": 1 if g.image_id == "busy" else 2, "category_id": 1,
             "bbox": [g.xmin, g.ymin, g.xmax - g.xmin, g.ymax - g.ymin],
             "area": (g.xmax - g.xmin) * (g.ymax - g.ymin), "iscrowd": 0}
            for n, g in enumerate(gts)
        ],
    }
    dt_json = [
        {"image_id": 1 if d.image_id == "busy" else 2, "category_id": 1,
         "bbox": [d.xmin, d.ymin, d.xmax - d.xmin, d.ymax - d.ymin], "score": d.score}
        for d in dets
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        cocoeval = COCOeval(coco_gt, coco_gt.loadRes(dt_json), "bbox")
        cocoeval.params.iouThrs = np.array([0.5])
        cocoeval.params.areaRng = [[0, 1e10]]
        cocoeval.params.areaRngLbl = ["all"]  # maxDets left at COCO's [1, 10, 100]
        cocoeval.evaluate()
        cocoeval.accumulate()
    theirs = np.asarray(cocoeval.eval["precision"][:, :, :, 0, -1])
    np.testing.assert_allclose(ours.precision, theirs, atol=1e-9)
    everything = ev.coco_average_precision(
        ids, gts, dets, iou_thresholds=np.array([0.5]), max_detections=None
    )
    assert everything.ap(label) != ours.ap(label)  # the cap matters on this image
    assert ours.n_detections[label] == 101


def test_bootstrap_resamples_whole_studies() -> None:
    groups = ["s1", "s1", "s1", "s2", "s3", "s3"]
    counts = ev.study_resamples(groups, 6, 500, seed=3)
    assert counts.shape == (500, 6)
    # the images of one study are drawn together, as often as their study
    assert np.all(counts[:, 0] == counts[:, 1]) and np.all(counts[:, 1] == counts[:, 2])
    assert np.all(counts[:, 4] == counts[:, 5])
    # each resample draws as many studies as there are (3)
    studies = counts[:, [0, 3, 4]]
    assert np.all(studies.sum(axis=1) == 3)
    np.testing.assert_array_equal(counts, ev.study_resamples(groups, 6, 500, seed=3))
    assert not np.array_equal(counts, ev.study_resamples(groups, 6, 500, seed=4))


def test_classification_ci_uses_studies_and_counts_refused_images_as_negative() -> None:
    rng = np.random.default_rng(9)
    n_studies = 60
    groups = [f"s{i // 4}" for i in range(4 * n_studies)]  # 4 images per study
    study_y = rng.integers(0, 2, n_studies)
    y = np.repeat(study_y, 4)
    s = np.repeat(np.clip(rng.normal(0.3 + 0.4 * study_y, 0.2), 0, 1), 4)  # views of a study agree
    by_study = ev.classification_metrics(y, s, threshold=0.5, n_bootstrap=400, seed=1,
                                         groups=groups)
    by_image = ev.classification_metrics(y, s, threshold=0.5, n_bootstrap=400, seed=1)
    # images of a study are correlated (same label): resampling images understates the spread
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_study.sensitivity_ci95) > 1.5 * width(by_image.sensitivity_ci95)
    assert width(by_study.auroc_ci95) > 1.5 * width(by_image.auroc_ci95)
    assert by_study.n_studies == n_studies and by_image.n_studies == y.size
    # the weighted AUROC of the identity resample is the plain AUROC
    ident = np.ones((1, y.size), dtype=np.int64)
    assert ev._weighted_auroc(y.astype(bool), s, ident)[0] == pytest.approx(
        roc_auc_score(y, s), abs=1e-12
    )
    # an image the node refused is a negative call even at threshold 0, with score 0
    refused = np.zeros(y.size, dtype=bool)
    refused[np.flatnonzero(y == 1)[:3]] = True
    m = ev.classification_metrics(np.asarray(y), np.where(refused, 0.0, s), threshold=0.0,
                                  n_bootstrap=0, not_processed=refused)
    assert m.confusion[1][0] == 3 and m.n_not_processed == 3


def test_detection_bootstrap_equals_evaluating_the_duplicated_images() -> None:
    ids, gts, dets = _random_case(21, n_images=25)
    rng = np.random.default_rng(0)
    # distinct scores: with ties, duplicated images may be ordered differently
    dets = [ev.Detection(d.image_id, d.label, float(rng.random()), d.xmin, d.ymin, d.xmax,
                         d.ymax) for d in dets]
    counts = ev.study_resamples(None, len(ids), 3, seed=5)
    ci = ev.detection_bootstrap(ids, gts, dets, counts)
    assert ci.n_bootstrap == 3
    maps = []
    for row in counts:
        dup_ids, dup_gts, dup_dets = [], [], []
        for i, image_id in enumerate(ids):
            for copy in range(int(row[i])):
                new = f"{image_id}#{copy}"
                dup_ids.append(new)
                dup_gts += [ev.GroundTruthBox(new, g.label, g.xmin, g.ymin, g.xmax, g.ymax)
                            for g in gts if g.image_id == image_id]
                dup_dets += [ev.Detection(new, d.label, d.score, d.xmin, d.ymin, d.xmax, d.ymax)
                             for d in dets if d.image_id == image_id]
        m = ev.coco_average_precision(dup_ids, dup_gts, dup_dets)
        maps.append(m.map50)
    lo, hi = np.percentile(maps, [2.5, 97.5])
    assert ci.map50_ci95[0] == pytest.approx(lo, abs=1e-9)
    assert ci.map50_ci95[1] == pytest.approx(hi, abs=1e-9)

"""Overlay labels never cover each other or another finding's box (issue 9 point 7)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from spine_node.results.layout import Rect, outline, place_labels
from spine_node.results.overlay import render_overlay, upscale_factor
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status

MODEL = ModelInfo(name="dernet-yolo11", version="1.2.0")


def _check(
    boxes: list[Rect], sizes: list[tuple[int, int]], width: int, height: int, edge: int = 4
) -> int:
    layout = place_labels(boxes, sizes, width, height, edge)
    assert len(layout.labels) == len(boxes)
    for (i, a), (j, b) in itertools.combinations(enumerate(layout.labels), 2):
        assert not a.intersects(b), f"label {i + 1} covers label {j + 1}: {a} {b}"
    for i, label in enumerate(layout.labels):
        assert (label.width, label.height) == sizes[i]
        for j, box in enumerate(boxes):
            if i != j:
                assert not label.intersects(box), f"label {i + 1} covers box {j + 1}"
            else:
                for strip in outline(box, edge):
                    assert not label.intersects(strip), f"label {i + 1} covers its box's outline"
        if label.x0 < width:
            assert label.inside(width, height), f"label {i + 1} leaves the image: {label}"
        else:
            assert label.x1 <= width + layout.side_width and label.y0 >= 0
    return layout.side_width


def test_crowded_random_findings():
    rng = random.Random(7)
    for _trial in range(40):
        width, height = 900, 1200
        n = rng.randint(5, 30)
        boxes = []
        for _ in range(n):
            w, h = rng.randint(40, 300), rng.randint(30, 200)
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            boxes.append(Rect(x, y, x + w, y + h))
        sizes = [(rng.randint(120, 320), 26) for _ in range(n)]
        _check(boxes, sizes, width, height)


def test_stacked_vertebral_levels_on_a_lateral_view():
    # the reported case: findings at consecutive levels, labels of 1 and 4 collided
    boxes = [Rect(300, 200 + 110 * k, 560, 300 + 110 * k) for k in range(6)]
    boxes.append(Rect(280, 420, 600, 560))  # a wide finding overlapping two levels
    sizes = [(330, 30)] * len(boxes)
    assert _check(boxes, sizes, 1000, 1100) == 0  # room beside the spine: no side column


def test_findings_covering_the_image_use_the_side_column():
    boxes = [Rect(0, 0, 800, 600), Rect(0, 0, 800, 600), Rect(5, 5, 795, 595)]
    side = _check(boxes, [(200, 30)] * 3, 800, 600)
    assert side > 0
    many = [Rect(0, 0, 800, 600)] * 2 + [Rect(10 * k, 0, 800, 600) for k in range(60)]
    assert _check(many, [(150, 30)] * len(many), 800, 600) > 150  # several columns


def test_rect_and_inputs_are_checked():
    assert Rect(0, 0, 10, 10).intersects(Rect(9, 9, 20, 20))
    assert not Rect(0, 0, 10, 10).intersects(Rect(10, 0, 20, 10))  # touching is not covering
    with pytest.raises(ValueError, match="x1 >= x0"):
        Rect(5, 0, 4, 1)
    with pytest.raises(ValueError, match="differ in length"):
        place_labels([Rect(0, 0, 1, 1)], [], 10, 10)
    with pytest.raises(ValueError, match="positive"):
        place_labels([Rect(0, 0, 1, 1)], [(0, 5)], 10, 10)


def _findings(boxes: list[tuple[float, float, float, float]]) -> tuple[Finding, ...]:
    return tuple(Finding("Osteophytes", 0.5, box) for box in boxes)


def test_rendered_overlay_keeps_every_box_edge_visible():
    rows, cols = 1000, 800
    pixels = np.full((rows, cols), 0.4, dtype=np.float32)
    boxes = [(300.0, 100.0 + 90 * k, 520.0, 180.0 + 90 * k) for k in range(8)]
    boxes += [(250.0, 300.0, 600.0, 420.0), (100.0, 500.0, 700.0, 540.0)]
    result = CascadeResult(
        "1.2.3", Status.POSITIVE, score=0.9, findings=_findings(boxes), threshold=0.5
    )
    canvas = render_overlay(pixels, result, MODEL)
    k = upscale_factor(cols)
    body = canvas[canvas.shape[0] - rows * k :]
    for x0, y0, x1, y1 in boxes:
        left, right = round(x0 * k), round(x1 * k)
        for y in (round(y0 * k), round(y1 * k)):
            edge = body[y, left + 8 : right - 8]
            assert (edge == 255).mean() > 0.8, f"edge of box {(x0, y0, x1, y1)} at row {y} hidden"


def test_overlay_widens_only_when_labels_have_no_room():
    pixels = np.full((400, 800), 0.4, dtype=np.float32)
    roomy = CascadeResult(
        "1.2.3",
        Status.POSITIVE,
        score=0.9,
        findings=_findings([(100.0, 100.0, 200.0, 200.0)]),
        threshold=0.5,
    )
    assert render_overlay(pixels, roomy, MODEL).shape[1] == 800
    full = CascadeResult(
        "1.2.3",
        Status.POSITIVE,
        score=0.9,
        findings=_findings([(0.0, 0.0, 800.0, 400.0), (0.0, 0.0, 799.0, 399.0)]),
        threshold=0.5,
    )
    assert render_overlay(pixels, full, MODEL).shape[1] > 800


def test_gsps_text_objects_do_not_cover_each_other_or_other_boxes(tmp_path):
    from spine_node.results.builder import ResultOptions, build_results
    from tests.results_kit import dx_source

    source = dx_source(rows=1000, columns=800)
    boxes = [(300.0, 100.0 + 90 * k, 520.0, 180.0 + 90 * k) for k in range(8)]
    result = CascadeResult(
        str(source.SOPInstanceUID),
        Status.POSITIVE,
        score=0.9,
        findings=_findings(boxes),
        threshold=0.5,
    )
    (pr,) = [
        o
        for o in build_results(source, result, MODEL, ResultOptions(gsps=True))
        if o.Modality == "PR"
    ]
    texts = pr.GraphicAnnotationSequence[0].TextObjectSequence
    rects = [
        Rect(
            round(t.BoundingBoxTopLeftHandCorner[0]),
            round(t.BoundingBoxTopLeftHandCorner[1]),
            round(t.BoundingBoxBottomRightHandCorner[0]),
            round(t.BoundingBoxBottomRightHandCorner[1]),
        )
        for t in texts
    ]
    finding_rects = [Rect(round(a), round(b), round(c) + 1, round(d) + 1) for a, b, c, d in boxes]
    for (i, a), (j, b) in itertools.combinations(enumerate(rects), 2):
        assert not a.intersects(b), f"text {i + 1} covers text {j + 1}"
    for i, rect in enumerate(rects):
        assert rect.inside(800, 1000)
        for j, box in enumerate(finding_rects):
            if i != j:
                assert not rect.intersects(box), f"text {i + 1} covers box {j + 1}"

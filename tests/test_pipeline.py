"""The cascade end to end on the tiny bundle: gates, batching, box mapping, failures, heatmaps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from spine_node.imaging import PrepParams, prepare
from spine_node.models.detector import Detections
from spine_node.pipeline import Cascade
from spine_node.results.types import LESION_LABELS, Status

pytest_plugins = ("tests.fixtures_models",)


class CountingDetector:
    """Wraps a detector (or a fixed answer) and records every call's batch size."""

    def __init__(self, inner=None, answer: list[Detections] | None = None) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.answer = answer
        self.calls: list[int] = []
        self.inputs: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> list[Detections]:
        self.calls.append(images.shape[0])
        self.inputs.append(images)
        if self.answer is not None:
            return [self.answer[0]] * images.shape[0]
        return self.inner(images)


@pytest.fixture(scope="module")
def cascade(tiny_bundle: Path) -> Cascade:
    torch.set_num_threads(1)
    return Cascade.load(tiny_bundle, device="cpu")


def _with(  # type: ignore[no-untyped-def]
    cascade: Cascade,
    *,
    threshold: float | None = None,
    gate: str | None = None,
    detector=None,
    content_gate: bool = True,
) -> Cascade:
    m = cascade.manifest
    if threshold is not None:
        m = replace(m, threshold=threshold)
    if gate is not None:
        m = replace(m, detector=replace(m.detector, gate=gate))
    return Cascade(
        manifest=m,
        triage=cascade.triage,
        detector=detector if detector is not None else cascade.detector,
        content_gate=cascade.content_gate if content_gate else None,
    )


def test_results_in_order_with_model_info(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    # a threshold no library default has: the one in force must come from the bundle
    threshold = 0.3125
    cascade = _with(cascade, threshold=threshold)
    datasets = [dx_dataset(seed=s) for s in (21, 22, 23)]
    results = cascade.analyze(datasets)
    assert [r.sop_instance_uid for r in results] == [ds.SOPInstanceUID for ds in datasets]
    for r in results:
        assert r.status in (Status.POSITIVE, Status.NEGATIVE), r.reason
        assert r.score is not None and 0.0 <= r.score <= 1.0
        assert r.threshold == threshold
        assert set(r.member_scores) == {"densenet", "efficientnet", "resnet"}
        assert (r.status is Status.POSITIVE) == (r.score >= threshold)
    info = cascade.model_info
    assert info.name == "spine-node-tiny" and info.demo is True
    assert info.parameters["threshold"] == threshold and info.parameters["tta_views"] == 5
    assert [m["arch"] for m in info.parameters["members"]] == [
        "densenet121",
        "tf_efficientnetv2_s",
        "resnet50",
    ]
    assert all(len(m["sha256"]) == 64 for m in info.parameters["members"])


def test_hard_gate_skips_detector_when_negative(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    counter = CountingDetector(cascade.detector)
    negative = _with(cascade, threshold=1.0, detector=counter)
    results = negative.analyze([dx_dataset(seed=s) for s in (31, 32)])
    assert [r.status for r in results] == [Status.NEGATIVE, Status.NEGATIVE]
    assert counter.calls == []
    assert all(r.findings == () for r in results)


def test_hard_gate_runs_detector_once_for_the_positive_batch(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    counter = CountingDetector(cascade.detector)
    positive = _with(cascade, threshold=0.0, detector=counter)
    results = positive.analyze([dx_dataset(seed=s) for s in (31, 32, 33)])
    assert [r.status for r in results] == [Status.POSITIVE] * 3
    assert counter.calls == [3]
    assert counter.inputs[0].shape == (3, 64, 64)
    assert any(r.findings for r in results)  # the tiny YOLO does produce boxes
    for r in results:
        for f in r.findings:
            assert f.label in LESION_LABELS and f.score >= 0.25
            assert 0 <= f.box[0] < f.box[2] <= 260 and 0 <= f.box[1] < f.box[3] <= 300


def test_soft_gate_keeps_only_confident_boxes_below_threshold(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    answer = Detections(
        boxes=np.array([[10, 10, 30, 30], [20, 20, 40, 50]], np.float32),
        scores=np.array([0.3, 0.7], np.float32),
        classes=np.array([0, 2]),
    )
    counter = CountingDetector(answer=[answer])
    soft_negative = _with(cascade, threshold=1.0, gate="soft", detector=counter)
    (neg,) = soft_negative.analyze([dx_dataset(seed=41)])
    assert counter.calls == [1]
    assert neg.status is Status.NEGATIVE
    assert [(f.label, round(f.score, 2)) for f in neg.findings] == [("Surgical implant", 0.7)]
    soft_positive = _with(cascade, threshold=0.0, gate="soft", detector=counter)
    (pos,) = soft_positive.analyze([dx_dataset(seed=41)])
    assert pos.status is Status.POSITIVE and len(pos.findings) == 2


def test_boxes_map_to_source_pixels_on_a_non_square_image(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    rows, cols = 600, 300  # tall: letterbox scale 64/600, horizontal padding
    ds = dx_dataset(rows=rows, columns=cols, seed=51)
    scale = 64 / 600
    pad_x = (64 - cols * scale) / 2
    source_box = np.array([60.0, 120.0, 240.0, 480.0])
    letterbox_box = np.array(
        [
            source_box[0] * scale + pad_x,
            source_box[1] * scale,
            source_box[2] * scale + pad_x,
            source_box[3] * scale,
        ],
        np.float32,
    )
    lb = prepare(ds, PrepParams(**dict(cascade.manifest.prep))).letterbox
    assert lb.scale == pytest.approx(scale) and lb.pad_x == pytest.approx(pad_x, abs=0.5)
    answer = Detections(letterbox_box[None], np.array([0.9], np.float32), np.array([3]))
    # The content gate is off here: this test is about geometry, not about the synthetic image.
    mapped = _with(
        cascade, threshold=0.0, detector=CountingDetector(answer=[answer]), content_gate=False
    )
    (result,) = mapped.analyze([ds])
    assert result.status is Status.POSITIVE, result.reason
    (finding,) = result.findings
    assert finding.label == "Spondylolysthesis"
    np.testing.assert_allclose(finding.box, source_box, atol=0.5 / scale)  # pad rounding only
    # A box entirely in the letterbox padding maps to nothing.
    pad_only = Detections(
        np.array([[0, 10, pad_x - 2, 30]], np.float32), np.array([0.9], np.float32), np.array([0])
    )
    only_pad = _with(
        cascade, threshold=0.0, detector=CountingDetector(answer=[pad_only]), content_gate=False
    )
    (empty,) = only_pad.analyze([ds])
    assert empty.status is Status.POSITIVE
    assert empty.findings == ()


def test_bad_images_do_not_stop_the_batch(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    good = dx_dataset(seed=61)
    truncated = dx_dataset(seed=62)
    truncated.PixelData = truncated.PixelData[:100]
    no_pixels = dx_dataset(seed=63)
    del no_pixels.PixelData
    ct = dx_dataset(seed=64, Modality="CT")
    results = cascade.analyze([truncated, good, no_pixels, ct])
    assert [r.status for r in results][1] in (Status.POSITIVE, Status.NEGATIVE)
    for r in (results[0], results[2]):
        assert r.status is Status.NOT_PROCESSED
        assert r.reason is not None and r.reason.startswith("image could not be decoded: ")
    assert results[3].reason == "CT image, not a radiograph"
    assert cascade.analyze([]) == []


def test_same_image_same_score_in_any_batch(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    a, b = dx_dataset(seed=71), dx_dataset(seed=72)
    alone = cascade.analyze([a])[0]
    together = cascade.analyze([b, a])[1]
    assert alone.score == pytest.approx(together.score, abs=1e-6)


def _abnormal(member, image: np.ndarray):  # type: ignore[no-untyped-def]
    """Flip a random member's classifier where needed so it calls ``image`` abnormal.

    Grad-CAM shows evidence for "abnormal" (ReLU of the weighted maps): for a member that sees
    none, the heatmap is rightly all zero, which cannot show whether the maps are mapped back.
    """
    with torch.inference_mode():
        logit, _ = member(torch.from_numpy(image)[None, None])
    if float(logit[0]) < 0:
        classifier = member.model.get_classifier()
        with torch.no_grad():
            classifier.weight.neg_()
            classifier.bias.neg_()
    return member


def test_heatmap_shape_and_content(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    torch.set_num_threads(1)
    explaining = Cascade.load(tiny_bundle, device="cpu", heatmaps=True)
    ds = dx_dataset(rows=400, columns=280, seed=81)
    image = prepare(ds, explaining.prep).triage
    for member in explaining.explainers.values():
        _abnormal(member, image)
    (result,) = explaining.analyze([ds])
    heat = result.heatmap
    assert isinstance(heat, np.ndarray) and heat.shape == (400, 280)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.std() > 0.01  # not constant
    assert heat.max() == pytest.approx(1.0)
    plain = Cascade.load(tiny_bundle, device="cpu")
    assert plain.analyze([ds])[0].heatmap is None  # optional output


def test_gradcam_member_level(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    from spine_node.models.bundle import load_manifest
    from spine_node.models.explain import gradcam
    from spine_node.models.triage import load_member

    spec = load_manifest(tiny_bundle).members[2]
    image = prepare(dx_dataset(seed=82), PrepParams(triage_size=64, detect_size=64, tiles=4)).triage
    member = _abnormal(load_member(spec, tiny_bundle), image)
    cam = gradcam(member, image)
    assert cam.shape == (64, 64) and cam.std() > 0.01
    assert cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
    layer = gradcam(member, image, method="layercam")  # per-location positive gradients
    assert layer.shape == (64, 64) and layer.std() > 0.01 and layer.max() == pytest.approx(1.0)
    assert not np.allclose(layer, cam, atol=1e-3)
    with pytest.raises(ValueError, match="heatmap method"):
        gradcam(member, image, method="scorecam")


def test_embed_for_gate_fitting(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    params = PrepParams(**dict(cascade.manifest.prep))
    images = np.stack([prepare(dx_dataset(seed=s), params).triage for s in (91, 92)])
    emb = cascade.embed(images)
    assert emb.shape[0] == 2 and emb.shape[1] == cascade.content_gate.dims  # type: ignore[union-attr]


def test_load_rejects_bad_arguments(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Cascade.load(tiny_bundle, backend="tensorrt")
    with pytest.raises(ValueError, match="device"):
        Cascade.load(tiny_bundle, device="tpu")


def test_sop_uid_missing_still_gives_a_result(
    cascade: Cascade, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    ds = dx_dataset(seed=93)
    del ds.SOPInstanceUID
    (r,) = cascade.analyze([ds])
    assert r.sop_instance_uid == "" and r.status in (Status.POSITIVE, Status.NEGATIVE)
    assert isinstance(ds, pydicom.Dataset)

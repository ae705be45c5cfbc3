"""PyTorch and ONNX Runtime backends give the same answers on the tiny bundle.

Tolerances: triage scores and member probabilities within 1e-4 absolute; detections matched
one to one (same label, IoU > 0.99, score within 1e-3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import torch

from spine_node.models.bundle import BundleError, load_manifest, write_manifest
from spine_node.models.detector import box_iou
from spine_node.pipeline import Cascade
from spine_node.results.types import Status

pytest_plugins = ("tests.fixtures_models",)


def test_exports_have_a_dynamic_batch(tiny_bundle: Path) -> None:
    for name in ("densenet.onnx", "detector.onnx"):
        model = onnx.load(str(tiny_bundle / name))
        onnx.checker.check_model(model)
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch"


def test_torch_and_onnx_agree(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    torch.set_num_threads(1)
    pt = Cascade.load(tiny_bundle, device="cpu", backend="torch")
    ort = Cascade.load(tiny_bundle, device="cpu", backend="onnx")
    assert ort.model_info.parameters["backend"] == "onnxruntime"
    # Threshold 0 makes every image positive, so the detector runs on all of them.
    datasets = [dx_dataset(seed=s) for s in (101, 102, 103)]
    for c in (pt, ort):
        c.manifest = replace(c.manifest, threshold=0.0)
    a = pt.analyze(datasets)
    b = ort.analyze(datasets)
    compared = 0
    for ra, rb in zip(a, b, strict=True):
        assert ra.status is rb.status is Status.POSITIVE
        assert ra.score == pytest.approx(rb.score, abs=1e-4)
        for name in ra.member_scores:
            assert ra.member_scores[name] == pytest.approx(rb.member_scores[name], abs=1e-4)
        assert len(ra.findings) == len(rb.findings)
        if not ra.findings:
            continue
        unmatched = list(rb.findings)
        for fa in ra.findings:  # same label, IoU > 0.99, score within 1e-3
            candidates = [
                fb
                for fb in unmatched
                if fb.label == fa.label
                and box_iou(np.array([fa.box]), np.array([fb.box]))[0, 0] > 0.99
                and abs(fb.score - fa.score) < 1e-3
            ]
            assert candidates, f"no ONNX match for {fa}"
            unmatched.remove(candidates[0])
        compared += len(ra.findings)
    assert compared > 0


def test_onnx_backend_needs_exports(tiny_bundle_copy: Path) -> None:
    m = load_manifest(tiny_bundle_copy)
    members = (replace(m.members[0], onnx=None, onnx_sha256=None), *m.members[1:])
    write_manifest(tiny_bundle_copy, replace(m, members=members))
    with pytest.raises(BundleError, match="no ONNX export for densenet"):
        Cascade.load(tiny_bundle_copy, device="cpu", backend="onnx")

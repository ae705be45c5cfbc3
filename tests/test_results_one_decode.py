"""One decode per image (issue 10 point 3, builder half): the overlay is drawn on the image
the cascade decoded in the isolated decoder; the result builder never decodes the source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from spine_node import imaging
from spine_node.imaging import PreparedImage, PrepParams, prepare
from spine_node.isolation import IsolatedPreparer
from spine_node.pipeline import Cascade
from spine_node.results.builder import ResultOptions, build_results
from spine_node.results.overlay import upscale_factor
from spine_node.results.types import Status

pytest_plugins = ("tests.fixtures_models",)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class CountingPreparer:
    """The real preparation, counting how often it runs."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ds: pydicom.Dataset, params: PrepParams) -> PreparedImage:
        self.calls += 1
        return prepare(ds, params)


def _without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    copy = pydicom.Dataset(ds)
    copy.file_meta = ds.file_meta
    del copy.PixelData
    return copy


def _body(sc: pydicom.Dataset, rows: int, columns: int) -> np.ndarray:
    k = upscale_factor(columns)
    pixels = sc.pixel_array
    return pixels[pixels.shape[0] - rows * k :, : columns * k]


def test_overlay_uses_the_cascade_image_and_never_the_source_pixels(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    torch.set_num_threads(1)
    counter = CountingPreparer()
    cascade = Cascade.load(tiny_bundle, device="cpu", preparer=counter)
    sources = [dx_dataset(seed=s) for s in (31, 32)]
    results = cascade.analyze(sources)
    assert counter.calls == 2
    for source, result in zip(sources, results, strict=True):
        assert result.status in (Status.POSITIVE, Status.NEGATIVE), result.reason
        assert isinstance(result.display, imaging.SourceImage)
        assert "display" not in result.to_json()
        # the builder gets a source without pixel data: the overlay still comes out
        objects = build_results(_without_pixels(source), result, cascade.model_info)
        assert [o.Modality for o in objects] == ["SR", "OT"]
        rows, columns = result.display.rows, result.display.columns
        body = _body(objects[1], rows, columns)
        expected = np.clip(np.rint(result.display.pixels * 255.0), 0, 255).astype(np.uint8)
        k = upscale_factor(columns)
        if not result.findings:
            assert np.array_equal(body, np.kron(expected, np.ones((k, k), np.uint8)))
    assert counter.calls == 2  # building the results decoded nothing


def test_display_image_crosses_the_isolated_decoder(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    torch.set_num_threads(1)
    isolated = IsolatedPreparer(timeout_s=120)
    try:
        cascade = Cascade.load(tiny_bundle, device="cpu", preparer=isolated)
        source = dx_dataset(seed=33)
        (result,) = cascade.analyze([source])
    finally:
        isolated.close()
    assert isinstance(result.display, imaging.SourceImage)
    assert np.allclose(result.display.pixels, imaging.decode(source).pixels)
    objects = build_results(_without_pixels(source), result, cascade.model_info, ResultOptions())
    assert [o.Modality for o in objects] == ["SR", "OT"]


def test_refused_before_decoding_gets_the_sr_only(
    tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    counter = CountingPreparer()
    cascade = Cascade.load(tiny_bundle, device="cpu", preparer=counter)
    ct = dx_dataset(seed=34, Modality="CT")
    (result,) = cascade.analyze([ct])
    assert result.status is Status.NOT_PROCESSED and result.display is None
    assert counter.calls == 0
    objects = build_results(ct, result, cascade.model_info)
    assert [o.Modality for o in objects] == ["SR"]
    assert counter.calls == 0

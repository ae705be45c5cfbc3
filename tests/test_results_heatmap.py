"""The optional heatmap Secondary Capture: built only when asked for, dciodvfy-clean, RGB, with
the overlay's UID rules (its own kind); and ``analyze --heatmaps`` puts the map in its JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_node.cli import main
from spine_node.results import uids
from spine_node.results.builder import ResultOptions, build_results
from tests.results_kit import MODEL, dciodvfy_errors, dx_source, positive, save_object

pytest_plugins = ("tests.fixtures_models",)


def _with_heatmap(source: pydicom.Dataset) -> object:
    rows, cols = int(source.Rows), int(source.Columns)
    yy, xx = np.mgrid[0:rows, 0:cols]
    heat = np.exp(-(((yy - rows / 3) / 20) ** 2 + ((xx - cols / 2) / 15) ** 2)).astype(np.float32)
    return replace(positive(source), heatmap=heat)


def test_heatmap_series_is_optional_valid_and_follows_the_uid_rules(tmp_path: Path) -> None:
    first = dx_source()
    second = dx_source(sop="1.2.826.0.1.3680043.8.498.4")
    result = _with_heatmap(first)
    plain = build_results(first, result, MODEL, ResultOptions())
    assert [o.Modality for o in plain] == ["SR", "OT"]  # off by default
    options = ResultOptions(heatmap=True, heatmap_method="layercam")
    assert len(build_results(first, replace(result, heatmap=None), MODEL, options)) == 2
    objects = build_results(first, result, MODEL, options)
    assert [o.Modality for o in objects] == ["SR", "OT", "OT"]
    overlay, heat = objects[1], objects[2]
    path, back = save_object(heat, tmp_path)
    assert dciodvfy_errors(path) == []
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert back.SeriesNumber == 9904 and back.SeriesDescription == "AI spine triage heatmap"
    assert back.ImageType == ["DERIVED", "SECONDARY"] and back.BurnedInAnnotation == "YES"
    assert "LayerCAM" in back.DerivationDescription
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    bundle = uids.bundle_key(MODEL)
    assert heat.SOPInstanceUID == uids.sop_instance_uid(
        str(first.SOPInstanceUID), uids.ResultKind.HEATMAP, bundle
    )
    assert heat.SOPInstanceUID != overlay.SOPInstanceUID
    assert heat.SeriesInstanceUID != overlay.SeriesInstanceUID
    again = build_results(first, result, MODEL, options)[2]
    assert again.SOPInstanceUID == heat.SOPInstanceUID  # deterministic: a re-run replaces
    other = build_results(second, _with_heatmap(second), MODEL, options)[2]
    assert other.SeriesInstanceUID == heat.SeriesInstanceUID  # one series per study
    assert other.SOPInstanceUID != heat.SOPInstanceUID
    # the heat shows: the hot spot is coloured (red > blue), a cold corner stays grey
    pixels = back.pixel_array
    banner = pixels.shape[0] - pixels.shape[1] * int(first.Rows) // int(first.Columns)
    body = pixels[banner:].astype(int)
    hot = body[body.shape[0] // 3, body.shape[1] // 2]
    cold = body[-2, 1]
    assert hot[0] > hot[2] + 40
    assert abs(cold[0] - cold[2]) <= 2


def test_analyze_json_carries_the_heatmap(
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    dx_dataset: Callable[..., pydicom.Dataset],
) -> None:
    path = tmp_path / "spine.dcm"
    dx_dataset(seed=203).save_as(path, enforce_file_format=True)
    out = tmp_path / "out"
    argv = ["analyze", str(path), "--json", "--bundle", str(tiny_bundle), "--device", "cpu"]
    assert main([*argv, "--heatmaps", "layercam", "--out", str(out)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    heat = row["heatmap"]
    rows, cols = heat["shape"]
    assert heat["method"] == "layercam" and max(rows, cols) <= 64
    assert heat["source_shape"] == [
        int(pydicom.dcmread(path).Rows),
        int(pydicom.dcmread(path).Columns),
    ]
    values = np.array(heat["values"])
    assert values.shape == (rows, cols) and values.min() >= 0.0 and values.max() <= 1.0
    written = [pydicom.dcmread(p) for p in out.glob("*.dcm")]
    assert sorted(int(d.SeriesNumber) for d in written) == [9901, 9902, 9904]
    assert main(argv) == 0
    (plain,) = json.loads(capsys.readouterr().out)
    assert "heatmap" not in plain

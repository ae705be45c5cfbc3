"""``spine-node analyze``: JSON schema on real files, bundle selection, exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from spine_node import analyze
from spine_node.cli import main

pytest_plugins = ("tests.fixtures_models",)


@pytest.fixture()
def files(tmp_path: Path, dx_dataset: Callable[..., pydicom.Dataset]) -> list[Path]:
    dx = tmp_path / "spine.dcm"
    dx_dataset(seed=201).save_as(dx, enforce_file_format=True)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    ct = get_testdata_file("CT_small.dcm")
    assert isinstance(ct, str)
    return [dx, Path(ct), junk]


def test_json_output_schema(
    tiny_bundle: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["analyze", *map(str, files), "--json", "--bundle", str(tiny_bundle), "--device", "cpu"]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    for row in rows:
        assert {
            "file",
            "sop_instance_uid",
            "status",
            "reason",
            "score",
            "threshold",
            "findings",
        } <= set(row)
    spine, ct, junk = rows
    assert spine["status"] in ("positive", "negative")
    assert spine["sop_instance_uid"] == pydicom.dcmread(files[0]).SOPInstanceUID
    assert 0.0 <= spine["score"] <= 1.0 and spine["threshold"] == 0.478 and spine["reason"] is None
    for finding in spine["findings"]:
        assert set(finding) >= {"label", "score", "box"} and len(finding["box"]) == 4
    assert ct["status"] == "not_processed" and ct["reason"] == "CT image, not a radiograph"
    assert ct["score"] is None
    assert junk["status"] == "not_processed" and junk["reason"].startswith("file could not be read")


def test_findings_schema_when_positive(
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    dx_dataset: Callable[..., pydicom.Dataset],
) -> None:
    # A copy of the tiny bundle with threshold 0: every readable spine image is positive.
    import shutil
    from dataclasses import replace

    from spine_node.models.bundle import load_manifest, write_manifest

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    write_manifest(bundle, replace(load_manifest(bundle), threshold=0.0))
    path = tmp_path / "spine.dcm"
    dx_dataset(seed=202).save_as(path, enforce_file_format=True)
    assert main(["analyze", str(path), "--json", "--bundle", str(bundle), "--device", "cpu"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "positive" and row["findings"]
    for f in row["findings"]:
        xmin, ymin, xmax, ymax = f["box"]
        assert 0 <= xmin < xmax <= 260 and 0 <= ymin < ymax <= 300
        assert isinstance(f["label"], str) and 0.25 <= f["score"] <= 1.0


def test_text_output(
    tiny_bundle: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["analyze", str(files[1]), "--bundle", str(tiny_bundle), "--device", "cpu"]) == 0
    assert "not processed: CT image, not a radiograph" in capsys.readouterr().out


def test_missing_bundle_exits_2(
    tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["analyze", str(files[0]), "--json", "--bundle", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no model bundle at" in err and "nowhere" in err


def test_default_is_the_demo_bundle() -> None:
    assert analyze.demo_bundle_dir().name == "demo_bundle"
    assert analyze.demo_bundle_dir().parent.name == "spine_node"


def test_damaged_bundle_exits_2(
    tiny_bundle: Path, tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    (bundle / "gate.npz").write_bytes(b"changed")
    assert main(["analyze", str(files[0]), "--bundle", str(bundle), "--device", "cpu"]) == 2
    assert "gate.npz" in capsys.readouterr().err


def test_out_writes_result_objects(
    tiny_bundle: Path, files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "analyze",
            str(files[0]),
            "--json",
            "--bundle",
            str(tiny_bundle),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    capsys.readouterr()
    try:
        import spine_node.results.builder  # noqa: F401
    except ImportError:
        assert code == 1 and not out.exists()
        return
    assert code == 0
    written = sorted(out.glob("*.dcm"))
    assert written
    source_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source_uid

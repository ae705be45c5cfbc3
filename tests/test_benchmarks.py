"""Smoke tests: each benchmark runs end to end with tiny settings and prints its figures.

These check that the benchmarks work and report what they claim, never how fast anything is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"[\d.]+(?:e[+-]\d+)?"


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<name>`` as a user would, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def number(pattern: str, text: str) -> float:
    """The first number captured by ``pattern`` in ``text`` (fails the test when absent)."""
    found = re.search(pattern, text, flags=re.MULTILINE)
    assert found is not None, f"{pattern!r} not in output:\n{text}"
    return float(found.group(1))


def test_ingest_benchmark_prints_every_target_and_both_ratios(tmp_path: Path) -> None:
    proc = run_script(
        "ingest.py", "--images", "2", "--size-mb", "0.05", "--rounds", "1", "--workdir",
        str(tmp_path),
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr + out
    assert "2 DX images 158x158 16-bit uncompressed" in out
    for target in ("node", "pynetdicom", "dcmtk"):
        assert number(rf"^{target}\s+([\d.]+) images/s", out) > 0
        assert number(rf"^{target}\s+[\d.]+ images/s\s+([\d.]+) MB/s", out) >= 0
        assert re.search(rf"round 1 {target}\s", out), out
    node = number(r"^node\s+([\d.]+) images/s", out)
    for peer, goal in (("pynetdicom", "0.9"), ("dcmtk", "1.0")):
        peer_rate = number(rf"^{peer}\s+([\d.]+) images/s", out)
        ratio = number(rf"^ratio node/{peer} = ([\d.]+)x \(goal >= {goal}x: (?:met|NOT met)\)", out)
        assert ratio == pytest.approx(node / peer_rate, rel=0.02, abs=0.01)
    assert "disk floor: write + fsync of the same set" in out
    assert list(tmp_path.iterdir()) == []  # the work directory is cleaned up


def test_ingest_benchmark_refuses_bad_options() -> None:
    proc = run_script("ingest.py", "--images", "0")
    assert proc.returncode == 2
    assert "--images and --rounds must be >= 1" in proc.stderr


def test_inference_benchmark_on_a_tiny_bundle_prints_stages_ratios_and_flops() -> None:
    proc = run_script(
        "inference.py", "--images", "1", "--repeats", "1", "--image-size", "96", "--threads", "1",
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr + out
    header = out.splitlines()[0]
    assert "1 image(s) 96x96 JPEG 2000 lossless" in header
    assert "threads 1" in header
    stages = (
        "decode (dcmread + decode)",
        "preparation (CLAHE, resize, letterbox)",
        "TTA views (",
        "member densenet (",
        "member efficientnet (",
        "member resnet (",
        "detector (network + NMS)",
        "sum of stages per image",
    )
    for stage in stages:
        assert re.search(rf"^{re.escape(stage)}.*\d", out, flags=re.MULTILINE), stage
    for backend in ("torch", "onnx"):
        assert number(rf"^images/s {backend} \(sum of stages\) = ([\d.]+)", out) > 0
        analyze = rf"^images/s {backend} \(Cascade.analyze, 1 images per call, detector ran on \d\)"
        assert number(analyze + r" = ([\d.]+)", out) > 0
    for stage in (
        "member densenet",
        "detector (network + NMS)",
        "sum of stages",
        "Cascade.analyze",
    ):
        assert number(rf"^ratio onnx/torch {re.escape(stage)}.* = ([\d.]+)x", out) > 0
    # FLOPs are counted on the actual (tiny) models and shown next to the method's figures
    per_view = number(rf"^GFLOPs members per view = ({NUM}) measured \(spec: about 58", out)
    detector = number(rf"^GFLOPs detector = ({NUM}) measured", out)
    cascade = number(rf"^GFLOPs cascade per image = ({NUM})", out)
    assert "(spec: 86.9 for YOLO11-L at 640)" in out
    assert per_view < 58
    assert cascade == pytest.approx(5 * per_view + detector, rel=0.01)
    assert "GFLOP/s" in out


def test_train_throughput_benchmark_prints_both_loader_paths(tmp_path: Path) -> None:
    proc = run_script(
        "train_throughput.py", "--mode", "loader", "--images", "8", "--size", "128x96",
        "--input-size", "48", "--batch", "2", "--rounds", "1", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "legacy_main_loop_images_per_s",
        "workers_0_images_per_s",
        "workers_2_images_per_s",
        "batched_augment_cpu_images_per_s",
    ):
        assert result[key] > 0, result
    assert float(result["load_before"]) >= 0 and result["cpus"] >= 1

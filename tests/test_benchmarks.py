"""Smoke tests: each benchmark runs end to end with tiny settings and prints its figures.

These check that the benchmarks work and report what they claim, never how fast anything is.
"""

from __future__ import annotations

import json
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


def test_inference_benchmark_prints_paths_limits_and_writes_json(tmp_path: Path) -> None:
    from spine_node.models.runtime import cpu_flags, has_native_bf16

    paths = ["torch-fp32", "onnxruntime-fp32", "openvino-fp32"]
    if has_native_bf16(cpu_flags()):
        paths.append("openvino-bf16")
    out_json = tmp_path / "inference.json"
    proc = run_script(
        "inference.py", "--images", "1", "--repeats", "1", "--image-size", "96", "--threads", "1",
        "--paths", ",".join(paths), "--batch", "2", "--json", str(out_json),
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr + out
    header = out.splitlines()[0]
    assert "1 image(s) 96x96 JPEG 2000 lossless" in header
    assert "threads 1" in header and "load average" in header
    for stage in ("decode (dcmread + decode)", "preparation (CLAHE, resize, letterbox)"):
        assert re.search(rf"^  {re.escape(stage)}\s+{NUM}$", out, flags=re.MULTILINE), stage
    for prec in {p.split("-")[1] for p in paths}:
        assert number(rf"^matmul peak {prec} = ({NUM}) GFLOP/s", out) > 0
    for path in paths:
        assert re.search(rf"^path {path}: matmul peak {NUM} GFLOP/s", out, flags=re.MULTILINE)
        seconds = number(rf"^positive image {path} = ({NUM}) s \(limit", out)
        limit = number(rf"^positive image {path} = {NUM} s \(limit ({NUM}) s", out)
        ratio = number(rf"^positive image {path} = .*ratio ({NUM})x\)", out)
        # printed rounded: a few ms over a limit of tens of ms moves the ratio by several %
        assert ratio == pytest.approx(seconds / limit, rel=0.05)
        assert number(rf"^  batched images/s \({path}\) = ({NUM})", out) > 0
    for stage in ("member densenet (5 views)", "detector (network + NMS)"):
        # ms, GFLOP/s and ratio to the limit on every model stage
        assert re.search(rf"^  {re.escape(stage)}\s+{NUM}\s+{NUM}\s+{NUM}$", out, flags=re.MULTILINE)
    assert re.search(r"^best path: \S+ positive_image_s=", out, flags=re.MULTILINE)
    # FLOPs are counted on the actual (demo or tiny) models, next to the method's figures
    per_view = number(rf"^GFLOPs members per view = ({NUM}) measured \(spec: about 58", out)
    detector = number(rf"^GFLOPs detector = ({NUM}) measured", out)
    cascade = number(rf"^GFLOPs cascade per positive image = ({NUM})", out)
    assert cascade == pytest.approx(5 * per_view + detector, rel=0.01)
    doc = json.loads(out_json.read_text())
    assert {p["path"] for p in doc["paths"]} == set(paths)
    best = min(doc["paths"], key=lambda p: p["positive_image_s"])
    assert (doc["backend"], doc["precision"]) == (best["backend"], best["precision"])
    assert doc["positive_image_s"] == best["positive_image_s"] > 0
    assert doc["flop_limit_s"] == pytest.approx(
        doc["gflops_per_positive_image"] / doc["matmul_peak_gflops"][doc["precision"]], rel=0.01
    )
    assert doc["fp32"]["precision"] == "fp32"


def test_inference_benchmark_refuses_an_unknown_path() -> None:
    proc = run_script("inference.py", "--paths", "tensorrt-int8", "--image-size", "64")
    assert proc.returncode == 2
    assert "not supported here" in proc.stderr


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


def test_latency_benchmark_runs_the_node_against_storescp(tmp_path: Path) -> None:
    out_json = tmp_path / "latency.json"
    proc = run_script(
        "latency.py", "--images", "2", "--rows", "384", "--columns", "320", "--batch-size", "2",
        "--json", str(out_json), timeout=600,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr + out
    assert "2 DX images 384x320 16-bit uncompressed" in out
    assert re.search(r"^node: spine-node-demo \S+, backend \w+, precision \w+, device cpu", out,
                     flags=re.MULTILINE), out  # fmt: skip
    p50 = number(rf"^acknowledgement -> last result object at the PACS, all 2: p50 ({NUM}) s", out)
    p95 = number(rf"^acknowledgement -> .* all 2: p50 {NUM} s, p95 ({NUM}) s", out)
    assert 0 < p50 <= p95
    assert number(rf"^images/s through the worker .* = ({NUM})", out) > 0
    assert re.search(r"^median seconds per image: decode .*triage .*detector .*sending", out,
                     flags=re.MULTILINE)  # fmt: skip
    doc = json.loads(out_json.read_text())
    assert doc["n_images"] == 2 and len(doc["per_image"]) == 2
    for image in doc["per_image"]:
        assert image["sent"] == image["objects"] >= 1  # every result object reached the PACS
        assert image["at_pacs"] >= image["result_at"] >= image["ack"]
        assert image["status"] in ("positive", "negative"), image  # analysed, not refused
        assert {"decode", "gate", "triage", "results"} <= set(image["stages"])
    if doc["n_positive"]:
        share = doc["outside_share_positive"]["median"]
        assert 0 < share < 1
        assert "outside the models, positive images" in out


def test_decoder_benchmark_prints_each_path() -> None:
    proc = run_script("decoder.py", "--rows", "256", "--columns", "192", "--rounds", "2")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr + out
    assert "1 DX image 256x192 16-bit uncompressed" in out
    floor = number(rf"^in-process\s+median ({NUM}) s", out)
    for name in ("isolated, shared area", "isolated, pipe only"):
        median = number(rf"^{name}\s+median ({NUM}) s", out)
        extra = number(rf"^{name}\s+median {NUM} s, min {NUM} s\s+\(\+(-?{NUM}) s over", out)
        assert extra == pytest.approx(median - floor, abs=2e-4)
    assert "shared-area preparer: 0 requests and 0 results went through the pipe" in out


def test_web_benchmark_prints_each_page_against_the_goal(tmp_path: Path) -> None:
    proc = run_script("web.py", "--studies", "120", "--requests", "3", "--workdir", str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr + out
    assert re.search(r"database: 120 studies, \d+ objects", out), out
    for page in ("/ (status)", "/studies (newest 50)", "older -> page 2 (keyset)",
                 "older -> page 3 (keyset)", "/studies?page=3 (offset)",
                 "/studies/UID (one study)"):
        line = next(line for line in out.splitlines() if line.startswith(page))
        p50, p95, worst, ratio, cpu = (float(v.rstrip("x")) for v in line[len(page):].split())
        assert 0 < p50 <= p95 <= worst and ratio == pytest.approx(p95 / 200.0, abs=0.01)
        assert cpu >= 0
    assert re.search(r"^goal: p95 <= 200 ms per page \((met|NOT met); worst p95/goal = "
                     rf"{NUM}x, 3 requests per page\)$", out, re.MULTILINE), out
    assert list(tmp_path.iterdir()) == []  # the work directory is cleaned up

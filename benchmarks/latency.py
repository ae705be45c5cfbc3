"""End-to-end latency: C-STORE acknowledgement to the last result object stored at the PACS.

The node is started as its systemd units and ``serve`` start it (``spine-node serve --config
FILE``: receiver, worker and dispatcher in one process), with DCMTK ``storescp`` as the PACS
(the node's only DICOM destination). N full-size DX For Presentation images (default 20 of
2500 x 2000, 16 bits allocated, 12 stored, uncompressed; phantom spines from
``training.phantom``, each with lesions) are sent with DCMTK ``storescu``: in one association
(a burst, default) or one association every ``--interval`` seconds, after one warm-up image
(not counted) whose results are waited for: the node is measured warm, as in service.

Per image, from the node's database (times on the node's clock):

* acknowledgement: ``instances.received_at`` (written just before the C-STORE response);
* results at the PACS: the latest ``outbound.sent_at`` of the image's result objects
  (the moment ``storescp`` answered Success for the last of them); every object is also
  checked to be in ``storescp``'s output folder;
* stages: ``job_stage_times`` (decode = read + prepare in the isolated decoder, gate, triage,
  detector, results = build + write to the outbox), and sending = last object at the PACS minus
  the result's commit (dispatcher poll + C-STORE).

Reported: p50 / p95 of acknowledgement -> results at the PACS (all images and positives),
the queue wait (acknowledgement to the worker's claim: other images' turn), the images/s
through the worker, and for positive images the share of the service time spent outside the
models: (decode + gate + results + sending) / (those + triage + detector); the goal is <= 15 %.

Bundles: ``--bundle DIR``, the embedded demo bundle by default, or ``--real-archs`` (random-weight
densenet121 / tf_efficientnetv2_s / resnet50 at 384 and YOLO11-L at 640, threshold 0 so every
image is positive; its bf16 agreement is checked on a small phantom split first, as
``spine-train check-precision`` does, so the node may use bf16).

Run from the repository root::

    .venv/bin/python benchmarks/latency.py                       # demo bundle, 20 images
    .venv/bin/python benchmarks/latency.py --real-archs --json /tmp/latency.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
#: Goal (issue 13): share of a positive image's service time outside the models.
GOAL_OUTSIDE_SHARE = 0.15
LESIONS = ("Osteophytes", "Disc space narrowing", "Spondylolysthesis", "Vertebral collapse")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_images(out: Path, n: int, rows: int, columns: int, seed: int = 0) -> list[Path]:
    """Write ``n`` phantom DX radiographs (uncompressed 16-bit) and return their paths."""
    from training.phantom import PhantomSpec, render_phantom_image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study = generate_uid()
    paths = []
    for i in range(n):
        spec = PhantomSpec(
            rows=rows,
            columns=columns,
            view="ap" if i % 2 else "lateral",
            lesions=(LESIONS[i % len(LESIONS)],),
        )
        pixels, _ = render_phantom_image(rng, spec)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
        ds.SOPClassUID = DX_FOR_PRESENTATION
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study if i < n // 2 else generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientAge = "PHANTOM^LATENCY", "LAT1", "055Y"
        ds.Modality, ds.PresentationIntentType = "DX", "FOR PRESENTATION"
        ds.BodyPartExamined, ds.ViewPosition = "LSPINE", "AP" if i % 2 else "LL"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = np.minimum(pixels, 4095).astype("<u2").tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = out / f"image{i:03d}.dcm"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def real_archs_bundle(work: Path) -> tuple[Path, str]:
    """Build the random-weight real-size bundle and record its bf16 agreement check."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import build_real_bundle  # benchmarks/inference.py

    from spine_node.models.runtime import Backend, installed_backends
    from training.phantom import write_phantom_dataset
    from training.precision import check_bundle_precision

    bundle = work / "real-archs"
    build_real_bundle(bundle, threshold=0.0)
    phantom = work / "phantom"
    write_phantom_dataset(phantom, n_images=8, seed=5, balanced=True, size=(768, 512),
                          test_fraction=0.0)  # fmt: skip
    # the node's auto path on the CPU (OpenVINO when installed); PyTorch's check is slow here.
    # Random weights were never trained, so any phantom split is held out: the train split.
    backend = Backend.OPENVINO if Backend.OPENVINO in installed_backends() else Backend.TORCH
    checks = check_bundle_precision(bundle, phantom, split="train", backends=[backend])
    summary = "; ".join(("passed " if c.passed else "FAILED ") + c.summary() for c in checks)
    return bundle, f"real architectures, random weights, threshold 0; bf16 check: {summary}"


def write_config(path: Path, values: dict[str, Any], pacs_port: int) -> Path:
    """The node's TOML settings file, with storescp as its DICOM destination."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    lines = [f"{k} = {fmt(v)}" for k, v in values.items()]
    lines += [
        "[[destinations]]",
        'kind = "dicom"',
        'name = "pacs"',
        'ae_title = "PACS"',
        'host = "127.0.0.1"',
        f"port = {pacs_port}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> Any:
    """Poll ``predicate`` until truthy; fail when the node exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with status {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the node's SQLite database (a separate read-only connection)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return list(con.execute(sql, args))
    except sqlite3.OperationalError:
        return []  # tables not created yet


def collect(db: Path) -> list[dict[str, Any]]:
    """Per image: status, acknowledgement, claim, result, last object at the PACS, stages."""
    rows = query(
        db,
        """SELECT j.id, r.status, i.received_at, r.created_at, MAX(o.sent_at), COUNT(o.id),
                  SUM(o.state = 'sent')
           FROM jobs j JOIN instances i ON i.id = j.instance_id
           JOIN results r ON r.job_id = j.id
           LEFT JOIN outbound o ON o.result_id = r.id
           GROUP BY j.id""",
    )
    stages: dict[int, dict[str, float]] = {}
    for job_id, stage, seconds in query(db, "SELECT job_id, stage, seconds FROM job_stage_times"):
        stages.setdefault(int(job_id), {})[stage] = float(seconds)
    out = []
    for job_id, status, ack, result_at, last_sent, n_objects, n_sent in rows:
        out.append(
            {
                "job_id": int(job_id),
                "status": status,
                "ack": float(ack),
                "result_at": float(result_at),
                "at_pacs": None if last_sent is None else float(last_sent),
                "objects": int(n_objects),
                "sent": int(n_sent or 0),
                "stages": stages.get(int(job_id), {}),
            }
        )
    return out


def objects_sent(db: Path) -> list[str]:
    """SOP Instance UIDs of the image result objects the node sent to the PACS."""
    rows = query(db, "SELECT object_uid FROM outbound WHERE result_id IS NOT NULL AND state = 'sent'")
    return [r[0] for r in rows]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarise(images: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures: latency percentiles, stage medians, outside-the-models share."""
    for im in images:
        s = im["stages"]
        im["latency_s"] = im["at_pacs"] - im["ack"]
        im["sending_s"] = max(0.0, im["at_pacs"] - im["result_at"])
        models = s.get("triage", 0.0) + s.get("detector", 0.0)
        outside = s.get("decode", 0.0) + s.get("gate", 0.0) + s.get("results", 0.0) + im["sending_s"]
        im["models_s"], im["outside_s"] = models, outside
        im["service_s"] = models + outside
        im["queue_s"] = max(0.0, im["latency_s"] - im["service_s"])
        im["outside_share"] = outside / im["service_s"] if im["service_s"] > 0 else float("nan")
    positives = [im for im in images if im["status"] == "positive"]
    first_ack = min(im["ack"] for im in images)
    last = max(im["at_pacs"] for im in images)

    def lat(sel: list[dict[str, Any]]) -> dict[str, float] | None:
        if not sel:
            return None
        values = [im["latency_s"] for im in sel]
        return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values)}

    stage_names = ("decode", "gate", "triage", "detector", "results")
    pick = positives or images
    return {
        "n_images": len(images),
        "n_positive": len(positives),
        "latency_s": lat(images),
        "latency_positive_s": lat(positives),
        "images_per_s": len(images) / (last - first_ack) if last > first_ack else None,
        "stage_median_s": {
            name: statistics.median(im["stages"].get(name, 0.0) for im in pick) for name in stage_names
        }
        | {
            "sending": statistics.median(im["sending_s"] for im in pick),
            "queue": statistics.median(im["queue_s"] for im in pick),
        },
        "outside_share_positive": None
        if not positives
        else {
            "median": statistics.median(im["outside_share"] for im in positives),
            "p95": percentile([im["outside_share"] for im in positives], 95),
            "pooled": sum(im["outside_s"] for im in positives)
            / sum(im["service_s"] for im in positives),
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--bundle", type=Path, default=None, help="bundle directory")
    which.add_argument("--real-archs", action="store_true",
                       help="random-weight real-size members and YOLO11-L (every image positive)")  # fmt: skip
    p.add_argument("--images", type=int, default=20, help="images sent (default 20)")
    p.add_argument("--rows", type=int, default=2500)
    p.add_argument("--columns", type=int, default=2000)
    p.add_argument("--interval", type=float, default=0.0,
                   help="seconds between images, one association each (default 0: one burst)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="worker_batch_size (default 4)")
    p.add_argument("--backend", default="auto", help="the node's backend setting (default auto)")
    p.add_argument("--precision", default="auto", help="the node's precision setting (default auto)")
    p.add_argument("--device", default="auto", help="the node's device setting (default auto)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures here")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="work in DIR and keep it (node data, log, PACS folder)")  # fmt: skip
    args = p.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.rows < 128 or args.columns < 96:
        p.error("--images and --batch-size must be >= 1, --rows >= 128, --columns >= 96")
    for tool in ("storescp", "storescu"):
        if shutil.which(tool) is None:
            p.error(f"DCMTK {tool} is not installed")
    return args


def run(args: argparse.Namespace, work: Path) -> int:
    """Start PACS and node, send, wait, report; return the exit status."""
    t0 = time.perf_counter()
    if args.real_archs:
        bundle, origin = real_archs_bundle(work)
    elif args.bundle is not None:
        bundle, origin = Path(args.bundle).resolve(), f"bundle {args.bundle}"
    else:
        bundle, origin = ROOT / "spine_node" / "demo_bundle", "embedded demo bundle"
    # one more image first, to warm the node (decoder child, first inference at each shape)
    warmup, *images = make_images(work / "images", args.images + 1, args.rows, args.columns)
    made_s = time.perf_counter() - t0
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    pacs_port, node_port = free_port(), free_port()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    data_dir = work / "data"
    config = write_config(
        work / "spine-node.toml",
        {
            "ae_title": "SPINENODE",
            "port": node_port,
            "bind_address": "127.0.0.1",
            "data_dir": str(data_dir),
            "min_free_bytes": 0,
            "bundle": str(bundle),
            "backend": args.backend,
            "precision": args.precision,
            "device": args.device,
            "worker_batch_size": args.batch_size,
            "worker_poll_s": 0.05,
        },
        pacs_port,
    )
    log_path = work / "node.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log_file:
        node = subprocess.Popen(
            [sys.executable, "-m", "spine_node.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    db = data_dir / "spine-node.db"
    try:
        start = time.perf_counter()
        wait_for(lambda: query(db, "SELECT owner FROM worker_heartbeats"), args.timeout,
                 "the worker's first heartbeat (models loaded)", node)  # fmt: skip
        loaded_s = time.perf_counter() - start
        send = ["storescu", "-aet", "MODALITY1", "-aec", "SPINENODE", "127.0.0.1", str(node_port)]
        subprocess.run([*send, str(warmup)], check=True, capture_output=True, timeout=300)
        wait_for(lambda: (r := collect(db)) and r[0]["objects"] and r[0]["sent"] == r[0]["objects"],
                 args.timeout, "the warm-up image's results at the PACS", node)  # fmt: skip
        if args.interval > 0:
            for path in images:
                subprocess.run([*send, str(path)], check=True, capture_output=True, timeout=300)
                time.sleep(args.interval)
        else:
            subprocess.run([*send, *map(str, images)], check=True, capture_output=True, timeout=600)

        def finished() -> list[dict[str, Any]] | None:
            rows = [r for r in collect(db) if r["job_id"] != 1]  # job 1: the warm-up image
            done = [r for r in rows if r["objects"] and r["sent"] == r["objects"]]
            return rows if len(rows) == len(images) and len(done) == len(images) else None

        rows = wait_for(finished, args.timeout, f"results of {len(images)} images at the PACS", node)
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        pacs.terminate()
        pacs.wait(timeout=30)
    at_pacs = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs_dir.iterdir()}
    missing = set(objects_sent(db)) - at_pacs
    if missing:
        print(f"{len(missing)} result object(s) the node sent are not in storescp's folder",
              file=sys.stderr)  # fmt: skip
        return 1
    figures = summarise(rows)
    runtime = [ln for ln in log_path.read_text(errors="replace").splitlines() if "cascade loaded" in ln]
    load = os.getloadavg()
    print(
        f"latency benchmark: {origin}; {len(images)} DX images {args.rows}x{args.columns} 16-bit "
        f"uncompressed ({made_s:.0f} s to make), "
        + ("one burst (one association)" if args.interval <= 0 else f"one every {args.interval} s")
        + f"; worker_batch_size {args.batch_size}; {os.cpu_count()} CPUs, load average {load[0]:.1f}"
    )
    if runtime:
        print(f"node: {runtime[-1].split('cascade loaded: ', 1)[-1]} (models loaded in {loaded_s:.0f} s)")
    lat, pos = figures["latency_s"], figures["latency_positive_s"]
    print(f"acknowledgement -> last result object at the PACS, all {len(rows)}: "
          f"p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s")  # fmt: skip
    if pos is not None:
        print(f"acknowledgement -> last result object at the PACS, {figures['n_positive']} positive: "
              f"p50 {pos['p50']:.2f} s, p95 {pos['p95']:.2f} s")  # fmt: skip
    if figures["images_per_s"]:
        print(f"images/s through the worker (first acknowledgement to last result) = "
              f"{figures['images_per_s']:.3f}")  # fmt: skip
    print("median seconds per image: " + ", ".join(
        f"{k} {v:.3f}" for k, v in figures["stage_median_s"].items()))  # fmt: skip
    share = figures["outside_share_positive"]
    if share is not None:
        print(
            f"outside the models, positive images (decode, gate, results, sending over the service "
            f"time): median {share['median']:.1%}, p95 {share['p95']:.1%}, pooled {share['pooled']:.1%} "
            f"(goal <= {GOAL_OUTSIDE_SHARE:.0%}: {'met' if share['median'] <= GOAL_OUTSIDE_SHARE else 'NOT met'})"
        )
    else:
        print("no positive image: the outside-the-models share of positives is not measured")
    if args.json is not None:
        document = {
            "origin": origin,
            "runtime": runtime[-1] if runtime else None,
            "images": len(images),
            "size": [args.rows, args.columns],
            "interval_s": args.interval,
            "worker_batch_size": args.batch_size,
            "load_average": [round(v, 2) for v in load],
            **figures,
            "per_image": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="spine-latency-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())

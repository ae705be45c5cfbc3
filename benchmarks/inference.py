"""Inference benchmark: the cascade on every backend and precision, against the FLOP limit.

For each path (backend x precision) the machine supports, this times, median over images x
repeats after one warm-up call:

* each triage member on its TTA batch (``views x 1 x S x S``, one forward);
* the detector (network + NMS) on one letterboxed image;
* a positive image through the cascade (:meth:`spine_node.pipeline.Cascade.analyze_prepared`
  on one prepared image: TTA views, the three members, the vote, the detector, findings);
* with ``--batch N`` also N prepared images in one call (images/s).

FLOPs are counted on the actual models (``torch.utils.flop_counter``, a multiply-add is 2;
ultralytics-thop for the detector too). The machine's matrix-multiply peak is measured at each
precision (``torch.matmul`` of 2048 x 2048 matrices on every thread, best of several runs, again
before each path; the best over the run counts);
the FLOP limit of a positive image is its FLOPs over that peak, and every model stage prints
its achieved GFLOP/s and its ratio to the limit (1.0 = at the peak). Decode (``dcmread`` +
:func:`spine_node.imaging.decode`), preparation and TTA views are timed once (no model).

Paths: ``torch-fp32`` and ``torch-bf16`` (PyTorch, channels_last on the CPU, bf16 autocast),
``onnxruntime-fp32``, ``openvino-fp32`` and ``openvino-bf16`` (OpenVINO on the bundle's ONNX
exports, ``INFERENCE_PRECISION_HINT``); bf16 only where the CPU has native bf16; on CUDA
``torch-fp32``, ``torch-fp16``, ``torch-bf16`` (and ``onnxruntime-fp32`` with its CUDA provider).
The models run through the node's own backend modules (:func:`spine_node.pipeline.build_backend`)
without the bundle's agreement check: this measures speed, ``spine-train check-precision``
measures agreement.

Bundles: ``--bundle DIR``; ``--real-archs`` builds a random-weight bundle of the real members
(timm densenet121 / tf_efficientnetv2_s / resnet50 at 384 px, ``pretrained=False``) and YOLO11-L
(``yolo11l.yaml``, 7 classes, 640 px) with ONNX exports, no download; by default the embedded
demo bundle when it exists, else a tiny random bundle.

``--json FILE`` writes every figure, and for the best path ``positive_image_s``,
``flop_limit_s`` (at that path's precision), ``precision`` and ``backend``.

Run from the repository root::

    .venv/bin/python benchmarks/inference.py                           # demo bundle, CPU
    .venv/bin/python benchmarks/inference.py --real-archs --json /tmp/inference.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from spine_node.imaging import PreparedImage, PrepParams, decode, prepare_array
from spine_node.models.bundle import Manifest, MemberSpec, load_manifest
from spine_node.models.detector import Detector, RawHead, load_yolo_module
from spine_node.models.runtime import (
    Backend,
    Precision,
    RuntimeChoice,
    cpu_flags,
    has_native_bf16,
    installed_backends,
)
from spine_node.models.triage import TriageEnsemble, load_member, tta_views
from spine_node.offline import configure_offline

log = logging.getLogger(__name__)

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
#: The method's reference costs (spec.md): three members at 384 px per view, YOLO11-L at 640.
SPEC_MEMBERS_GFLOPS_PER_VIEW = 58.0
SPEC_DETECTOR_GFLOPS = 86.9
REAL_MEMBERS = (
    ("densenet", "densenet121"),
    ("efficientnet", "tf_efficientnetv2_s"),
    ("resnet", "resnet50"),
)
REAL_TRIAGE_SIZE = 384
REAL_DETECT_SIZE = 640
#: Goal (issue 13): a positive image within this factor of the FLOP limit at its precision.
GOAL_RATIO = 1.2


@dataclass(frozen=True)
class RunPath:
    """One way to run the models: a backend at a precision."""

    backend: Backend
    precision: Precision

    @property
    def name(self) -> str:
        """``backend-precision``."""
        return f"{self.backend.value}-{self.precision.value}"


@dataclass
class PathResult:
    """What one path measured (seconds per call, medians)."""

    path: RunPath
    peak_gflops: float
    limit_s: float
    stages: list[tuple[str, float, float | None]] = field(default_factory=list)  # name, s, FLOPs
    positive_image_s: float = float("nan")
    batch_images_per_s: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float:
        """Positive image time over the FLOP limit."""
        return self.positive_image_s / self.limit_s

    def to_json(self) -> dict[str, Any]:
        """Figures of this path."""
        return {
            "path": self.path.name,
            "backend": self.path.backend.value,
            "precision": self.path.precision.value,
            "matmul_peak_gflops": round(self.peak_gflops, 1),
            "flop_limit_s": round(self.limit_s, 4),
            "positive_image_s": round(self.positive_image_s, 4),
            "ratio_to_limit": round(self.ratio, 3),
            "batch_images_per_s": self.batch_images_per_s,
            "stages": [
                {
                    "name": name,
                    "ms": round(sec * 1e3, 2),
                    "gflops_per_s": None if flops is None else round(flops / sec / 1e9, 1),
                    "ratio_to_limit": None
                    if flops is None
                    else round(sec / (flops / (self.peak_gflops * 1e9)), 3),
                }
                for name, sec, flops in self.stages
            ],
            "error": self.error,
        }


# ---------------------------------------------------------------------------- inputs


def make_radiograph(side: int, *, seed: int = 0, compress: bool = True) -> bytes:
    """Encode a synthetic DX For Presentation radiograph (12 bits stored) as a DICOM file.

    Parameters
    ----------
    side : int
        Rows and columns.
    seed : int
        Seed of the pixel noise and of the spine's position.
    compress : bool
        JPEG 2000 lossless (as VinDr-SpineXR) when true, else Explicit VR Little Endian.

    Returns
    -------
    bytes
        The file, as it would arrive over C-STORE and sit in the spool.
    """
    if isinstance(side, bool) or not isinstance(side, int) or side < 32:
        raise ValueError(f"side must be an int >= 32, got {side!r}")
    rng = np.random.default_rng(seed)
    y = np.linspace(-1.0, 1.0, side, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, side, dtype=np.float32)[None, :] - np.float32(rng.normal(0, 0.1))
    column = np.exp(-(x**2) / 0.06) * (0.7 + 0.3 * np.cos(y * rng.uniform(9, 14)))
    pixels = (column * 3000.0 + 400.0).astype(np.uint16)
    pixels += rng.integers(0, 96, (side, side), dtype=np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPClassUID = DX_FOR_PRESENTATION
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "AP"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.minimum(pixels, 4095).astype("<u2").tobytes()
    if compress:
        ds.compress(JPEG2000Lossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read(raw: bytes) -> pydicom.Dataset:
    """Parse received bytes the way the worker reads a spool file."""
    return pydicom.dcmread(io.BytesIO(raw), force=True)


def _decode_bytes(raw: bytes) -> object:
    return decode(read(raw))


# ---------------------------------------------------------------------------- bundles


def real_yolo_checkpoint(path: Path, *, class_names: Sequence[str], seed: int = 0) -> Path:
    """Write a random-weight YOLO11-L checkpoint (``yolo11l.yaml``) that the node loads.

    Nothing is downloaded: the model is built from the yaml shipped with ultralytics.
    """
    configure_offline()
    import ultralytics
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load
    from ultralytics.utils import DEFAULT_CFG_DICT

    torch.manual_seed(seed)
    cfg = dict(yaml_model_load("yolo11l.yaml"))
    cfg["nc"] = len(class_names)
    model = DetectionModel(cfg, ch=3, nc=len(class_names), verbose=False)
    model.names = dict(enumerate(class_names))  # type: ignore[assignment]
    model.args = {**DEFAULT_CFG_DICT, "model": "yolo11l.yaml", "task": "detect"}  # type: ignore[assignment]
    model.eval()
    ckpt = {
        "model": model.half(),
        "ema": None,
        "updates": None,
        "train_args": {"task": "detect", "model": "yolo11l.yaml"},
        "version": ultralytics.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def build_real_bundle(
    out_dir: Path, *, seed: int = 0, onnx: bool = True, threshold: float = 0.0
) -> Manifest:
    """Build a random-weight bundle of the real-size members and YOLO11-L (no download).

    Parameters
    ----------
    out_dir : pathlib.Path
        Bundle directory.
    seed : int
        Seed of the random weights.
    onnx : bool
        Also export the ONNX models (needed for the ONNX Runtime backend).
    threshold : float
        Triage threshold; the default 0 makes every image positive, so the detector always
        runs and ``Cascade.analyze`` shows the worst case (random weights have no meaning).

    Returns
    -------
    Manifest
    """
    from spine_node.models.triage import create_member
    from spine_node.results.types import LESION_LABELS
    from training.export import (
        DEFAULT_TTA,
        DEFAULT_WEIGHTS,
        build_bundle,
        pretrained_norm,
    )

    torch.manual_seed(seed)
    members = []
    for name, arch in REAL_MEMBERS:
        mean, std = pretrained_norm(arch)
        spec = MemberSpec(
            name=name,
            arch=arch,
            kwargs={},
            weights="pending.pt",
            sha256="0" * 64,
            input_size=REAL_TRIAGE_SIZE,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
        )
        members.append((spec, create_member(spec).state_dict()))
    yolo = real_yolo_checkpoint(out_dir / "yolo11l-random.pt", class_names=LESION_LABELS, seed=seed)
    return build_bundle(
        out_dir,
        name="spine-node-real-archs-random",
        version="0.0.0-bench",
        intended_use="Benchmark only: real architectures, random weights, no clinical meaning.",
        demo=True,
        members=members,
        ensemble_weights=DEFAULT_WEIGHTS,
        threshold=threshold,
        tta_views=DEFAULT_TTA,
        detector_weights=yolo,
        prep={"triage_size": REAL_TRIAGE_SIZE, "detect_size": REAL_DETECT_SIZE},
        metrics={"note": "random weights, benchmark only"},
        onnx=onnx,
    )


def choose_bundle(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """Return the bundle directory to measure and a one-line description of where it came from."""
    if args.bundle is not None:
        return Path(args.bundle), f"bundle {args.bundle}"
    if args.real_archs:
        out = work / "real-archs"
        t0 = time.perf_counter()
        build_real_bundle(out)
        took = time.perf_counter() - t0
        return out, (
            f"real architectures, random weights, threshold 0 so the detector runs on every "
            f"image; built with ONNX exports in {took:.0f} s"
        )
    from spine_node.node import demo_bundle_path

    demo = demo_bundle_path()
    if (demo / "manifest.json").is_file():
        return demo, f"embedded demo bundle {demo}"
    from training.export import make_tiny_bundle

    out = work / "tiny"
    make_tiny_bundle(out, seed=0)
    return out, "tiny random bundle (no demo bundle in spine_node/demo_bundle)"


# ---------------------------------------------------------------------------- measuring


def time_calls(fn: Callable[[], object], calls: int, *, warmup: int = 1) -> list[float]:
    """Wall times of ``calls`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def count_flops(module: torch.nn.Module, example: torch.Tensor) -> float:
    """Floating-point operations of one forward pass (``torch.utils.flop_counter``; FMA = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = module.cpu().eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(example)
    return float(counter.get_total_flops())


def thop_gflops(model: torch.nn.Module, imgsz: int) -> float:
    """Ultralytics' own GFLOPs figure (ultralytics-thop), as its model summaries print it."""
    import copy

    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(copy.deepcopy(model).float().cpu(), imgsz))


def member_flops(bundle: Path, manifest: Manifest) -> tuple[dict[str, float], float]:
    """FLOPs per view of each member and per image of the detector; plus thop's detector GFLOPs."""
    out = {}
    for spec in manifest.members:
        size = spec.input_size
        out[spec.name] = count_flops(load_member(spec, bundle), torch.zeros(1, 1, size, size))
    yolo = load_yolo_module(bundle / manifest.detector.weights)
    imgsz = manifest.detector.imgsz
    out["detector"] = count_flops(RawHead(yolo), torch.zeros(1, 3, imgsz, imgsz))
    return out, thop_gflops(yolo, imgsz)


def matmul_peak(
    precision: Precision, device: torch.device, *, n: int = 2048, runs: int = 5
) -> float:
    """Best ``torch.matmul`` rate in GFLOP/s of two ``n x n`` matrices at ``precision``.

    On the CPU every thread of torch's pool takes part (oneDNN / MKL; bf16 through AVX512-BF16
    or AMX where present), so the figure is the machine's practical dense-algebra ceiling.
    """
    dtype = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16,
             Precision.FP16: torch.float16}[precision]  # fmt: skip
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    reps = 4 if device.type == "cpu" else 50
    best = float("inf")
    for _ in range(runs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * n**3 / best / 1e9


def shared_stages(
    inputs: Sequence[bytes], prep: PrepParams, views: int, repeats: int
) -> tuple[list[tuple[str, float]], list[PreparedImage]]:
    """Time decode, preparation and TTA views; return ``(name, median s)`` and the images."""
    decode_s: list[float] = []
    prep_s: list[float] = []
    tta_s: list[float] = []
    prepared: list[PreparedImage] = []
    for raw in inputs:
        source = decode(read(raw))
        decode_s += time_calls(partial(_decode_bytes, raw), repeats)
        prep_s += time_calls(partial(prepare_array, source.pixels, prep), repeats)
        image = prepare_array(source.pixels, prep)
        tta_s += time_calls(partial(tta_views, image.triage, views), repeats)
        prepared.append(image)
    stages = [
        ("decode (dcmread + decode)", statistics.median(decode_s)),
        ("preparation (CLAHE, resize, letterbox)", statistics.median(prep_s)),
        (f"TTA views ({views})", statistics.median(tta_s)),
    ]
    return stages, prepared


def paths_for(device: torch.device, manifest: Manifest, flags: frozenset[str]) -> list[RunPath]:
    """Every path this machine and bundle support, slowest family first."""
    installed = installed_backends()
    onnx = all(m.onnx for m in manifest.members) and bool(manifest.detector.onnx)
    out = []
    if device.type == "cuda":
        out += [RunPath(Backend.TORCH, p) for p in (Precision.FP32, Precision.FP16, Precision.BF16)]
        if onnx and Backend.ONNXRUNTIME in installed:
            out.append(RunPath(Backend.ONNXRUNTIME, Precision.FP32))
        return out
    bf16 = has_native_bf16(flags)
    out.append(RunPath(Backend.TORCH, Precision.FP32))
    if bf16:
        out.append(RunPath(Backend.TORCH, Precision.BF16))
    if onnx and Backend.ONNXRUNTIME in installed:
        out.append(RunPath(Backend.ONNXRUNTIME, Precision.FP32))
    if onnx and Backend.OPENVINO in installed:
        out.append(RunPath(Backend.OPENVINO, Precision.FP32))
        if bf16:
            out.append(RunPath(Backend.OPENVINO, Precision.BF16))
    return out


def _single_member_runner(path: RunPath, bundle: Path, spec: MemberSpec, device: str) -> Any:
    from spine_node.models.backend_onnxruntime import OnnxMembers, providers_for
    from spine_node.models.backend_openvino import OpenVinoMembers
    from spine_node.models.backend_torch import TorchMembers

    if path.backend is Backend.TORCH:
        return TorchMembers(
            {spec.name: load_member(spec, bundle)}, torch.device(device), path.precision
        )
    if path.backend is Backend.OPENVINO:
        return OpenVinoMembers({spec.name: bundle / str(spec.onnx)}, path.precision)
    return OnnxMembers({spec.name: bundle / str(spec.onnx)}, providers_for(device.split(":")[0]))


def measure_path(
    path: RunPath,
    bundle: Path,
    manifest: Manifest,
    device: str,
    prepared: Sequence[PreparedImage],
    flops: dict[str, float],
    peak: float,
    repeats: int,
    batch: int,
) -> PathResult:
    """Time the members, the detector and a positive image through the cascade on ``path``."""
    from spine_node.pipeline import Cascade, build_backend

    views = manifest.tta_views
    image_flops = sum(flops[m.name] for m in manifest.members) * views + flops["detector"]
    result = PathResult(path, peak, image_flops / (peak * 1e9))
    batches = [np.ascontiguousarray(tta_views(img.triage, views)[:, None]) for img in prepared]
    for spec in manifest.members:
        runner = _single_member_runner(path, bundle, spec, device)
        seconds: list[float] = []
        for b in batches:
            seconds += time_calls(partial(runner.run, b), repeats)
        result.stages.append(
            (
                f"member {spec.name} ({views} views)",
                statistics.median(seconds),
                flops[spec.name] * views,
            )
        )
        del runner
    runtime = RuntimeChoice(path.backend, path.precision, device)
    runner, net = build_backend(runtime, bundle, manifest)
    detector = Detector(net, manifest.detector, max_batch=max(batch, 1))
    seconds = []
    for img in prepared:
        seconds += time_calls(partial(detector, img.detect[None]), repeats)
    result.stages.append(
        ("detector (network + NMS)", statistics.median(seconds), flops["detector"])
    )
    # a positive image through the cascade: threshold 0, no content gate (random weights)
    cascade = Cascade(
        manifest=replace(manifest, threshold=0.0),
        triage=TriageEnsemble(
            runner, manifest.ensemble_weights, views, max_batch=max(batch, 1) * views
        ),
        detector=detector,
        content_gate=None,
    )
    seconds = []
    for i, img in enumerate(prepared):
        seconds += time_calls(partial(cascade.analyze_prepared, [f"1.2.3.{i}"], [img]), repeats)
    result.positive_image_s = statistics.median(seconds)
    result.stages.append(
        ("positive image (Cascade.analyze_prepared)", result.positive_image_s, image_flops)
    )
    if batch > 1:
        many = [prepared[i % len(prepared)] for i in range(batch)]
        uids = [f"1.2.3.{i}" for i in range(batch)]
        s = statistics.median(time_calls(partial(cascade.analyze_prepared, uids, many), repeats))
        result.batch_images_per_s = round(batch / s, 3)
    return result


# ---------------------------------------------------------------------------- report


def print_flops(
    manifest: Manifest,
    flops: dict[str, float],
    yolo_thop: float,
    print_fn: Callable[[str], None] = print,
) -> float:
    """Print the measured FLOPs against the method's figures; return GFLOPs per positive image."""
    sizes = sorted({m.input_size for m in manifest.members})
    per_view = sum(flops[m.name] for m in manifest.members) / 1e9
    parts = ", ".join(f"{m.name} ({m.arch}) {flops[m.name] / 1e9:.4g}" for m in manifest.members)
    print_fn(f"GFLOPs per view, members at {sizes} px: {parts}; sum {per_view:.4g}")
    print_fn(
        f"GFLOPs members per view = {per_view:.4g} measured (spec: about "
        f"{SPEC_MEMBERS_GFLOPS_PER_VIEW:.0f} for densenet121 + tf_efficientnetv2_s + resnet50 at 384)"
    )
    det = flops["detector"] / 1e9
    print_fn(
        f"GFLOPs detector = {det:.4g} measured by torch.utils.flop_counter, {yolo_thop:.4g} by "
        f"ultralytics-thop, at {manifest.detector.imgsz} px (spec: {SPEC_DETECTOR_GFLOPS} for YOLO11-L at 640)"
    )
    views = manifest.tta_views
    total = per_view * views + det
    print_fn(
        f"GFLOPs cascade per positive image = {total:.4g} ({views} views x {per_view:.4g} "
        f"+ detector {det:.4g}; spec: {views} x {SPEC_MEMBERS_GFLOPS_PER_VIEW:.0f} + "
        f"{SPEC_DETECTOR_GFLOPS} = {views * SPEC_MEMBERS_GFLOPS_PER_VIEW + SPEC_DETECTOR_GFLOPS:.1f})"
    )
    return total


def print_path(r: PathResult, print_fn: Callable[[str], None] = print) -> None:
    """One path's table: ms, GFLOP/s and ratio to the limit per stage."""
    print_fn(
        f"path {r.path.name}: matmul peak {r.peak_gflops:.1f} GFLOP/s {r.path.precision.value}, "
        f"FLOP limit of a positive image {r.limit_s * 1e3:.1f} ms"
    )
    print_fn(f"  {'stage':<44}{'ms':>10}{'GFLOP/s':>10}{'x limit':>10}")
    for name, sec, fl in r.stages:
        rate = "" if fl is None else f"{fl / sec / 1e9:10.1f}"
        ratio = "" if fl is None else f"{sec / (fl / (r.peak_gflops * 1e9)):10.2f}"
        print_fn(f"  {name:<44}{sec * 1e3:10.1f}{rate:>10}{ratio:>10}")
    if r.batch_images_per_s is not None:
        print_fn(f"  batched images/s ({r.path.name}) = {r.batch_images_per_s:.3f}")


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--bundle", type=Path, default=None, help="bundle directory to measure")
    which.add_argument("--real-archs", action="store_true",
                       help="random-weight real-size members (384 px) and YOLO11-L (640 px)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--images", type=int, default=2, help="test images (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per image and stage (default 3)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=2300,
                   help="side of the test radiographs (default 2300)")  # fmt: skip
    p.add_argument("--uncompressed", action="store_true",
                   help="send uncompressed images instead of JPEG 2000 lossless")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: every core, torch's and each library's default)")  # fmt: skip
    p.add_argument("--paths", default=None,
                   help="comma-separated paths to run, e.g. openvino-bf16,torch-fp32 (default: all)")  # fmt: skip
    p.add_argument("--batch", type=int, default=1,
                   help="also time this many images in one cascade call (images/s)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures here")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.image_size < 32 or args.batch < 1:
        p.error("--images, --repeats and --batch must be >= 1, --image-size >= 32")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures; return the exit status."""
    args = parse_args(argv)
    configure_offline()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    flags = cpu_flags()
    with tempfile.TemporaryDirectory(prefix="spine-inference-") as tmp:
        bundle, origin = choose_bundle(args, Path(tmp))
        manifest = load_manifest(bundle)
        paths = paths_for(device, manifest, flags)
        if args.paths:
            wanted = [w.strip() for w in args.paths.split(",") if w.strip()]
            unknown = [w for w in wanted if w not in {p.name for p in paths}]
            if unknown:
                print(f"inference.py: paths {unknown} not supported here; "
                      f"supported: {[p.name for p in paths]}", file=sys.stderr)  # fmt: skip
                return 2
            paths = [p for p in paths if p.name in wanted]
        inputs = [
            make_radiograph(args.image_size, seed=i, compress=not args.uncompressed)
            for i in range(args.images)
        ]
        syntax = "uncompressed" if args.uncompressed else "JPEG 2000 lossless"
        load = os.getloadavg()
        header = (
            f"inference benchmark: {manifest.name} {manifest.version} ({origin}); device "
            f"{device}; {args.images} image(s) {args.image_size}x{args.image_size} {syntax}; "
            f"{args.repeats} repeat(s); torch {torch.__version__} threads "
            f"{torch.get_num_threads()}; {os.cpu_count()} CPUs, native bf16 "
            f"{'yes' if has_native_bf16(flags) else 'no'}; load average {load[0]:.1f} "
            f"(other work on the machine slows every figure)"
        )
        print(header)
        flops, yolo_thop = member_flops(bundle, manifest)
        gflops = print_flops(manifest, flops, yolo_thop)
        prep = PrepParams(**dict(manifest.prep))
        shared, prepared = shared_stages(inputs, prep, manifest.tta_views, args.repeats)
        print("shared stages (no model), median ms:")
        for name, sec in shared:
            print(f"  {name:<44}{sec * 1e3:10.1f}")
        peaks = {p: matmul_peak(p, device) for p in sorted({q.precision for q in paths})}
        results: list[PathResult] = []
        for path in paths:
            # the peak again just before each path: on shared cores the load drifts, and the
            # ratio must compare the models with the machine as it was while they ran
            peaks[path.precision] = max(peaks[path.precision], matmul_peak(path.precision, device))
            try:
                r = measure_path(path, bundle, manifest, str(device), prepared, flops,
                                 peaks[path.precision], args.repeats, args.batch)  # fmt: skip
            except Exception as exc:  # one library failing must not hide the others
                log.warning("path %s failed: %s", path.name, exc, exc_info=True)
                r = PathResult(path, peaks[path.precision], gflops / peaks[path.precision])
                r.error = f"{type(exc).__name__}: {exc}"
                print(f"path {path.name}: failed ({r.error})")
                continue
            results.append(r)
        if not results:
            print("no path ran", file=sys.stderr)
            return 1
        for prec, peak in peaks.items():
            print(f"matmul peak {prec.value} = {peak:.1f} GFLOP/s (2048 x 2048, "
                  f"{torch.get_num_threads()} threads, best before any path); FLOP limit of a "
                  f"positive image {gflops / peak:.3f} s")  # fmt: skip
        # every ratio against the best peak the machine showed during the run (conservative)
        for r in results:
            r.peak_gflops = peaks[r.path.precision]
            r.limit_s = gflops / r.peak_gflops
            print_path(r)
        for r in results:
            print(f"positive image {r.path.name} = {r.positive_image_s:.3f} s (limit "
                  f"{r.limit_s:.3f} s at {r.path.precision.value}; ratio {r.ratio:.2f}x)")  # fmt: skip
        best = min(results, key=lambda r: r.positive_image_s)
        fp32 = [r for r in results if r.path.precision is Precision.FP32]
        best_fp32 = min(fp32, key=lambda r: r.positive_image_s) if fp32 else None
        print(
            f"best path: {best.path.name} positive_image_s={best.positive_image_s:.3f} "
            f"flop_limit_s={best.limit_s:.3f} ratio={best.ratio:.2f}x (goal <= {GOAL_RATIO}x: "
            f"{'met' if best.ratio <= GOAL_RATIO else 'NOT met'})"
        )
        if best_fp32 is not None:
            print(
                f"best fp32 path: {best_fp32.path.name} positive_image_s="
                f"{best_fp32.positive_image_s:.3f} flop_limit_s={best_fp32.limit_s:.3f} ratio="
                f"{best_fp32.ratio:.2f}x (goal <= {GOAL_RATIO}x: "
                f"{'met' if best_fp32.ratio <= GOAL_RATIO else 'NOT met'})"
            )
        if args.json is not None:
            document = {
                "header": header,
                "bundle": f"{manifest.name} {manifest.version}",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "native_bf16": has_native_bf16(flags),
                "load_average": [round(v, 2) for v in load],
                "gflops_per_positive_image": round(gflops, 3),
                "matmul_peak_gflops": {p.value: round(v, 1) for p, v in peaks.items()},
                "shared_stages_ms": {n: round(s * 1e3, 2) for n, s in shared},
                "paths": [r.to_json() for r in results],
                "backend": best.path.backend.value,
                "precision": best.path.precision.value,
                "positive_image_s": round(best.positive_image_s, 4),
                "flop_limit_s": round(best.limit_s, 4),
                "ratio_to_limit": round(best.ratio, 3),
                "fp32": None if best_fp32 is None else best_fp32.to_json(),
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

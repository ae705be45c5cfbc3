"""Inference benchmark: latency per cascade stage, PyTorch eager against ONNX Runtime.

Stages, each timed on its own (median over images x repeats, after one warm-up call):

* decode: ``dcmread`` of the received bytes + :func:`spine_node.imaging.decode`
  (modality/VOI LUT, polarity; JPEG 2000 lossless by default, as VinDr-SpineXR ships);
* preparation: :func:`spine_node.imaging.prepare_array` (CLAHE, triage resize, letterbox);
* TTA views: :func:`spine_node.models.triage.tta_views` with the bundle's view count;
* each triage member on its TTA batch (``views x 1 x S x S``), per backend;
* the detector (network + NMS) on one letterboxed image, per backend;
* end to end: :meth:`spine_node.pipeline.Cascade.analyze` on all images in one call, per
  backend (the detector runs only on images the triage calls positive).

The FLOPs of every member and of the detector are counted on the actual models
(``torch.utils.flop_counter``; ultralytics-thop as well for the detector) and printed next to
the method's reference (about 58 GFLOPs per view for the three members at 384 px, 86.9 GFLOPs
for YOLO11-L at 640 px), together with the achieved GFLOP/s of each stage.

Bundles: ``--bundle DIR``; ``--real-archs`` builds a random-weight bundle of the real members
(timm densenet121 / tf_efficientnetv2_s / resnet50 at 384 px, ``pretrained=False``) and YOLO11-L
(``yolo11l.yaml``, 7 classes, 640 px) with ONNX exports, no download; by default the embedded
demo bundle when it exists, else a tiny random bundle.

Run from the repository root::

    .venv/bin/python benchmarks/inference.py                       # demo or tiny bundle, CPU
    .venv/bin/python benchmarks/inference.py --real-archs --images 1 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from spine_node.models.detector import Detector, RawHead, TorchDetectorNet, load_yolo_module
from spine_node.models.triage import TorchMembers, load_member, tta_views
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
SHARED = "shared"


@dataclass(frozen=True)
class Stage:
    """Timings of one stage on one backend.

    Attributes
    ----------
    name : str
        Stage name (``"decode"``, ``"member densenet"``, ...).
    backend : str
        ``"torch"``, ``"onnx"`` or ``"shared"`` (stages without a model).
    seconds : tuple of float
        One wall time per timed call.
    flops : float or None
        Floating-point operations of one call, when the stage runs a model.
    """

    name: str
    backend: str
    seconds: tuple[float, ...]
    flops: float | None = None

    @property
    def median_s(self) -> float:
        """Median wall time of one call in seconds."""
        return statistics.median(self.seconds)

    @property
    def gflops_per_s(self) -> float | None:
        """Achieved GFLOP/s of the median call, when FLOPs are known."""
        return None if self.flops is None else self.flops / self.median_s / 1e9


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


# ---------------------------------------------------------------------------- backends


def ort_session(path: Path, providers: Sequence[str], threads: int | None) -> Any:
    """An ONNX Runtime session configured like the node's, with an optional thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


class OrtMember:
    """One member on ONNX Runtime: ``image (N,1,S,S)`` -> ``logit``, ``embedding``."""

    def __init__(self, path: Path, providers: Sequence[str], threads: int | None) -> None:
        self.session = ort_session(path, providers, threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Return the logits of a batch."""
        logit, _ = self.session.run(["logit", "embedding"], {"image": batch})
        return np.asarray(logit, np.float32).reshape(-1)


class TorchMember:
    """One member on PyTorch eager, through the node's :class:`TorchMembers` runner."""

    def __init__(self, name: str, module: torch.nn.Module, device: torch.device) -> None:
        self.runner = TorchMembers({name: module}, device)  # type: ignore[dict-item]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Return the logits of a batch."""
        ((logit, _),) = self.runner.run(batch)
        return logit


class OrtDetectorNet:
    """The detector's raw head on ONNX Runtime (the node's ``OnnxDetectorNet`` with threads)."""

    def __init__(self, path: Path, providers: Sequence[str], threads: int | None) -> None:
        self.session = ort_session(path, providers, threads)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Return the raw head output for a batch."""
        (out,) = self.session.run(["raw"], {"image": np.ascontiguousarray(batch, np.float32)})
        return np.asarray(out, np.float32)


def ort_providers(device: torch.device) -> tuple[list[str], str | None]:
    """Providers for ``device`` and a note when CUDA was asked for but ORT lacks it."""
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
        return [
            "CPUExecutionProvider"
        ], "ONNX Runtime has no CUDAExecutionProvider: onnx runs on the CPU"
    return ["CPUExecutionProvider"], None


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


def shared_stages(
    inputs: Sequence[bytes], prep: PrepParams, views: int, repeats: int
) -> tuple[list[Stage], list[PreparedImage]]:
    """Time decode, preparation and TTA views; return the stages and the prepared images."""
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
        Stage("decode (dcmread + decode)", SHARED, tuple(decode_s)),
        Stage("preparation (CLAHE, resize, letterbox)", SHARED, tuple(prep_s)),
        Stage(f"TTA views ({views})", SHARED, tuple(tta_s)),
    ]
    return stages, prepared


def model_stages(
    backend: str,
    bundle: Path,
    manifest: Manifest,
    device: torch.device,
    prepared: Sequence[PreparedImage],
    flops: Mapping[str, float],
    repeats: int,
    threads: int | None,
) -> list[Stage]:
    """Time every member on its TTA batch and the detector on one image, on ``backend``."""
    views = manifest.tta_views
    batches = [
        np.ascontiguousarray(tta_views(img.triage, views)[:, None], dtype=np.float32)
        for img in prepared
    ]
    stages = []
    providers, _ = ort_providers(device)
    for spec in manifest.members:
        member: Callable[[np.ndarray], np.ndarray]
        if backend == "torch":
            member = TorchMember(spec.name, load_member(spec, bundle), device)
        else:
            member = OrtMember(bundle / str(spec.onnx), providers, threads)
        seconds: list[float] = []
        for batch in batches:
            logits = member(batch)
            if not np.all(np.isfinite(logits)):
                log.warning("member %s (%s) gave non-finite logits", spec.name, backend)
            seconds += time_calls(partial(member, batch), repeats, warmup=0)
        stages.append(
            Stage(
                f"member {spec.name} ({views} views)",
                backend,
                tuple(seconds),
                flops[spec.name] * views,
            )
        )
    net: TorchDetectorNet | OrtDetectorNet
    if backend == "torch":
        net = TorchDetectorNet(load_yolo_module(bundle / manifest.detector.weights), device)
    else:
        net = OrtDetectorNet(bundle / str(manifest.detector.onnx), providers, threads)
    detector = Detector(net, manifest.detector)
    seconds = []
    for img in prepared:
        seconds += time_calls(partial(detector, img.detect[None]), repeats)
    stages.append(Stage("detector (network + NMS)", backend, tuple(seconds), flops["detector"]))
    return stages


def _set_ort_threads(cascade: Any, bundle: Path, device: str, threads: int) -> None:
    """Re-create a loaded cascade's ONNX Runtime sessions with ``threads`` intra-op threads.

    The node's runners take the library default (one thread per core); ``torch.set_num_threads``
    has no ONNX counterpart, so the benchmark swaps the sessions to compare like with like.
    """
    runner = getattr(cascade.triage, "runner", None)
    net = getattr(cascade.detector, "net", None)
    if not hasattr(runner, "sessions") or not hasattr(net, "session"):
        log.warning("cannot set ONNX Runtime threads on this cascade: library default kept")
        return
    providers, _ = ort_providers(torch.device(device))
    manifest = cascade.manifest
    runner.sessions = {  # type: ignore[union-attr]
        m.name: ort_session(bundle / str(m.onnx), providers, threads) for m in manifest.members
    }
    net.session = ort_session(bundle / str(manifest.detector.onnx), providers, threads)  # type: ignore[union-attr]


def end_to_end(
    backend: str,
    bundle: Path,
    device: str,
    inputs: Sequence[bytes],
    repeats: int,
    threads: int | None = None,
) -> tuple[list[float], int]:
    """Wall times of ``Cascade.analyze`` on all inputs at once (fresh parse each call).

    Returns
    -------
    (list of float, int)
        Seconds per call and the number of images the detector ran on.
    """
    from spine_node.pipeline import Cascade
    from spine_node.results.types import Status

    cascade = Cascade.load(bundle, device=device, backend=backend)
    if backend == "onnx" and threads:
        _set_ort_threads(cascade, bundle, device, threads)
    results = cascade.analyze([read(raw) for raw in inputs])
    positives = sum(1 for r in results if r.status == Status.POSITIVE)
    if cascade.manifest.detector.gate == "soft":
        positives = sum(1 for r in results if r.status != Status.NOT_PROCESSED)
    refused = [r.reason for r in results if r.status == Status.NOT_PROCESSED]
    if refused:
        log.warning("%d image(s) not processed by the cascade: %s", len(refused), refused[0])
    seconds = time_calls(lambda: cascade.analyze([read(raw) for raw in inputs]), repeats, warmup=0)
    return seconds, positives


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


# ---------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.1f}"


def print_report(
    stages: Sequence[Stage],
    backends: Sequence[str],
    e2e: Mapping[str, tuple[list[float], int]],
    n_images: int,
    print_fn: Callable[[str], None] = print,
) -> None:
    """Print the stage table, sums, images/s and the onnx/torch ratios."""
    by_key = {(s.name, s.backend): s for s in stages}
    names = list(dict.fromkeys(s.name for s in stages))
    head = f"{'stage':<42}" + "".join(f"{b + ' ms':>12}{b + ' GFLOP/s':>16}" for b in backends)
    print_fn(head)
    totals = dict.fromkeys(backends, 0.0)
    for name in names:
        row = f"{name:<42}"
        for b in backends:
            s = by_key.get((name, b)) or by_key.get((name, SHARED))
            if s is None:
                row += f"{'-':>12}{'':>16}"
                continue
            totals[b] += s.median_s
            rate = s.gflops_per_s
            row += _ms(s.median_s).rjust(12) + (
                f"{rate:16.1f}" if rate is not None else f"{'':>16}"
            )
        print_fn(row)
    row = f"{'sum of stages per image (detector always)':<42}"
    for b in backends:
        row += _ms(totals[b]).rjust(12) + f"{'':>16}"
    print_fn(row)
    for b in backends:
        print_fn(f"images/s {b} (sum of stages) = {1.0 / totals[b]:.3f}")
    for b in backends:
        if b in e2e:
            seconds, positives = e2e[b]
            med = statistics.median(seconds)
            print_fn(
                f"images/s {b} (Cascade.analyze, {n_images} images per call, detector ran on "
                f"{positives}) = {n_images / med:.3f}"
            )
    if "torch" in backends and "onnx" in backends:
        print_fn("ratios are speed-ups of ONNX Runtime over PyTorch eager (>1: onnx faster)")
        for name in names:
            t, o = by_key.get((name, "torch")), by_key.get((name, "onnx"))
            if t is not None and o is not None:
                print_fn(f"ratio onnx/torch {name} = {t.median_s / o.median_s:.2f}x")
        print_fn(f"ratio onnx/torch sum of stages = {totals['torch'] / totals['onnx']:.2f}x")
        if "torch" in e2e and "onnx" in e2e:
            ratio = statistics.median(e2e["torch"][0]) / statistics.median(e2e["onnx"][0])
            print_fn(f"ratio onnx/torch Cascade.analyze = {ratio:.2f}x")


def print_flops(
    manifest: Manifest,
    flops: Mapping[str, float],
    yolo_thop: float,
    print_fn: Callable[[str], None] = print,
) -> None:
    """Print the measured FLOPs against the method's reference figures."""
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
    print_fn(
        f"GFLOPs cascade per image = {per_view * views + det:.4g} ({views} views x {per_view:.4g} "
        f"+ detector {det:.4g}; spec: {views} x {SPEC_MEMBERS_GFLOPS_PER_VIEW:.0f} + "
        f"{SPEC_DETECTOR_GFLOPS} = {views * SPEC_MEMBERS_GFLOPS_PER_VIEW + SPEC_DETECTOR_GFLOPS:.1f})"
    )


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--bundle", type=Path, default=None, help="bundle directory to measure")
    which.add_argument("--real-archs", action="store_true",
                       help="random-weight real-size members (384 px) and YOLO11-L (640 px)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--images", type=int, default=3, help="test images (default 3)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed calls per image and stage (default 3)"
    )
    p.add_argument(
        "--image-size", type=int, default=2300, help="side of the test radiographs (default 2300)"
    )
    p.add_argument("--uncompressed", action="store_true",
                   help="send uncompressed images instead of JPEG 2000 lossless")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch and ONNX Runtime (default: each library's default)")  # fmt: skip
    p.add_argument("--no-end-to-end", action="store_true", help="skip the Cascade.analyze timing")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.image_size < 32:
        p.error("--images and --repeats must be >= 1, --image-size >= 32")
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
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="spine-inference-") as tmp:
        work = Path(tmp)
        bundle, origin = choose_bundle(args, work)
        manifest = load_manifest(bundle)
        backends = ["torch"]
        providers, note = ort_providers(device)
        if all(m.onnx for m in manifest.members) and manifest.detector.onnx:
            backends.append("onnx")
        else:
            note = "the bundle has no ONNX exports: onnx skipped"
        t0 = time.perf_counter()
        inputs = [
            make_radiograph(args.image_size, seed=i, compress=not args.uncompressed)
            for i in range(args.images)
        ]
        syntax = "uncompressed" if args.uncompressed else "JPEG 2000 lossless"
        print(
            f"inference benchmark: {manifest.name} {manifest.version} ({origin}); "
            f"device {device}; {args.images} image(s) {args.image_size}x{args.image_size} {syntax} "
            f"(made in {time.perf_counter() - t0:.1f} s); {args.repeats} repeat(s); "
            f"torch {torch.__version__} threads {torch.get_num_threads()}, onnxruntime providers "
            f"{providers} threads {args.threads or 'default'}; {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        if note:
            print(f"note: {note}")
        flops, yolo_thop = member_flops(bundle, manifest)
        print_flops(manifest, flops, yolo_thop)
        prep = PrepParams(**dict(manifest.prep))
        stages, prepared = shared_stages(inputs, prep, manifest.tta_views, args.repeats)
        for backend in backends:
            stages += model_stages(
                backend, bundle, manifest, device, prepared, flops, args.repeats, args.threads
            )
        e2e = {}
        if not args.no_end_to_end:
            for backend in backends:
                e2e[backend] = end_to_end(
                    backend, bundle, args.device, inputs, args.repeats, args.threads
                )
        print(f"median latency per image and stage over {args.images} image(s) x {args.repeats}:")
        print_report(stages, backends, e2e, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())

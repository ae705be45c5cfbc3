"""``spine-node analyze FILE...``: run the cascade on files, offline, and print the results.

``--json`` prints a JSON list with one object per input file (``file``, ``sop_instance_uid``,
``status``, ``reason``, ``score``, ``threshold``, ``member_scores``, ``findings`` with ``label``,
``score``, ``box`` ``[xmin, ymin, xmax, ymax]`` in source pixels). ``--out DIR`` also writes the
result objects (SR, overlay) built by ``spine_node.results.builder``. ``--heatmaps [METHOD]``
(``gradcam``, the default, or ``layercam``) adds ``heatmap`` to every analysed image's object
(``spine_node.models.explain.heatmap_to_json``: the map on a grid of at most 64 x 64) and, with
``--out``, the heatmap Secondary Capture.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``analyze`` arguments (``--config`` is added by ``cli.py``)."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM files to analyse")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    parser.add_argument(
        "--out", metavar="DIR", help="also write the result objects (SR, overlay) here"
    )
    parser.add_argument(
        "--bundle",
        metavar="DIR",
        help="model bundle directory (default: the configured bundle, else the embedded demo bundle)",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "openvino", "onnx"],
        default=None,
        help="inference backend (default: the configured one, else torch)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=None,
        help="arithmetic precision (default: the configured one, else fp32)",
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--heatmaps",
        nargs="?",
        const="gradcam",
        default=None,
        choices=["gradcam", "layercam"],
        metavar="METHOD",
        help="compute heatmaps (gradcam, the default, or layercam): in --json and, with --out, "
        "as a heatmap Secondary Capture",
    )


def demo_bundle_dir() -> Path:
    """Path of the embedded demo bundle (``spine_node/demo_bundle``)."""
    return Path(str(resources.files("spine_node") / "demo_bundle"))


def _configured(
    args: argparse.Namespace,
) -> tuple[str | None, str | None, str | None, str | None]:
    """Bundle, backend, device and precision from ``--config`` when one is given."""
    config = getattr(args, "config", None)
    if not config:
        return None, None, None, None
    from spine_node.config import load_settings

    settings = load_settings(Path(config))
    bundle = settings.bundle
    if bundle == "demo":
        bundle = str(demo_bundle_dir())
    return bundle, settings.backend, settings.device, settings.precision


def _choose_bundle(args: argparse.Namespace, configured: str | None) -> Path | None:
    """``--bundle``, else the configured bundle, else the embedded demo; None if not a bundle.

    An explicit choice that is not a bundle never silently falls back to the demo.
    """
    choice = args.bundle or configured
    # "demo" names the embedded demo bundle, as the bundle setting does
    candidate = demo_bundle_dir() if choice in (None, "", "demo") else Path(choice)
    return candidate if (candidate / "manifest.json").is_file() else None


def run(args: argparse.Namespace) -> int:
    """Analyse the files; return the exit status (2 when no usable bundle)."""
    from spine_node.config import ConfigError

    try:
        configured, backend, device, precision = _configured(args)
    except ConfigError as exc:
        print(f"spine-node analyze: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bundle = _choose_bundle(args, configured)
    if bundle is None:
        where = args.bundle or configured or str(demo_bundle_dir())
        print(
            f"spine-node analyze: no model bundle at {where} (no manifest.json); "
            "pass --bundle DIR or configure one",
            file=sys.stderr,
        )
        return EXIT_USAGE

    from spine_node.models.bundle import BundleError
    from spine_node.pipeline import Cascade

    try:
        cascade = Cascade.load(
            bundle,
            device=args.device or device or "auto",
            backend=args.backend or backend or "torch",
            precision=args.precision or precision or "fp32",
            heatmaps=bool(args.heatmaps),
            heatmap_method=args.heatmaps or "gradcam",
        )
    except (BundleError, ValueError) as exc:
        print(f"spine-node analyze: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from spine_node.imaging import ImageError, read_dataset

    rows: list[dict[str, Any]] = []
    status = EXIT_OK
    for name in args.files:
        try:
            ds = read_dataset(name)
        except (ImageError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, ImageError) else str(exc)
            rows.append(_unreadable(name, f"file could not be read: {reason}"))
            continue
        except Exception as exc:  # pydicom raises many kinds for a damaged file
            rows.append(_unreadable(name, f"file could not be read: {type(exc).__name__}: {exc}"))
            continue
        (result,) = cascade.analyze([ds])
        row = {"file": str(name), **result.to_json()}
        if result.heatmap is not None:
            from spine_node.models.explain import heatmap_to_json

            row["heatmap"] = heatmap_to_json(result.heatmap, args.heatmaps)
        rows.append(row)
        if args.out and not _write_objects(
            Path(args.out), ds, result, cascade.model_info, args.heatmaps
        ):
            status = EXIT_FAILED

    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for row in rows:
            print(_line(row))
    return status


def _unreadable(name: str, reason: str) -> dict[str, Any]:
    return {
        "file": str(name),
        "sop_instance_uid": None,
        "status": "not_processed",
        "reason": reason,
        "score": None,
        "threshold": None,
        "member_scores": {},
        "findings": [],
    }


def _line(row: dict[str, Any]) -> str:
    if row["status"] == "not_processed":
        return f"{row['file']}: not processed: {row['reason']}"
    text = f"{row['file']}: {row['status']} (score {row['score']:.3f}, threshold {row['threshold']:.3f})"
    for f in row["findings"]:
        box = ", ".join(f"{v:.0f}" for v in f["box"])
        text += f"\n  {f.get('display_label', f['label'])} {f['score']:.2f} [{box}]"
    return text


def _write_objects(
    out: Path, ds: Any, result: Any, model_info: Any, heatmap_method: str | None = None
) -> bool:
    try:
        from spine_node.results.builder import ResultOptions, build_results
    except ImportError as exc:
        print(
            f"spine-node analyze: cannot write result objects, the results builder is unavailable ({exc})",
            file=sys.stderr,
        )
        return False
    try:
        options = ResultOptions(
            heatmap=heatmap_method is not None, heatmap_method=heatmap_method or "gradcam"
        )
        objects = build_results(ds, result, model_info, options)
        out.mkdir(parents=True, exist_ok=True)
        for obj in objects:
            obj.save_as(out / f"{obj.SOPInstanceUID}.dcm", enforce_file_format=True)
    except Exception as exc:  # report and go on with the next file
        log.warning(
            "result objects for %s could not be written", result.sop_instance_uid, exc_info=True
        )
        print(f"spine-node analyze: result objects not written: {exc}", file=sys.stderr)
        return False
    return True

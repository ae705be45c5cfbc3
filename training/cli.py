"""``spine-train``: one console script for data, training, evaluation and bundle building.

Every subcommand lives in its own module that exposes ``add_arguments(parser)`` and
``run(args) -> int``; this module only mounts them and configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from spine_node.offline import configure_offline

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: (subcommand, module, one-line help)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("phantom", "training.phantom", "generate a VinDr-layout phantom data set"),
    ("classifier", "training.train_classifier", "train one triage member (study-level K-fold)"),
    ("detector", "training.train_detector", "train the YOLO11 lesion detector (offline)"),
    (
        "ensemble",
        "training.ensemble",
        "fit ensemble weights and threshold on out-of-fold predictions",
    ),
    (
        "predict",
        "training.predict",
        "run a bundle's own cascade over a split and write the CSVs evaluate reads",
    ),
    ("evaluate", "training.evaluate", "evaluate predictions on a labelled split (AUROC, mAP)"),
    ("robustness", "training.robustness", "metric deltas under noise/blur/contrast/exposure"),
    ("grader", "training.meyerding", "train the Meyerding grader (HOG + random forest)"),
    ("bundle", "training.demo:bundle", "assemble a model bundle from trained artefacts"),
    ("demo-bundle", "training.demo", "build the phantom-trained demo bundle end to end"),
    (
        "check-precision",
        "training.precision",
        "check bf16/fp16 against fp32 on a held-out split; record it in the bundle manifest",
    ),
)


def _load(target: str) -> tuple[object, object]:
    """Return the (add_arguments, run) pair named by ``module`` or ``module:prefix``."""
    module_name, _, prefix = target.partition(":")
    module = importlib.import_module(module_name)
    add = getattr(module, f"{prefix}_add_arguments" if prefix else "add_arguments")
    run = getattr(module, f"{prefix}_run" if prefix else "run")
    return add, run


def build_parser() -> argparse.ArgumentParser:
    """Build the ``spine-train`` argument parser with every subcommand mounted."""
    parser = argparse.ArgumentParser(
        prog="spine-train",
        description="Train, evaluate and package spine-node models (offline; CPU or CUDA).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, target, help_text in SUBCOMMANDS:
        try:
            add, run = _load(target)
        except (ImportError, AttributeError) as exc:  # one broken module must not hide the others
            reason = f"{type(exc).__name__}: {exc}"
            p = sub.add_parser(name, help=f"{help_text} (unavailable)", description=reason)
            p.set_defaults(_run=_unavailable(name, reason))
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)  # type: ignore[operator]
        p.set_defaults(_run=run)
    return parser


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        print(f"spine-train {name}: unavailable ({reason})", file=sys.stderr)
        return 1

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spine-train``; returns the process exit status."""
    configure_offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # per-tile encoder chatter and VinDr's non-DICOM "UIDs"
        logging.getLogger("openjpeg").setLevel(logging.WARNING)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

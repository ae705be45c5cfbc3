"""Does a content gate fitted with rendering variants still refuse what is not a spine?

The content gate (:mod:`spine_node.models.gate`) is fitted on the embeddings of training
images. Other vendors render the same radiograph differently (tone curves, 8-bit LUT output,
windows); :mod:`training.gate_images` adds such renderings to the fit. This script measures
the trade-off on a bundle, on images that the gate is NOT fitted on:

* validation images of fold 0 (the bundle's own split), as prepared and as renderings drawn
  with another seed than the fit's: the share the gate accepts (should be ~1);
* non-spine images, untagged so that only the content check decides: pydicom's own test files
  (a chest and an extremity radiograph, CT and MR slices, upsampled to 512 x 384 when small):
  their out-of-distribution score and whether the gate refuses them (should refuse).

for four gates: fitted on the images as prepared or with one rendering per image, each on the
node's prepared view or on a view equalised first (a global histogram equalisation of the
display image, which undoes monotone tone curves; the node does not use it).

Run from the repository root (the demo bundle and its phantom seed by default)::

    .venv/bin/python benchmarks/gate_renderings.py
    .venv/bin/python benchmarks/gate_renderings.py --bundle DIR --data PHANTOM_ROOT --seed 11
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parents[1]
NON_SPINE = ("RG1_J2KR.dcm", "RG3_J2KR.dcm", "CT_small.dcm", "MR_small.dcm", "MR2_UNCR.dcm")


def equalize(image: np.ndarray, bins: int = 4096) -> np.ndarray:
    """Global histogram equalisation of a [0, 1] image (float32, same shape)."""
    hist, _ = np.histogram(image, bins=bins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    cdf = (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0)
    index = np.clip((image * bins).astype(np.int64), 0, bins - 1)
    return cdf[index].astype(np.float32)


def _non_spine_source(name: str) -> np.ndarray:
    from spine_node.imaging import decode

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    pixels = decode(dcmread(path)).pixels
    if min(pixels.shape) < 300:
        pixels = cv2.resize(pixels, (384, 512), interpolation=cv2.INTER_LINEAR)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the demo bundle)")
    parser.add_argument("--data", type=Path, help="phantom root (default: generated for --seed)")
    parser.add_argument("--seed", type=int, help="phantom and fold seed (default: the bundle's)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    from spine_node.imaging import PrepParams, decode, prepare_array, read_dataset
    from spine_node.models.bundle import load_manifest
    from spine_node.models.gate import fit_gate
    from spine_node.node import demo_bundle_path
    from spine_node.pipeline import Cascade
    from training import vindr
    from training.gate_images import rendering_variant
    from training.phantom import write_phantom_dataset

    bundle = args.bundle or demo_bundle_path()
    manifest = load_manifest(bundle)
    settings = (manifest.metrics or {}).get("settings", {})
    seed = args.seed if args.seed is not None else int(settings.get("seed", 0))
    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp(prefix="gate-phantom-"))
        write_phantom_dataset(data, int(settings.get("images", 560)), seed, balanced=True,
                              size=(int(settings.get("rows", 512)), int(settings.get("columns", 384))))
    records = vindr.load_records(data, "train")
    by_id = {r.image_id: r for r in records}
    train_ids, val_ids = vindr.study_stratified_kfold(records, int(settings.get("folds", 5)), seed)[0]
    cascade = Cascade.load(bundle, device="cpu")
    params = PrepParams(triage_size=int(manifest.prep.get("triage_size", 384)),
                        detect_size=int(manifest.prep.get("detect_size", 640)))

    def sources(ids: Sequence[str]) -> list[np.ndarray]:
        return [decode(read_dataset(str(by_id[i].path))).pixels for i in ids]

    train_src, val_src = sources(train_ids), sources(val_ids)
    others = {name: _non_spine_source(name) for name in NON_SPINE}

    def rendered(images: Sequence[np.ndarray], rng_seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(rng_seed)
        return [rendering_variant(x, rng) for x in images]

    val_rendered = rendered(val_src, seed + 1000)
    print(f"bundle {manifest.name} {manifest.version}, phantom seed {seed}: gate fitted on "
          f"{len(train_src)} fold-0 training images, checked on {len(val_src)} validation images "
          f"and {len(others)} non-spine images (untagged)")
    header = ["view", "fit", "threshold", "val accepted", "val rendered accepted",
              *[n.split(".")[0] for n in NON_SPINE]]
    print(" | ".join(header))
    views: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "prepared": lambda x: x, "equalised": equalize}
    for view_name, view in views.items():
        def embed(images: Sequence[np.ndarray], view: Callable[[np.ndarray], np.ndarray] = view
                  ) -> np.ndarray:
            arrays = np.stack([prepare_array(view(x), params).triage for x in images])
            return np.asarray(cascade.triage.embed(arrays.astype(np.float32)))

        base = embed(train_src)
        val, val_r = embed(val_src), embed(val_rendered)
        other = embed(list(others.values()))
        for fit_name, fit in (("as prepared", base),
                              ("+1 rendering", np.concatenate([base, embed(rendered(train_src, seed))]))):
            from spine_node.models.gate import ContentGate

            stats, threshold = fit_gate(fit, 0.995)
            gate = ContentGate(stats, threshold)
            d_other = gate.distances(other)
            cells = [view_name, fit_name, f"{threshold:.2f}",
                     f"{np.mean(gate.distances(val) <= threshold):.3f}",
                     f"{np.mean(gate.distances(val_r) <= threshold):.3f}",
                     *[f"{d:.1f} {'refused' if d > threshold else 'ACCEPTED'}" for d in d_other]]
            print(" | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

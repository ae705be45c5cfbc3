"""Training throughput benchmark: triage-member images/s, and the data pipeline on its own.

Two measurements on a phantom (``training.phantom``) whose images are prepared into a cache
first (not timed):

* ``loader``: images/s of the training data pipeline alone (cache read + augmentation +
  collation), the old way (``DataLoader`` without workers, ``augment_batch`` image by image in
  the main loop) against the new one (``AugmentedDataset`` in ``--workers`` loader workers),
  and the batched augmentation (``augment_batch_device``, what CUDA runs use) timed on the CPU
  on already loaded batches. On a GPU the pipeline must keep up with the model, so this is
  the CPU-bound part.
* ``train``: one epoch of :func:`training.train_classifier.train_fold` (``--arch`` at
  ``--input-size``, full-size by default, random weights), images/s over the whole call with a
  4-image validation set, and the loop's own per-epoch figure when the code records it.

The same script runs against older code (``PYTHONPATH`` at another checkout): it only uses
what both have. Machine load (1-minute load average) is printed before and after: other
processes share the CPUs, so compare figures of one run, or runs at similar load.

Run from the repository root::

    .venv/bin/python benchmarks/train_throughput.py --mode loader
    .venv/bin/python benchmarks/train_throughput.py --mode train --arch densenet121
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _phantom(work: Path, images: int, size: tuple[int, int], input_size: int) -> tuple[Any, Any]:
    from spine_node.imaging import PrepParams
    from training import vindr
    from training.phantom import write_phantom_dataset

    data = work / "phantom"
    if not (data / "annotations" / "train.csv").is_file():
        write_phantom_dataset(data, images, 0, balanced=True, size=size, test_fraction=0.01)
    records = vindr.load_records(data, "train")
    params = PrepParams(triage_size=input_size)
    cache = work / "cache"
    for r in records:  # untimed; serial so it works with any version of the cache code
        vindr.cached_triage_array(r, params, cache)
    return records, (params, cache)


def loader_mode(args: argparse.Namespace, records: Any, prep: Any) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from training import train_classifier as tc
    from training import vindr

    params, cache = prep
    dataset = vindr.TriageDataset(records, params, cache)
    aug = tc.AugmentParams()
    out: dict[str, Any] = {}

    def run(loader: Any, in_main: bool) -> float:
        gen = torch.Generator().manual_seed(0)
        n, t0 = 0, time.perf_counter()
        for _ in range(args.rounds):
            for batch in loader:
                x = batch[0]
                if in_main:
                    x = tc.augment_batch(x, aug, gen)
                n += int(x.shape[0])
        return n / (time.perf_counter() - t0)

    legacy = DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=tc._collate)
    out["legacy_main_loop_images_per_s"] = round(run(legacy, True), 1)
    if hasattr(tc, "AugmentedDataset"):
        wrapped = tc.AugmentedDataset(dataset, aug, 0)
        for workers in sorted({0, args.workers}):
            loader = DataLoader(
                wrapped,
                batch_size=args.batch,
                shuffle=True,
                collate_fn=tc._collate,
                num_workers=workers,
            )
            out[f"workers_{workers}_images_per_s"] = round(run(loader, False), 1)
    if hasattr(tc, "augment_batch_device"):  # batched augmentation, here on the CPU
        plain = DataLoader(dataset, batch_size=args.batch, collate_fn=tc._collate)
        batches = [b[0] for b in plain]
        gen = torch.Generator().manual_seed(0)
        n, t0 = 0, time.perf_counter()
        for _ in range(args.rounds):
            for x in batches:
                n += int(tc.augment_batch_device(x, aug, gen).shape[0])
        out["batched_augment_cpu_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    return out


def train_mode(args: argparse.Namespace, records: Any, prep: Any) -> dict[str, Any]:
    from training import train_classifier as tc
    from training import vindr

    params, cache = prep
    train_set = vindr.TriageDataset(records[4:], params, cache)
    val_set = vindr.TriageDataset(records[:4], params, cache)
    fields = {f for f in tc.ClassifierConfig.__dataclass_fields__}
    extra_cfg = {"num_workers": args.workers} if "num_workers" in fields else {}
    if "amp" in fields:
        extra_cfg["amp"] = args.amp
    config = tc.ClassifierConfig(
        arch=args.arch,
        name="bench",
        kwargs=json.loads(args.model_kwargs),
        input_size=args.input_size,
        epochs=1,
        batch_size=args.batch,
        seed=0,
        **extra_cfg,
    )
    kwargs: dict[str, Any] = {"fold": 0, "device": args.device}
    if "from_scratch" in inspect.signature(tc.train_fold).parameters:
        kwargs["from_scratch"] = True
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tc.train_fold(config, train_set, val_set, Path(tmp) / "fold", **kwargs)
        elapsed = time.perf_counter() - t0
        history = json.loads((Path(tmp) / "fold" / "history.json").read_text())
    out = {
        "train_images": len(train_set),
        "call_s": round(elapsed, 1),
        "call_images_per_s": round(len(train_set) / elapsed, 2),
    }
    if "train_images_per_s" in history[0]:
        out["loop_images_per_s"] = history[0]["train_images_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("loader", "train"), default="loader")
    parser.add_argument("--images", type=int, default=52, help="phantom images")
    parser.add_argument("--size", default="1024x768", help="phantom ROWSxCOLUMNS")
    parser.add_argument("--input-size", type=int, default=384)
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--model-kwargs", default="{}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="loader passes over the images")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", type=Path, help="reused between runs (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, cols = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        records, prep = _phantom(work, args.images, (rows, cols), args.input_size)
        result: dict[str, Any] = {"mode": args.mode, "load_before": _load()}
        run = loader_mode if args.mode == "loader" else train_mode
        result.update(run(args, records, prep))
        result["load_after"] = _load()
        result["cpus"] = os.cpu_count()
        print(json.dumps(result))


if __name__ == "__main__":
    main()

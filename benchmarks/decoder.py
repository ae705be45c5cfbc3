"""Cost of decoding in the isolated child: one image prepared in-process and through the node's
:class:`spine_node.isolation.IsolatedPreparer`, with and without its shared memory area.

The image is one phantom DX For Presentation radiograph as ``benchmarks/latency.py`` sends
(default 2500 x 2000, 16 bits allocated, 12 stored, uncompressed: a 10 MB dataset whose
prepared arrays are 42 MB as float32, 12 MB as the node hands them on), read once; each round
calls, in turn:

* ``in-process``: :func:`spine_node.imaging.prepare` in this process (the floor);
* ``isolated, float32 arrays``: ``prepare`` in the isolated child (the node before it handed
  the display and enhanced images on at 8 bits);
* ``isolated, shared area``: the preparer the node uses (``prepare_compact``; dataset and
  arrays through a memfd);
* ``isolated, pipe only``: ``area_bytes=0``, everything pickled through the pipe (the
  transport before the shared area, and the fallback for images larger than the area).

The children are started and warmed before the rounds. Reported: the median (and minimum) s
per call over the rounds, and each isolated path's cost above in-process.

Run from the repository root::

    .venv/bin/python benchmarks/decoder.py [--rows 2500] [--columns 2000] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import make_images  # noqa: E402  (benchmarks/latency.py)
from pydicom import Dataset, dcmread  # noqa: E402

from spine_node.imaging import (  # noqa: E402
    DEFAULT_PARAMS,
    PreparedImage,
    PrepParams,
    prepare,
    prepare_compact,
)
from spine_node.isolation import IsolatedPreparer  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=2500, help="image rows (>= 128)")
    p.add_argument("--columns", type=int, default=2000, help="image columns (>= 96)")
    p.add_argument("--rounds", type=int, default=12, help="calls per path (>= 1)")
    args = p.parse_args(argv)
    if args.rows < 128 or args.columns < 96 or args.rounds < 1:
        p.error("--rows must be >= 128, --columns >= 96, --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spine-decoder-") as work:
        (path,) = make_images(Path(work), 1, args.rows, args.columns)
        ds = dcmread(path, force=True)
        size_mb = path.stat().st_size / 1e6
    params = DEFAULT_PARAMS
    area_full = IsolatedPreparer(prepare)
    area = IsolatedPreparer(prepare_compact)
    pipe = IsolatedPreparer(prepare_compact, area_bytes=0)
    paths: dict[str, Callable[[Dataset, PrepParams], PreparedImage]] = {
        "in-process": prepare,
        "isolated, float32 arrays": area_full,
        "isolated, shared area": area,
        "isolated, pipe only": pipe,
    }

    def megabytes(out: PreparedImage) -> float:
        return sum(a.nbytes for a in (out.source.pixels, out.enhanced, out.triage, out.detect)) / 1e6

    try:
        full_mb, compact_mb = megabytes(prepare(ds, params)), megabytes(prepare_compact(ds, params))
        for fn in (area_full, area, pipe):
            fn(ds, params)  # start the child, warm it
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(ds, params)
                times[name].append(time.perf_counter() - t0)
        in_pipe = (area.requests_in_pipe, area.results_in_pipe)
    finally:
        area_full.close()
        area.close()
        pipe.close()
    print(f"1 DX image {args.rows}x{args.columns} 16-bit uncompressed ({size_mb:.1f} MB; "
          f"prepared arrays {full_mb:.1f} MB as float32, {compact_mb:.1f} MB as the node hands "
          f"them on), {args.rounds} rounds, paths in turn")  # fmt: skip
    floor = statistics.median(times["in-process"])
    for name, values in times.items():
        median = statistics.median(values)
        extra = "" if name == "in-process" else f"  (+{median - floor:.4f} s over in-process)"
        print(f"{name:24s} median {median:.4f} s, min {min(values):.4f} s{extra}")
    print(f"shared-area preparer: {in_pipe[0]} requests and {in_pipe[1]} results "
          "went through the pipe (too big for the area)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference stages and the seconds an image spent in each (recorded per job, for metrics).

The cascade measures its stages per batch and gives each image its share
(:attr:`spine_node.results.types.CascadeResult.stage_seconds`); the worker adds the time to
build and write the result objects and records them with the job's result
(:meth:`spine_node.store.JobStore.complete_job`, table ``job_stage_times``). The metrics
endpoint reads them back as a histogram per stage.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class Stage(str, enum.Enum):
    """A stage of one image's analysis, in the order it runs."""

    DECODE = "decode"  # read and prepare the pixels (isolated decoder child)
    GATE = "gate"  # tag gate and content (out-of-distribution) gate
    TRIAGE = "triage"  # the triage ensemble (all members, all TTA views)
    DETECTOR = "detector"  # YOLO detector (and Meyerding grading), positives only
    RESULTS = "results"  # SR / Secondary Capture / GSPS built and written to the outbox


def check_stage_seconds(values: Mapping[str, float]) -> dict[str, float]:
    """Validate ``stage -> seconds``: known stage names, finite non-negative seconds.

    Raises
    ------
    ValueError
        An unknown stage or a negative or non-finite duration.
    """
    known = {s.value for s in Stage}
    out: dict[str, float] = {}
    for stage, seconds in values.items():
        name = stage.value if isinstance(stage, Stage) else str(stage)
        if name not in known:
            raise ValueError(f"stage must be one of {sorted(known)}, got {stage!r}")
        value = float(seconds)
        if not (value >= 0.0 and value < float("inf")):
            raise ValueError(f"seconds of stage {name} must be finite and >= 0, got {seconds!r}")
        out[name] = value
    return out


@contextmanager
def timed(into: dict[str, float], stage: Stage) -> Iterator[None]:
    """Add the seconds spent in the ``with`` block to ``into[stage]`` (monotonic clock)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[stage.value] = into.get(stage.value, 0.0) + time.perf_counter() - start

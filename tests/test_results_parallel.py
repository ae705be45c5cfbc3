"""ParallelBuilder: the SR from a helper process, the same objects as build_results, and the
worker building the SR itself whenever the helper cannot."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from spine_node.results.builder import ResultOptions, build_results
from spine_node.results.parallel import ParallelBuilder
from spine_node.results.types import ModelInfo
from spine_node.worker import encode_dataset
from tests.results_kit import MODEL, dx_source, positive, write_and_read


@pytest.fixture
def builder() -> Iterator[ParallelBuilder]:
    made = ParallelBuilder(ResultOptions(gsps=True), timeout_s=120)
    try:
        yield made
    finally:
        made.close()


def _encoded(objects: list[Dataset]) -> list[bytes]:
    """Each object's file, its dates and times (of creation, not content) left out."""
    out = []
    for obj in objects:
        copy = dcmread(DicomBytesIO(encode_dataset(obj)))

        def drop_times(ds: Dataset, element: DataElement) -> None:
            if element.VR in ("DA", "TM", "DT"):
                del ds[element.tag]

        copy.walk(drop_times)
        out.append(encode_dataset(copy))
    return out


def _source(tmp_path: object, sop: str) -> Dataset:
    """A received image as the worker has it: written and read back (raw elements)."""
    from pathlib import Path

    return write_and_read(dx_source(sop=sop), Path(str(tmp_path)) / f"{sop}.dcm")


def _warm(builder: ParallelBuilder) -> None:
    deadline = time.monotonic() + 120  # a wait for the helper's start, not a timing goal
    while not builder.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert builder.ready()


def test_same_objects_as_build_results(builder: ParallelBuilder, tmp_path: object) -> None:
    source = _source(tmp_path, "1.2.826.0.1.3680043.8.498.31")
    result = positive(source, n=3)
    want = _encoded(build_results(source, result, MODEL, ResultOptions(gsps=True)))
    early = builder(source, result, MODEL)  # the helper is still starting: built here
    assert builder.built_here == 1
    _warm(builder)
    got = builder(source, result, MODEL)
    assert builder.built_here == 1  # by the helper
    assert [str(o.Modality) for o in got] == ["SR", "OT", "PR"]
    assert _encoded(got) == _encoded(early) == want  # byte for byte (but the clock)
    assert builder.helper_failures == 0
    assert "PixelData" in source  # the worker's dataset is left whole


def test_helper_killed_sr_built_in_the_worker_then_a_new_helper(
    builder: ParallelBuilder, tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    _warm(builder)
    first = _source(tmp_path, "1.2.826.0.1.3680043.8.498.41")
    builder(first, positive(first), MODEL)
    helpers = multiprocessing.active_children()
    assert helpers
    for helper in helpers:
        os.kill(helper.pid or 0, signal.SIGKILL)
        helper.join(timeout=30)
    second = _source(tmp_path, "1.2.826.0.1.3680043.8.498.42")
    result = positive(second, n=2)
    want = _encoded(build_results(second, result, MODEL, ResultOptions(gsps=True)))
    assert _encoded(builder(second, result, MODEL)) == want
    assert builder.helper_failures == 1
    assert "SR helper process failed" in caplog.text
    assert "a new helper is started" in caplog.text
    _warm(builder)
    third = _source(tmp_path, "1.2.826.0.1.3680043.8.498.43")
    builder(third, positive(third), MODEL)
    assert builder.helper_failures == 1 and builder.built_here == 1  # the new helper built it
    assert {h.pid for h in multiprocessing.active_children()}.isdisjoint({h.pid for h in helpers})


def test_an_error_of_the_sr_build_itself_reaches_the_caller(
    builder: ParallelBuilder, tmp_path: object
) -> None:
    """A model whose name the SR cannot carry fails here as in build_results (no restart)."""
    _warm(builder)
    source = _source(tmp_path, "1.2.826.0.1.3680043.8.498.51")
    result = positive(source)
    bad = ModelInfo(name="", version="1.0")
    with pytest.raises(ValueError) as in_worker:
        build_results(source, result, bad, ResultOptions(gsps=True))
    with pytest.raises(ValueError) as parallel:
        builder(source, result, bad)
    assert str(parallel.value) == str(in_worker.value)


def test_bad_arguments_are_refused_before_any_work() -> None:
    with pytest.raises(TypeError, match="options must be a ResultOptions"):
        ParallelBuilder(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        ParallelBuilder(ResultOptions(), timeout_s=0)


def test_a_killed_node_leaves_no_helper_behind(tmp_path: object) -> None:
    """SIGKILL cannot stop the helper from the node; the helper sees its parent gone and ends
    (it would otherwise wait on its task queue for ever, re-parented to init)."""
    import subprocess
    import sys
    import time

    script = (
        "import multiprocessing, sys, time\n"
        "from spine_node.results.builder import ResultOptions\n"
        "from spine_node.results.parallel import ParallelBuilder\n"
        "if __name__ == '__main__':\n"
        "    builder = ParallelBuilder(ResultOptions())\n"
        "    print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "    time.sleep(600)\n"
    )
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        helpers = [int(pid) for pid in node.stdout.readline().split()]
        assert helpers
        assert all(_alive(pid) for pid in helpers)
    finally:
        node.kill()
        node.wait(timeout=30)
    deadline = time.monotonic() + 60  # a wait for the outcome, not a timing goal
    while any(_alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in helpers)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""A worker whose batch hangs (thread alive, loop stuck) stops the systemd watchdog pings."""

from __future__ import annotations

import threading
from pathlib import Path

from spine_node.node import start_node
from spine_node.worker import Progress
from tests.nodekit import make_image, node_settings, storescu, wait_for

pytest_plugins = ("tests.fixtures_models",)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_idle_time_from_the_last_mark() -> None:
    clock = Clock()
    progress = Progress(clock)
    clock.now += 5.0
    assert progress.idle_s() == 5.0
    progress.mark()
    assert progress.idle_s() == 0.0


def test_a_hung_batch_is_a_problem_once_it_outlasts_the_lease(tmp_path: Path,
                                                             tiny_bundle: Path) -> None:
    settings = node_settings(tmp_path, bundle=str(tiny_bundle), lease_s=2.0, worker_poll_s=0.2)
    node = start_node(settings, ("receiver", "worker"))
    release = threading.Event()
    entered = threading.Event()
    try:
        assert node.problem() is None
        analyze = node.cascade.analyze

        def hang(*args, **kwargs):  # type: ignore[no-untyped-def]
            entered.set()
            release.wait(60)  # a model call that does not return
            return analyze(*args, **kwargs)

        node.cascade.analyze = hang
        image = tmp_path / "image.dcm"
        make_image(image, rows=320, cols=256)
        assert storescu(settings.port, [image]).returncode == 0
        assert entered.wait(60)
        assert node.worker_thread is not None and node.worker_thread.is_alive()
        problem = wait_for(node.problem, timeout=30, interval=0.2)
        assert "has not finished for" in problem and "(hung)" in problem
        assert not node.alive()
        release.set()  # the call returns: the loop moves again
        wait_for(lambda: node.problem() is None, timeout=60, interval=0.2)
    finally:
        release.set()
        node.stop()

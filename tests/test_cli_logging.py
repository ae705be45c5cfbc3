"""Logging: one line per event, JSON when asked, configured only by the CLI."""

from __future__ import annotations

import json
import logging

import pytest

from spine_node.cli import configure_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", True)
    logging.getLogger("spine_node.worker").info("job %d: %s", 7, "positive")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("spine_node.worker").exception("job %d failed", 8)
    lines = capsys.readouterr().err.strip().splitlines()
    first = json.loads(lines[0])
    assert first["message"] == "job 7: positive" and first["level"] == "INFO"
    assert first["logger"] == "spine_node.worker"
    second = json.loads(lines[1])
    assert second["message"] == "job 8 failed" and "ValueError: boom" in second["exception"]
    assert len(lines) == 2  # the traceback stays inside one JSON line


def test_plain_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING", False)
    logging.getLogger("spine_node.receiver").info("hidden")
    logging.getLogger("spine_node.receiver").warning("job %d refused", 3)
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING spine_node.receiver: job 3 refused" in err

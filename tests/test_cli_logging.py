"""Logging: one line per event, JSON when asked, configured only by the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime

import pytest

from spine_node.logs import configure_logging, uid_hash


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


ISO_WITH_ZONE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
STUDY = "1.2.826.0.1.3680043.8.498.77"


def test_json_lines_carry_job_study_and_send_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", True)
    log = logging.getLogger("spine_node.dispatcher")
    log.info("send %d of job %d delivered", 5, 7,
             extra={"send_id": 5, "job_id": 7, "destination": "pacs", "study_instance_uid": STUDY})
    entry = json.loads(capsys.readouterr().err.strip())
    assert entry["job_id"] == 7 and entry["send_id"] == 5 and entry["destination"] == "pacs"
    # log_phi = false (the default): the study appears only as its hash
    expected = "sha256:" + hashlib.sha256(STUDY.encode()).hexdigest()[:16]
    assert entry["study_instance_uid"] == expected == uid_hash(STUDY)
    assert ISO_WITH_ZONE.match(entry["time"]), entry["time"]
    datetime.fromisoformat(entry["time"])  # parses, offset included


def test_log_phi_true_logs_the_uid(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", True, log_phi=True)
    logging.getLogger("spine_node.worker").info("job 1: positive",
                                                extra={"job_id": 1, "study_instance_uid": STUDY})
    assert json.loads(capsys.readouterr().err)["study_instance_uid"] == STUDY


def test_plain_lines_have_zoned_time_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", False)
    logging.getLogger("spine_node.worker").info("job 2: not_processed (CT image)",
                                                extra={"job_id": 2, "study_instance_uid": STUDY})
    line = capsys.readouterr().err.strip()
    stamp, rest = line.split(" ", 1)
    assert ISO_WITH_ZONE.match(stamp), stamp
    assert rest.startswith("INFO spine_node.worker: job 2: not_processed (CT image) [job_id=2 ")
    assert STUDY not in line and uid_hash(STUDY) in line


def test_library_info_noise_is_kept_at_warning(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", False)
    for name in ("highdicom.base", "highdicom.sr.sop", "pynetdicom.assoc"):
        logging.getLogger(name).info("copy attributes of module 'Patient'")
    logging.getLogger("highdicom.base").warning("a real problem")
    err = capsys.readouterr().err
    assert "copy attributes" not in err and "a real problem" in err

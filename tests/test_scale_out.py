"""Scale-out end to end: PostgreSQL queue, one receiver, two workers, one of them SIGKILLed.

300 small images from two concurrent DCMTK ``storescu`` senders; the receiver, the dispatcher
and two workers run as their own processes, each with its own data directory (temporary
files, logs), sharing the spool and the outbox as several machines would share a mount. One
worker is SIGKILLed midway and restarted. Every image is processed exactly once: one result
each, no duplicate object at the PACS.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from spine_node.results.types import ResultRecord
from spine_node.store import Instance, JobStore, Result
from tests.nodekit import CountingPACS, make_image, node_settings, storescu, wait_for, write_config

pytest_plugins = ("tests.fixtures_models",)

N_IMAGES = 300


def _serve(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spine_node.cli", "serve", "--config", str(config), "--role", role],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),  # the child owns it
    )


@pytest.mark.slow
def test_postgres_two_workers_one_killed_every_image_processed_once(
    tmp_path: Path, tiny_bundle: Path, pg_url: str
) -> None:
    store = JobStore.open(pg_url)
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE outbound, results, jobs, instances RESTART IDENTITY CASCADE"))
    pacs = CountingPACS().start()
    shared = tmp_path / "shared"  # the shared mount: spool and outbox
    for sub in ("spool", "outbox"):
        (shared / sub).mkdir(parents=True, mode=0o700)
    port = None
    configs: dict[str, Path] = {}
    for name in ("receiver", "dispatcher", "worker1", "worker2"):
        data = tmp_path / name / "data"  # node_settings puts data_dir here
        data.mkdir(parents=True, mode=0o700)
        for sub in ("spool", "outbox"):
            (data / sub).symlink_to(shared / sub)
        overrides = {
            "database_url": pg_url, "bundle": str(tiny_bundle), "device": "cpu",
            "decode_isolation": False, "lease_s": 5.0, "worker_batch_size": 4,
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": pacs.port}],
        }
        if port is not None:
            overrides["port"] = port
        settings = node_settings(tmp_path / name, **overrides)
        assert settings.data_dir == data
        port = settings.port
        configs[name] = write_config(tmp_path / f"{name}.toml", settings)
    logs = {name: tmp_path / f"{name}.log" for name in configs}
    files = [tmp_path / "images" / f"{i:03d}.dcm" for i in range(N_IMAGES)]
    files[0].parent.mkdir()
    for i, path in enumerate(files):
        make_image(path, rows=64, cols=64, seed=i, study_uid=f"1.2.826.0.1.3680043.10.9.{i // 3}")
    procs = {
        "receiver": _serve(configs["receiver"], "receiver", logs["receiver"]),
        "dispatcher": _serve(configs["dispatcher"], "dispatcher", logs["dispatcher"]),
        "worker1": _serve(configs["worker1"], "worker", logs["worker1"]),
        "worker2": _serve(configs["worker2"], "worker", logs["worker2"]),
    }
    assert port is not None
    try:
        wait_for(lambda: storescu(port, files[:1]).returncode == 0, timeout=120, interval=0.5)
        outcomes: list[int] = []

        def send(part: list[Path], aet: str) -> None:
            outcomes.append(storescu(port, part, aet=aet).returncode)

        senders = [
            threading.Thread(target=send, args=(part, f"MODALITY{n}"))
            for n, part in enumerate((files[1::2], files[2::2]), start=1)
        ]
        for sender in senders:
            sender.start()

        def n_results() -> int:
            return sum(store.status()["results"].values())

        wait_for(lambda: n_results() >= N_IMAGES // 4, timeout=600, interval=0.2)
        procs["worker1"].send_signal(signal.SIGKILL)  # midway, with a batch in hand
        procs["worker1"].wait()
        killed_at = n_results()
        procs["worker1"] = _serve(configs["worker1"], "worker", logs["worker1"])
        for sender in senders:
            sender.join(timeout=600)
        assert outcomes == [0, 0]

        def settled() -> bool:
            s = store.status()
            sends = s["outbound"].get("pacs", {})
            terminal = s["jobs"]["done"] + s["jobs"]["not_processed"] + s["jobs"]["dead"]
            return (terminal == N_IMAGES and sends.get("pending", 1) == 0
                    and sends.get("sending", 1) == 0 and s["summaries_owed"] == 0)

        wait_for(settled, timeout=900, interval=0.5)
        status = store.status()
        with store.engine.connect() as conn:
            per_image = conn.execute(
                select(Result.instance_id, func.count()).group_by(Result.instance_id)
            ).all()
            n_instances = conn.execute(select(func.count(Instance.id))).scalar_one()
        records = [ResultRecord.from_json(p) for st in store.studies() for _, p in st["results"]]
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=120)
        pacs.stop()
        store.close()
    assert killed_at < N_IMAGES  # the kill happened with work left
    assert n_instances == N_IMAGES
    assert len(per_image) == N_IMAGES and all(n == 1 for _, n in per_image)  # one result each
    assert status["jobs"]["dead"] == 0
    counts = Counter(pacs.received)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)  # no duplicate at PACS
    assert len(records) == N_IMAGES
    assert all(r.objects and r.objects[0] in counts for r in records)  # each image's SR arrived
    assert len(counts) == status["outbound"]["pacs"]["sent"]
    for name in ("worker1", "worker2"):
        assert "job " in logs[name].read_text()  # both workers took part
    for name, log in logs.items():
        assert "Traceback" not in log.read_text(), name

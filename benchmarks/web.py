"""Status page latency with a full database: p50 / p95 per page against the 200 ms goal.

Fills a fresh SQLite queue (the node's own tables, created by ``JobStore.open``) with N
studies: per study one or more CR images with their job, result (a real ``ResultRecord``
payload: positive with findings, negative, or not processed with a reason), three result
objects per image sent to a PACS, and now and then an ignored object (out of scope) or a
dead send. Then serves the web application (``create_app`` + ``start_web``, uvicorn on
loopback, as the ``web`` role does) and requests each page R times over HTTP, one at a time:
the status page, the newest studies, a middle and the oldest page reached by the "older"
links (keyset cursors, as a reader clicks through) and the oldest by its number (offset, as a
bookmark), and one study.

    .venv/bin/python benchmarks/web.py [--studies 10000] [--images 2] [--requests 50]
                                       [--workdir DIR]

Not a test: nothing fails when slow. Prints per page p50 / p95 / max wall-clock ms, p95 / 200 ms,
and the median CPU time per request (server and client share the process: on a loaded machine
the CPU time shows the cost, the wall clock the wait for a core), with ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402

from spine_node.config import settings_from_mapping  # noqa: E402
from spine_node.labels import LESION_LABELS  # noqa: E402
from spine_node.results.types import (  # noqa: E402
    CascadeResult,
    Finding,
    ResultRecord,
    Status,
)
from spine_node.store import (  # noqa: E402
    Instance,
    Job,
    JobStore,
    Outbound,
    Result,
    StudyState,
)

GOAL_MS = 200.0
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
REASONS = (
    "image content does not look like a spine radiograph (out-of-distribution score 14.6 > 6.6)",
    "patient younger than 18 years: outside the intended use",
    "pixel data could not be decoded: JPEG 2000 stream truncated",
)


def _result(rng: random.Random, sop: str, threshold: float) -> CascadeResult:
    roll = rng.random()
    if roll < 0.08:
        return CascadeResult(sop, Status.NOT_PROCESSED, reason=rng.choice(REASONS),
                             threshold=threshold)
    score = rng.random()
    if score < threshold:
        return CascadeResult(sop, Status.NEGATIVE, score=score, threshold=threshold,
                             member_scores={"densenet": score, "resnet": score})
    findings = tuple(
        Finding(rng.choice(LESION_LABELS), round(rng.uniform(0.3, 0.99), 3),
                (100.0 + i, 200.0, 300.0 + i, 420.0))
        for i in range(rng.randint(1, 3))
    )
    return CascadeResult(sop, Status.POSITIVE, score=score, threshold=threshold,
                         findings=findings, member_scores={"densenet": score})


def fill(store: JobStore, studies: int, images: int, seed: int = 0) -> dict[str, int]:
    """Bulk-insert ``studies`` studies of ``images`` images (rows as the node writes them)."""
    rng = random.Random(seed)
    now = time.time()
    inst_rows: list[dict[str, Any]] = []
    job_rows: list[dict[str, Any]] = []
    result_rows: list[dict[str, Any]] = []
    out_rows: list[dict[str, Any]] = []
    state_rows: list[dict[str, Any]] = []
    ident = 0
    for n in range(studies):
        study = f"1.2.826.0.1.3680043.10.1.{n}"
        received = now - (studies - n) * 60.0  # one study a minute, the newest last
        state_rows.append({"study_instance_uid": study, "revision": 1, "queued_revision": 1,
                           "document_uid": f"{study}.9900.1", "updated_at": received})
        for k in range(images + (1 if n % 25 == 0 else 0)):
            ident += 1
            sop = f"{study}.{k + 1}"
            ignored = k == images  # every 25th study also got a CT: out of scope
            inst_rows.append({
                "id": ident, "sop_instance_uid": sop, "sop_class_uid": CT if ignored else CR,
                "study_instance_uid": study, "series_instance_uid": f"{study}.1",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1", "calling_ae": "MODALITY1",
                "spool_path": f"{ident % 256:02x}/{ident:064x}.dcm", "size_bytes": 8_000_000,
                "received_at": received + k, "category": "out_of_scope" if ignored else "image",
                "category_reason": "modality CT is outside the intended use (CR, DX)"
                if ignored else None,
            })
            if ignored:
                continue
            result = _result(rng, sop, 0.502)
            objects = tuple(f"{sop}.99{j}" for j in range(1, 3 if result.findings else 2))
            record = ResultRecord(study, result, objects)
            job_rows.append({"id": ident, "instance_id": ident,
                             "state": "not_processed" if result.status is Status.NOT_PROCESSED
                             else "done", "attempts": 1, "created_at": received + k,
                             "updated_at": received + k + 5})
            result_rows.append({"id": ident, "job_id": ident, "instance_id": ident,
                                "study_instance_uid": study, "status": result.status.value,
                                "score": result.score, "reason": result.reason,
                                "payload": _json(record),
                                "created_at": received + k + 5})
            for uid in objects:
                dead = rng.random() < 0.001
                out_rows.append({"result_id": ident, "destination": "pacs", "kind": "dicom",
                                 "object_uid": uid, "path": f"{uid}.dcm",
                                 "state": "dead" if dead else "sent", "attempts": 1,
                                 "created_at": received + k + 5,
                                 "sent_at": None if dead else received + k + 6,
                                 "last_error": "association rejected" if dead else None})
    with store.engine.begin() as conn:
        for table, rows in ((Instance, inst_rows), (Job, job_rows), (Result, result_rows),
                            (Outbound, out_rows), (StudyState, state_rows)):
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start:start + 5000])
    return {"studies": studies, "instances": len(inst_rows), "results": len(result_rows),
            "sends": len(out_rows)}


def _json(record: ResultRecord) -> str:
    import json

    return json.dumps(record.to_json())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation (statistics.quantiles' method)."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--images", type=int, default=2, help="images per study")
    parser.add_argument("--requests", type=int, default=50, help="requests per page")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.studies < 1 or args.images < 1 or args.requests < 1:
        print("--studies, --images and --requests must be >= 1", file=sys.stderr)
        return 2
    import httpx

    from spine_node.web import create_app, start_web

    work = Path(tempfile.mkdtemp(prefix="web-bench-", dir=args.workdir))
    try:
        settings = settings_from_mapping(
            {"data_dir": str(work / "data"), "bundle": "demo", "web": {"port": _free_port()}},
            environ={})
        settings.data_dir.mkdir(mode=0o700)
        store = JobStore.open(settings.db_url)
        started = time.perf_counter()
        counts = fill(store, args.studies, args.images)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"database: {counts['studies']} studies, {counts['instances']} objects, "
              f"{counts['results']} results, {counts['sends']} sends (SQLite, filled in "
              f"{time.perf_counter() - started:.1f} s)")
        from spine_node.node import bundle_summary

        app = create_app(settings, store, bundle=bundle_summary(settings.bundle))
        server = start_web(settings, app)
        base = f"http://127.0.0.1:{server.port}"
        newest = store.recent_study_uids(1)[0]
        per_page = settings.web.recent_studies
        last_page = -(-args.studies // per_page)
        middle_page = (last_page + 1) // 2
        # the "older" links' keyset cursors: the last study of the page before
        everyone = store.study_page(args.studies)

        def older(page: int) -> str:
            cursor = everyone[(page - 1) * per_page - 1].to_text()
            return f"/studies?before={quote(cursor, safe='')}&page={page}"

        pages = {"/ (status)": "/", "/studies (newest 50)": "/studies"}
        # keyset pages exist only past the first page (page 1 has no "older" cursor)
        for page in sorted({middle_page, last_page}):
            if page >= 2:
                pages[f"older -> page {page} (keyset)"] = older(page)
        pages[f"/studies?page={last_page} (offset)"] = f"/studies?page={last_page}"
        pages["/studies/UID (one study)"] = f"/studies/{newest}"
        worst = 0.0
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                print(f"{'page':<32} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'p95/goal':>9} "
                      f"{'cpu ms':>8}")
                for name, path in pages.items():
                    warm = client.get(path)
                    assert warm.status_code == 200, path
                    if not path.startswith("/studies/"):
                        assert "data-study=" in warm.text, path  # not an empty page
                    times, cpu = [], []
                    for _ in range(args.requests):
                        c0, t0 = time.process_time(), time.perf_counter()
                        r = client.get(path)
                        times.append((time.perf_counter() - t0) * 1000.0)
                        cpu.append((time.process_time() - c0) * 1000.0)
                        assert r.status_code == 200, (path, r.status_code)
                    p50, p95 = percentile(times, 50), percentile(times, 95)
                    worst = max(worst, p95 / GOAL_MS)
                    print(f"{name:<32} {p50:>8.1f} {p95:>8.1f} {max(times):>8.1f} "
                          f"{p95 / GOAL_MS:>8.2f}x {statistics.median(cpu):>8.1f}")
        finally:
            server.stop()
            store.close()
        print(f"load average {os.getloadavg()[0]:.1f} after the requests "
              f"(1 / 5 / 15 min: {' / '.join(f'{x:.1f}' for x in os.getloadavg())})")
        verdict = "met" if worst <= 1.0 else "NOT met"
        print(f"goal: p95 <= {GOAL_MS:.0f} ms per page ({verdict}; worst p95/goal = "
              f"{worst:.2f}x, {args.requests} requests per page)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A study priority that stays true (issue 15 point 5).

The study's priority lives in one study summary SR, sent when the first image finishes and
amended (new SOP Instance UID, Predecessor Documents Sequence) when it changes; per-image
objects say nothing about the study; the webhook and the worklist read the same state.
Real SQLite store, real worker, real outbox files, dciodvfy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from spine_node.node import build_worker, open_store, prepare_data_dir
from spine_node.results import codes
from spine_node.results.overlay import banner_lines
from spine_node.results.types import CascadeResult, Status
from spine_node.results.uids import ResultKind, bundle_key, series_instance_uid, study_document_uid
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, InstanceRecord, SendSpec
from spine_node.study_report import images_key
from spine_node.worklist import build_worklist
from tests.nodekit import make_image, node_settings
from tests.orthanc_kit import DEMO_THRESHOLD, NEGATIVE, POSITIVE, ScriptedCascade
from tests.results_kit import dciodvfy_errors, sr_texts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STUDY = "1.2.826.0.1.3680043.8.498.0715.07.1"  # leading zeros: carried as received


def _codes(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(items) -> None:  # type: ignore[no-untyped-def]
        for item in items:
            if item.get("ValueType") == "CODE":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                found.append((name, item.ConceptCodeSequence[0].CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


class Study:
    """A node's worker and store over a temporary data directory."""

    def __init__(self, tmp_path: Path, script: dict) -> None:  # type: ignore[type-arg]
        self.settings = node_settings(
            tmp_path,
            destinations=[{"name": "pacs", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"}],
            webhook_url="http://127.0.0.1:9/hook",
        )
        prepare_data_dir(self.settings)
        self.store = open_store(self.settings)
        self.cascade = ScriptedCascade(script)
        self.worker = build_worker(self.settings, self.store, self.cascade)
        self.tmp = tmp_path

    def receive(self, name: str, seed: int) -> pydicom.Dataset:
        path = self.tmp / f"{name}.dcm"
        ds = make_image(path, study_uid=STUDY, seed=seed, rows=96, cols=64)
        rel = relative_name(str(ds.SOPInstanceUID))
        write_durable(self.settings.spool_dir, rel, path.read_bytes())
        self.store.record_instance(
            InstanceRecord(
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                STUDY,
                str(ds.SeriesInstanceUID),
                "1.2.840.10008.1.2.1",
                "MODALITY",
                rel,
                path.stat().st_size,
            )
        )
        return ds

    def outbox(self, uid: str) -> tuple[Path, pydicom.Dataset]:
        path = self.settings.outbox_dir / relative_name(uid)
        return path, pydicom.dcmread(path)

    def webhooks(self) -> list[dict]:  # type: ignore[type-arg]
        return [
            json.loads(
                (
                    self.settings.outbox_dir / relative_name(f"webhook:{STUDY}:{r}", ".json")
                ).read_text()
            )
            for r in range(1, 10)
            if (self.settings.outbox_dir / relative_name(f"webhook:{STUDY}:{r}", ".json")).exists()
        ]


def _only_carried_uid_errors(path: Path) -> None:
    """dciodvfy may only object to the leading zeros of the carried Study Instance UID."""
    for line in dciodvfy_errors(path):
        assert "Leading zeroes" in line and f"<{STUDY}>" in line, line


def test_study_summary_is_sent_then_amended_when_the_priority_changes(tmp_path: Path) -> None:
    node = Study(tmp_path, {})
    model = node.cascade.model_info
    bundle = bundle_key(model)
    try:
        first = node.receive("first", 1)
        node.cascade.script[str(first.SOPInstanceUID)] = NEGATIVE
        assert node.worker.run_once() == 1

        rev1 = study_document_uid(STUDY, bundle, 1)
        path1, sr1 = node.outbox(rev1)
        _only_carried_uid_errors(path1)
        assert sr1.StudyInstanceUID == STUDY
        assert sr1.SeriesInstanceUID == series_instance_uid(STUDY, ResultKind.STUDY_SR, bundle)
        assert "PredecessorDocumentsSequence" not in sr1
        assert ("Study AI triage priority", "Normal") in _codes(sr1)
        refs = sr1.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert [r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs] == [
            str(first.SOPInstanceUID)
        ]

        # the per-image SR of the first image says nothing about the study
        per_image = [
            pydicom.dcmread(p)
            for p in node.settings.outbox_dir.rglob("*")
            if p.is_file() and p.suffix != ".json"
        ]
        image_srs = [d for d in per_image if d.Modality == "SR" and d.SOPInstanceUID != rev1]
        assert len(image_srs) == 1
        assert not any("Study" in t for t in sr_texts(image_srs[0]))
        assert not any(name.startswith("Study") for name, _ in _codes(image_srs[0]))
        overlays = [d for d in per_image if d.Modality == "OT"]
        assert len(overlays) == 1  # drawn on the image the cascade handed on
        result = CascadeResult.from_json(node.store.study_results(STUDY)[0][1])
        assert not any("study" in line.lower() for line in banner_lines(result, model))

        # a second, positive image: the study becomes abnormal -> revision 2 amends revision 1
        second = node.receive("second", 2)
        node.cascade.script[str(second.SOPInstanceUID)] = POSITIVE
        assert node.worker.run_once() == 1
        rev2 = study_document_uid(STUDY, bundle, 2)
        path2, sr2 = node.outbox(rev2)
        assert rev2 != rev1
        _only_carried_uid_errors(path2)
        assert ("Study AI triage priority", "Abnormal") in _codes(sr2)
        predecessor = sr2.PredecessorDocumentsSequence[0]
        assert predecessor.StudyInstanceUID == STUDY
        assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == sr1.SeriesInstanceUID
        assert (
            predecessor.ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
            == rev1
        )
        referenced = {
            sop.ReferencedSOPInstanceUID
            for series in sr2.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence
        }
        assert referenced == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
        assert any("revision 2, written when 2 image(s)" in t for t in sr_texts(sr2))

        # the webhook and the worklist read the same state as the study SR
        hooks = node.webhooks()
        assert [h["revision"] for h in hooks] == [1, 2]
        assert [h["priority"]["level"] for h in hooks] == ["negative", "positive"]
        assert hooks[1]["study_summary_sop_instance_uid"] == rev2
        assert hooks[1]["study_instance_uid"] == STUDY
        (row,) = build_worklist(node.store.studies())
        assert (row["summary_revision"], row["summary_sop_instance_uid"]) == (2, rev2)
        assert (row["priority"], row["max_score"], row["n_images"]) == (
            hooks[1]["priority"]["level"],
            hooks[1]["priority"]["max_score"],
            hooks[1]["priority"]["n_images"],
        )

        # each revision is queued once per destination (DICOM) plus the webhook
        outbound = node.store.status()["outbound"]
        assert sum(outbound["pacs"].values()) == 2 * 2 + 2  # 2 images x (SR + SC) + 2 revisions
        assert sum(outbound["webhook"].values()) == 2

        # a third, negative image leaves the priority abnormal but amends the summary, so
        # that the current revision references every analysed image of the study
        third = node.receive("third", 3)
        node.cascade.script[str(third.SOPInstanceUID)] = NEGATIVE
        assert node.worker.run_once() == 1
        snapshot = node.store.advance_study(STUDY, images_key)
        assert (snapshot.revision, snapshot.changed) == (3, False)
        assert len(snapshot.images) == 3
        hooks = node.webhooks()
        assert [h["revision"] for h in hooks] == [1, 2, 3]
        assert hooks[2]["priority"]["level"] == "positive"
        rev3 = study_document_uid(STUDY, bundle, 3)
        sr3 = pydicom.dcmread(node.settings.outbox_dir / relative_name(rev3))
        assert sr3.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == rev2
        referenced = {
            sop.ReferencedSOPInstanceUID
            for series in sr3.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence
        }
        assert referenced == {str(first.SOPInstanceUID), str(second.SOPInstanceUID),
                              str(third.SOPInstanceUID)}
        # the same images again change nothing: no revision 4
        assert node.store.advance_study(STUDY, images_key).changed is False
        assert not (
            node.settings.outbox_dir / relative_name(study_document_uid(STUDY, bundle, 4))
        ).exists()
        assert build_worklist(node.store.studies())[0]["priority"] == "positive"
        # a stale revision is never queued
        assert not node.store.queue_study_document(STUDY, 1, rev1, "1.2.3", [])
        assert codes.STUDY_PRIORITY.meaning == "Study AI triage priority"
    finally:
        node.store.close()


def test_a_revision_whose_document_was_never_queued_is_built_again(tmp_path: Path) -> None:
    node = Study(tmp_path, {})
    try:
        node.receive("only", 3)
        node.worker.report_study = None  # the worker dies before the study summary
        assert node.worker.run_once() == 1
        snapshot = node.store.advance_study(STUDY, images_key)
        assert (snapshot.revision, snapshot.changed) == (1, True)
        again = node.store.advance_study(STUDY, images_key)
        assert (again.revision, again.changed) == (1, True)  # still owed, not a new revision
        bundle = bundle_key(node.cascade.model_info)
        uid = study_document_uid(STUDY, bundle, 1)
        assert node.store.queue_study_document(
            STUDY,
            1,
            uid,
            "1.2.3",
            [SendSpec("pacs", DestinationKind.DICOM, uid, relative_name(uid))],
        )
        assert node.store.advance_study(STUDY, images_key).changed is False
    finally:
        node.store.close()


def _study_documents(node: Study) -> list[int]:
    """Revisions of the study summary written to the outbox and queued to the PACS."""
    bundle = bundle_key(node.cascade.model_info)
    return [
        revision
        for revision in range(1, 10)
        if (node.settings.outbox_dir / relative_name(study_document_uid(STUDY, bundle, revision)))
        .exists()
    ]


def _later(node: Study, seconds: float) -> None:
    """Move the store's (and so the worker's) clock on: the owed report is due."""
    now = node.store.clock

    node.store.clock = lambda: now() + seconds  # type: ignore[method-assign]


@pytest.mark.parametrize("failure", ["report raises", "worker dies"])
def test_an_owed_study_summary_is_made_by_an_idle_worker(tmp_path: Path, failure: str) -> None:
    node = Study(tmp_path, {})
    report = node.worker.report_study
    assert report is not None
    calls: list[str] = []

    def failing(study: str, source: pydicom.Dataset) -> None:
        calls.append(study)
        raise RuntimeError("the outbox disk is full")

    try:
        only = node.receive("only", 3)
        node.cascade.script[str(only.SOPInstanceUID)] = NEGATIVE
        node.worker.report_study = failing if failure == "report raises" else None
        assert node.worker.run_once() == 1
        assert calls == ([STUDY] if failure == "report raises" else [])
        assert _study_documents(node) == []  # the image's result is recorded, its summary not
        assert [o.study_instance_uid for o in node.store.owed_studies(float("inf"), 10)] == [
            STUDY
        ]

        node.worker.report_study = report  # a worker that lives on (or another one)
        _later(node, 60.0)
        assert node.worker.run_once() == 0  # idle: the owed summary is made
        assert _study_documents(node) == [1]
        outbound = node.store.status()["outbound"]
        assert sum(outbound["pacs"].values()) == 2 + 1  # the image's SR + SC, one revision
        assert sum(outbound["webhook"].values()) == 1
        assert node.store.owed_studies(float("inf"), 10) == []

        assert node.worker.run_once() == 0  # nothing owed any more: nothing built again
        assert _study_documents(node) == [1]
        assert node.store.status()["outbound"] == outbound
    finally:
        node.store.close()


def test_a_failing_owed_summary_backs_off_durably_and_logs_each_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reporter cannot write its outbox (a file stands where the directory should be):
    each owed attempt fails, is logged with its number, and pushes the next one out
    (30 s, then 60 s: stored, so another store on the database sees it); once the outbox is
    back the next due attempt makes the summary and the failures are forgotten."""
    from spine_node.study_report import StudyReporter
    from spine_node.worker import REPORT_RETRY_BACKOFF

    node = Study(tmp_path, {})
    reporter = getattr(node.worker.report_study, "__self__", None)
    assert isinstance(reporter, StudyReporter)
    outbox = reporter.outbox_dir
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"not a directory")
    caplog.set_level("INFO", logger="spine_node.worker")

    def attempts() -> list[str]:
        return [r.getMessage().split(" (")[0].split(";")[0] for r in caplog.records
                if r.getMessage().startswith("owed study summary attempt")]

    def stored() -> tuple[int, float | None]:
        with node.store.engine.begin() as conn:
            row = conn.exec_driver_sql(
                "SELECT report_failures, report_retry_at FROM study_states").one()
        return int(row[0]), row[1]

    try:
        only = node.receive("only", 3)
        node.cascade.script[str(only.SOPInstanceUID)] = NEGATIVE
        reporter.outbox_dir = blocked
        assert node.worker.run_once() == 1  # the image's own report fails too: still owed
        assert [o.failures for o in node.store.owed_studies(float("inf"), 10)] == [0]

        _later(node, 60.0)
        assert node.worker.run_once() == 0
        assert attempts() == ["owed study summary attempt 1 failed"]
        failures, retry_at = stored()
        assert failures == 1 and retry_at is not None
        base = REPORT_RETRY_BACKOFF.base_s
        assert base * 0.9 <= retry_at - node.store.clock() <= base * 1.1
        for _ in range(3):  # idle polls before the retry time: no attempt
            assert node.worker.run_once() == 0
        assert len(attempts()) == 1

        _later(node, base * 1.2)
        assert node.worker.run_once() == 0
        assert attempts()[1] == "owed study summary attempt 2 failed"
        failures, retry_at = stored()
        assert failures == 2 and retry_at is not None
        assert 2 * base * 0.9 <= retry_at - node.store.clock() <= 2 * base * 1.1
        other = open_store(node.settings)  # the real clock: the retry is not due for it either
        try:
            assert other.owed_studies(float("inf"), 10) == []
        finally:
            other.close()

        reporter.outbox_dir = outbox
        _later(node, 2 * base * 1.2)
        assert node.worker.run_once() == 0
        assert attempts()[2:] == ["owed study summary attempt 3 made"]
        assert _study_documents(node) == [1]
        assert node.store.owed_studies(float("inf"), 10) == []
        assert stored() == (0, None)
    finally:
        node.store.close()


def test_nothing_is_reported_twice_when_no_report_is_owed(tmp_path: Path) -> None:
    node = Study(tmp_path, {})
    report = node.worker.report_study
    assert report is not None
    calls: list[str] = []

    def counting(study: str, source: pydicom.Dataset) -> object:
        calls.append(study)
        return report(study, source)

    node.worker.report_study = counting
    try:
        first = node.receive("first", 1)
        node.cascade.script[str(first.SOPInstanceUID)] = NEGATIVE
        assert node.worker.run_once() == 1
        assert calls == [STUDY] and _study_documents(node) == [1]
        assert node.store.owed_studies(float("inf"), 10) == []  # the report cleared its mark
        outbound = node.store.status()["outbound"]
        _later(node, 60.0)
        for _ in range(3):
            assert node.worker.run_once() == 0
        assert calls == [STUDY]  # the idle worker made no report
        assert _study_documents(node) == [1]
        assert node.store.status()["outbound"] == outbound
    finally:
        node.store.close()


def test_an_owed_summary_without_spooled_image_uses_the_outbox_or_is_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = Study(tmp_path, {})
    report = node.worker.report_study
    try:
        only = node.receive("only", 3)
        node.cascade.script[str(only.SOPInstanceUID)] = POSITIVE
        node.worker.report_study = None  # the worker dies before the study summary
        assert node.worker.run_once() == 1
        node.worker.report_study = report
        (owed,) = node.store.owed_studies(float("inf"), 10)
        (spooled,) = owed.spool_paths
        (node.settings.spool_dir / spooled).unlink()  # retention removed the image
        _later(node, 60.0)
        assert node.worker.run_once() == 0
        assert _study_documents(node) == [1]  # patient and study from the image's SR
        sr = pydicom.dcmread(
            node.settings.outbox_dir
            / relative_name(study_document_uid(STUDY, bundle_key(node.cascade.model_info), 1))
        )
        assert sr.PatientID == only.PatientID
        assert sr.StudyInstanceUID == STUDY
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in evidence] == [
            str(only.SOPInstanceUID)
        ]

        # a second image whose summary is owed, with neither its image nor any result
        # object left: given up once, with a warning, and never tried again
        second = node.receive("second", 4)
        node.cascade.script[str(second.SOPInstanceUID)] = NEGATIVE
        node.worker.report_study = None
        assert node.worker.run_once() == 1
        node.worker.report_study = report
        for path in [*node.settings.spool_dir.rglob("*"), *node.settings.outbox_dir.rglob("*")]:
            if path.is_file():
                path.unlink()
        _later(node, 60.0)
        with caplog.at_level("WARNING", logger="spine_node.worker"):
            assert node.worker.run_once() == 0
            assert node.worker.run_once() == 0
        given_up = [r for r in caplog.records if "owed study summary given up" in r.getMessage()]
        assert len(given_up) == 1
        assert node.store.owed_studies(float("inf"), 10) == []
        assert _study_documents(node) == []  # nothing built from nothing (all files removed)
    finally:
        node.store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def bare_store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from spine_node.store import JobStore

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    store = JobStore.open(url)
    if request.param == "postgres":
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "TRUNCATE study_states, outbound, results, jobs, instances "
                    "RESTART IDENTITY CASCADE"
                )
            )
    yield store
    store.close()


def _finish(store, uid: str, status: str, score: float | None) -> None:  # type: ignore[no-untyped-def]
    from spine_node.store import JobOutcome

    store.record_instance(
        InstanceRecord(
            uid,
            "1.2.840.10008.5.1.4.1.1.1",
            STUDY,
            "1.2.3.4",
            "1.2.840.10008.1.2.1",
            "MOD",
            f"xx/{uid}.dcm",
            100,
        )
    )
    (job,) = store.claim_jobs("w", 60.0, 1, 3)
    payload = CascadeResult(
        uid,
        Status(status),
        score=score,
        reason=None if score is not None else "scripted",
        threshold=DEMO_THRESHOLD,
    ).to_json()
    payload.update({"study_instance_uid": STUDY, "objects": []})
    store.complete_job(job.job_id, "w", JobOutcome(status, score, payload["reason"], payload), [])


def test_study_state_on_sqlite_and_postgres(bare_store) -> None:  # type: ignore[no-untyped-def]
    import threading

    _finish(bare_store, "9.1", "negative", 0.1)
    first = bare_store.advance_study(STUDY, images_key)
    assert (first.revision, first.changed, len(first.images)) == (1, True, 1)
    assert first.images[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"
    assert bare_store.queue_study_document(STUDY, 1, "2.25.1", "2.25.9", [])
    _finish(bare_store, "9.2", "positive", 0.9)
    # two workers finishing at once: exactly one opens revision 2, both see both images
    snapshots = []
    threads = [
        threading.Thread(
            target=lambda: snapshots.append(bare_store.advance_study(STUDY, images_key))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one revision was opened (2, not 3); the later caller finds it owed (not yet queued)
    assert all(s.changed for s in snapshots)
    assert {s.revision for s in snapshots} == {2}
    assert all(len(s.images) == 2 for s in snapshots)
    (opened,) = {s.previous_document_uid for s in snapshots}
    assert opened == "2.25.1"
    assert bare_store.queue_study_document(STUDY, 2, "2.25.2", "2.25.9", [])
    assert not bare_store.advance_study(STUDY, images_key).changed


def test_the_state_key_fits_the_store_for_a_large_study() -> None:
    # PostgreSQL enforces the column's 128 characters (SQLite does not)
    from spine_node.store import StudyImage

    payload = CascadeResult(sop_instance_uid="1.2", status=Status.NEGATIVE, score=0.1,
                            threshold=0.5).to_json()
    images = [StudyImage(f"1.2.826.0.1.3680043.10.9.{i}", "1.2.840.10008.5.1.4.1.1.1",
                         "1.2.3", payload) for i in range(200)]
    key = images_key(images)
    assert len(key) <= 128
    assert key != images_key(images[:-1])  # one image more is another state


def test_the_owed_report_is_cleared_only_by_the_report_that_read_every_result(
    bare_store,  # type: ignore[no-untyped-def]
) -> None:
    def owed() -> list[str]:
        return [o.study_instance_uid for o in bare_store.owed_studies(float("inf"), 10)]

    _finish(bare_store, "9.1", "negative", 0.1)
    assert owed() == [STUDY]  # marked in the transaction that recorded the result
    assert bare_store.owed_studies(0.0, 10) == []  # only reports owed for a while are due
    first = bare_store.advance_study(STUDY, images_key)
    _finish(bare_store, "9.2", "positive", 0.9)  # recorded while revision 1 is being built
    assert bare_store.queue_study_document(STUDY, 1, "2.25.1", "2.25.9", [],
                                           first.report_due_seq)
    assert owed() == [STUDY]  # the result recorded meanwhile is not in revision 1
    # another worker built revision 1 too: refused, it is queued once
    assert not bare_store.queue_study_document(STUDY, 1, "2.25.3", "2.25.9", [],
                                               first.report_due_seq)
    second = bare_store.advance_study(STUDY, images_key)
    assert (second.revision, second.changed, len(second.images)) == (2, True, 2)
    assert bare_store.queue_study_document(STUDY, 2, "2.25.2", "2.25.9", [],
                                           second.report_due_seq)
    assert owed() == []
    assert not bare_store.advance_study(STUDY, images_key).changed
    assert owed() == []


def test_a_batch_makes_one_summary_per_study_after_all_its_images(tmp_path: Path) -> None:
    """Two images of the study claimed in one batch: both results are recorded (and their
    objects queued) first, then one summary revision lists both; no revision per image."""
    node = Study(tmp_path, {})
    bundle = bundle_key(node.cascade.model_info)
    try:
        first, second = node.receive("first", 1), node.receive("second", 2)
        node.cascade.script[str(first.SOPInstanceUID)] = NEGATIVE
        node.cascade.script[str(second.SOPInstanceUID)] = POSITIVE
        assert node.worker.run_once() == 2
        _, sr1 = node.outbox(study_document_uid(STUDY, bundle, 1))
        refs = sr1.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        listed = {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs}
        assert listed == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
        assert not (node.settings.outbox_dir
                    / relative_name(study_document_uid(STUDY, bundle, 2))).exists()
        assert [w["revision"] for w in node.webhooks()] == [1]
    finally:
        node.store.close()

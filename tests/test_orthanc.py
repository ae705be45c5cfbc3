"""Results a PACS understands: the node delivers SR, Secondary Capture and GSPS to a real Orthanc.

The source images are stored in Orthanc directly (the "source study") and sent to the node
with DCMTK ``storescu``; the node's results must land in that study, in new series with the
configured numbers and descriptions, exactly once: a repeated image, a replayed job and a
complete re-run (fresh node database) add no instance at Orthanc, because result UIDs are
deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from spine_node.config import Settings
from spine_node.node import start_node
from spine_node.store import JobStore
from tests.nodekit import make_image, node_settings, storescu, wait_for
from tests.orthanc_kit import NEGATIVE, POSITIVE, Orthanc, ScriptedCascade

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` is the inner loop

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
STUDY = "1.2.826.0.1.3680043.8.498.7001"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import make_tiny_bundle

    path = tmp_path_factory.mktemp("bundle") / "tiny"
    make_tiny_bundle(path, seed=0, onnx=False)
    return path


def _settings(tmp_path: Path, orthanc: Orthanc, data: str = "data", **kw: Any) -> Settings:
    return node_settings(
        tmp_path,
        data_dir=str(tmp_path / data),
        device="cpu",
        destinations=[
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        **kw,
    )


def _sources(tmp_path: Path, n: int, study: str = STUDY) -> list[Path]:
    files = []
    for i in range(n):
        path = tmp_path / f"src{i}.dcm"
        make_image(path, rows=320, cols=256, seed=i, study_uid=study)
        files.append(path)
    return files


def _settled(store: JobStore, n_jobs: int) -> dict[str, Any] | None:
    """The status once ``n_jobs`` jobs are terminal and every send to Orthanc is delivered."""
    status = store.status()
    jobs = status["jobs"]
    sends = status["outbound"].get("orthanc", {})
    terminal = jobs["done"] + jobs["not_processed"] + jobs["dead"]
    if terminal != n_jobs or not sends:
        return None
    if sends["pending"] or sends["sending"] or status["summaries_owed"]:
        return None
    return status


def _result_series(orthanc: Orthanc, study_uid: str) -> dict[int, dict[str, Any]]:
    """Result series of the study keyed by Series Number, with their instances' simplified tags."""
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None, f"study {study_uid} is not in Orthanc"
    out: dict[int, dict[str, Any]] = {}
    for series in orthanc.series_of(study_id):
        tags = series["MainDicomTags"]
        if not tags.get("SeriesNumber"):
            continue  # a source series (make_image writes no Series Number)
        number = int(tags["SeriesNumber"])
        assert number not in out, f"two series share Series Number {number}"
        out[number] = {
            "description": tags.get("SeriesDescription", ""),
            "modality": tags.get("Modality", ""),
            "uid": tags["SeriesInstanceUID"],
            "instances": [orthanc.tags(i) for i in series["Instances"]],
        }
    return out


def _referenced_sops(tags: dict[str, Any], sequence: str) -> set[str]:
    """SOP Instance UIDs referenced through ``sequence`` (evidence or referenced series)."""
    found = set()
    for item in tags.get(sequence, []):
        for series in item.get("ReferencedSeriesSequence", [item]):
            for ref in series.get("ReferencedSOPSequence", []) + series.get(
                "ReferencedImageSequence", []
            ):
                found.add(ref["ReferencedSOPInstanceUID"])
    return found


def _check_result_series(
    series: dict[int, dict[str, Any]],
    numbers: tuple[int, int, int],
    descriptions: tuple[str, ...],
    source_uids: list[str],
    gsps_sources: set[str],
) -> None:
    sr_n, sc_n, gsps_n = numbers
    assert series[sr_n]["description"].startswith(descriptions[0])
    assert series[sr_n]["modality"] == "SR"
    srs = series[sr_n]["instances"]
    assert len(srs) == len(source_uids)
    assert {t["SOPClassUID"] for t in srs} == {SR_CLASS}
    evidence = set()
    for tags in srs:
        assert tags["StudyInstanceUID"] == STUDY
        evidence |= _referenced_sops(tags, "CurrentRequestedProcedureEvidenceSequence")
    assert evidence == set(source_uids)  # one SR per source image, each citing its image

    assert series[sc_n]["description"].startswith(descriptions[1])
    scs = series[sc_n]["instances"]
    assert len(scs) == len(source_uids)
    assert {t["SOPClassUID"] for t in scs} == {SC_CLASS}
    assert all(t["StudyInstanceUID"] == STUDY for t in scs)
    assert all(int(t["Rows"]) > 0 and int(t["Columns"]) > 0 for t in scs)

    if not gsps_sources:
        assert gsps_n not in series  # no findings: no presentation state
        return
    assert series[gsps_n]["description"].startswith(descriptions[2])
    assert series[gsps_n]["modality"] == "PR"
    prs = series[gsps_n]["instances"]
    assert len(prs) == len(gsps_sources)
    assert {t["SOPClassUID"] for t in prs} == {GSPS_CLASS}
    referenced = set()
    for tags in prs:
        assert tags["StudyInstanceUID"] == STUDY
        referenced |= _referenced_sops(tags, "ReferencedSeriesSequence")
        assert tags["GraphicAnnotationSequence"], "a GSPS without annotations"
    assert referenced == gsps_sources


def test_tiny_bundle_results_land_in_the_source_study_once(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc
) -> None:
    import torch

    torch.set_num_threads(1)
    settings = _settings(
        tmp_path,
        orthanc,
        bundle=str(tiny_bundle),
        results={
            "gsps": True,
            "sr_series_description": "Spine AI report",
            "sc_series_description": "Spine AI overlay",
            "gsps_series_description": "Spine AI marks",
        },
    )
    files = _sources(tmp_path, 2)
    for f in files:
        assert orthanc.upload(f)["Status"] == "Success"
    source_uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    assert orthanc.instance_count() == 2
    node = start_node(settings)
    try:
        assert storescu(settings.port, files).returncode == 0
        status = wait_for(lambda: _settled(node.store, 2), timeout=90)
        assert status["outbound"]["orthanc"]["dead"] == 0
        with_findings = {
            uid for uid, payload in node.store.study_results(STUDY) if payload["findings"]
        }
        series = _result_series(orthanc, STUDY)
        assert len(orthanc.studies()) == 1 and len(orthanc.get("/patients")) == 1
        _check_result_series(
            series,
            (9901, 9902, 9903),
            ("Spine AI report", "Spine AI overlay", "Spine AI marks"),
            source_uids,
            with_findings,
        )
        count = orthanc.instance_count()
        assert count == 2 + status["outbound"]["orthanc"]["sent"]
        # the same images again: nothing new at the node, nothing new at Orthanc
        assert storescu(settings.port, files).returncode == 0
        assert node.store.status()["instances"] == 2
        wait_for(lambda: _settled(node.store, 2), timeout=30)
        assert orthanc.instance_count() == count
    finally:
        node.stop()


def _outbox_uids(node_settings_: Settings) -> set[str]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in node_settings_.outbox_dir.rglob("*")
        if p.is_file() and p.suffix != ".json"
    }


def test_positive_gsps_replay_and_rerun_add_nothing(tmp_path: Path, orthanc: Orthanc) -> None:
    files = _sources(tmp_path, 3)
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    # image 0 positive with two findings, image 1 negative; image 2 fails once, then negative
    cascade = ScriptedCascade({uids[0]: POSITIVE, uids[1]: NEGATIVE}, fail_once=[uids[2]])
    numbers = (7701, 7702, 7703)
    # one image per batch: a batch gives one summary revision per study, and the revisions
    # counted here (one per image) must not depend on how images arrive into batches
    settings = _settings(
        tmp_path,
        orthanc,
        worker_batch_size=1,
        results={
            "gsps": True,
            "sr_series_number": 7701,
            "sc_series_number": 7702,
            "gsps_series_number": 7703,
        },
    )
    for f in files:
        orthanc.upload(f)
    first = start_node(settings, cascade=cascade)
    try:
        assert storescu(settings.port, files[:2]).returncode == 0
        wait_for(lambda: _settled(first.store, 2), timeout=40)
        series = _result_series(orthanc, STUDY)
        descriptions = (
            "AI spine triage report",
            "AI spine triage overlay",
            "AI spine triage annotations",
        )
        _check_result_series(series, numbers, descriptions, uids[:2], {uids[0]})
        (gsps,) = series[7703]["instances"]
        annotations = gsps["GraphicAnnotationSequence"]
        boxes = [g for a in annotations for g in a.get("GraphicObjectSequence", [])]
        assert len(boxes) == len(POSITIVE.findings)
        assert all(g["GraphicType"] == "POLYLINE" for g in boxes)
        texts = [
            t["UnformattedTextValue"] for a in annotations for t in a.get("TextObjectSequence", [])
        ]
        assert any("Osteophytes" in t for t in texts)
        assert any("Spondylolisthesis" in t and "grade I" in t for t in texts)
        assert any("ABNORMAL" in t for t in texts)

        # image 2: the cascade fails once; the job waits for its retry; replay runs it now
        assert storescu(settings.port, files[2:]).returncode == 0
        wait_for(lambda: first.store.job_state(uids[2]) == "failed", timeout=30)
        assert first.store.replay("jobs") == 1
        wait_for(lambda: _settled(first.store, 3), timeout=30)
        assert [c for c in cascade.calls if uids[2] in c] == [[uids[2]], [uids[2]]]
        series = _result_series(orthanc, STUDY)
        _check_result_series(series, numbers, descriptions, uids, {uids[0]})
        count = orthanc.instance_count()
        # sources, SR and SC per image, one GSPS, one study summary revision per analysed
        # image (each amends the one before and references every image analysed so far)
        assert count == 3 + 2 * 3 + 1 + 3
        summaries = series[9900]["instances"]
        assert len(summaries) == 3
        assert all(summary["StudyInstanceUID"] == STUDY for summary in summaries)
        referenced = sorted(
            (_referenced_sops(summary, "CurrentRequestedProcedureEvidenceSequence")
             for summary in summaries),
            key=len,
        )
        assert referenced == [{uids[0]}, {uids[0], uids[1]}, set(uids)]
        # nothing is dead or failed now: replaying jobs requeues nothing and sends nothing
        assert first.store.replay("jobs") == 0
        assert first.store.replay("sends") == 0
        wait_for(lambda: _settled(first.store, 3), timeout=10)
        assert orthanc.instance_count() == count
    finally:
        first.stop()
    first_uids = _outbox_uids(settings)
    assert len(first_uids) == count - 3

    # a complete re-run in a fresh node (new database, new outbox): the same UIDs,
    # so Orthanc stores nothing new
    rerun = _settings(
        tmp_path,
        orthanc,
        data="data-rerun",
        worker_batch_size=1,
        results={
            "gsps": True,
            "sr_series_number": 7701,
            "sc_series_number": 7702,
            "gsps_series_number": 7703,
        },
    )
    second = start_node(rerun, cascade=ScriptedCascade({uids[0]: POSITIVE}))
    try:
        assert storescu(rerun.port, files).returncode == 0
        status = wait_for(lambda: _settled(second.store, 3), timeout=40)
        assert status["outbound"]["orthanc"]["sent"] == len(first_uids)
        assert status["outbound"]["orthanc"]["dead"] == 0
        assert _outbox_uids(rerun) == first_uids
        assert orthanc.instance_count() == count
        _check_result_series(_result_series(orthanc, STUDY), numbers, descriptions, uids, {uids[0]})
    finally:
        second.stop()

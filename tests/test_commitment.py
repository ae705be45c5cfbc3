"""Storage Commitment with a real Orthanc: results count delivered only when Orthanc commits.

Orthanc (the Debian package) is the Storage Commitment SCP: it answers the node's N-ACTION and
sends its N-EVENT-REPORT on a new association to the node's receiver (the node is declared in
Orthanc's ``DicomModalities``). A Lua ``ReceivedInstanceFilter`` makes Orthanc answer C-STORE
Success for objects it then does not keep: the first copy of every SR of one study, and every
SR of another study. That is the case Storage Commitment exists for: the node must see the
failure in the report, send the object again and ask again, or end it dead with the reason.

A pynetdicom Storage Commitment SCP (:class:`CommitmentPeer`) covers what Orthanc does not do:
the report on the same association as the request, and no report at all.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from spine_node.cli import STATUS_DEAD, status_report
from spine_node.config import Settings
from spine_node.node import start_node
from spine_node.store import Commitments, JobStore
from spine_node.worklist import build_worklist
from tests.nodekit import free_port, make_image, node_settings, storescu, wait_for
from tests.orthanc_kit import Orthanc, ScriptedCascade
from tests.test_webhook import HookServer

pytestmark = pytest.mark.slow

STUDY_RESEND = "1.2.826.0.1.3680043.8.498.8101"  # first copy of each SR dropped
STUDY_DEAD = "1.2.826.0.1.3680043.8.498.8102"  # every SR dropped
SR_MODALITY = "SR"

FILTER = f"""
-- Orthanc answers C-STORE Success for what this filter drops, and does not keep it
seen = {{}}
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom["Modality"] ~= "{SR_MODALITY}" then return true end
  local study = dicom["StudyInstanceUID"]
  local uid = dicom["SOPInstanceUID"]
  if study == "{STUDY_DEAD}" then return false end
  if study == "{STUDY_RESEND}" and seen[uid] == nil then
    seen[uid] = true
    return false
  end
  return true
end
"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), lua=FILTER).start()
    yield server
    server.stop()


def _declare_node(orthanc: Orthanc, port: int) -> None:
    """Tell Orthanc where the node accepts Storage Commitment reports."""
    orthanc.put("/modalities/spine", {"AET": "SPINENODE", "Host": "127.0.0.1", "Port": port})


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer(fail_first=0).start()
    yield server
    server.stop()


def _settings(
    tmp_path: Path, orthanc: Orthanc, hooks: HookServer, **destination: Any
) -> Settings:
    return node_settings(
        tmp_path,
        destinations=[
            {"kind": "webhook", "name": "worklist", "url": f"http://127.0.0.1:{hooks.port}/w"},
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "storage_commitment": True,
                "commitment_report_wait_s": 0.5,
                **destination,
            }
        ],
    )


def _sources(tmp_path: Path, study: str, n: int) -> list[Path]:
    files = []
    for i in range(n):
        path = tmp_path / f"{study[-4:]}-{i}.dcm"
        make_image(path, rows=96, cols=80, seed=i, study_uid=study)
        files.append(path)
    return files


def _outbound(store: JobStore) -> dict[str, int]:
    return dict(store.status()["outbound"].get("orthanc", {}))


def _settled(store: JobStore, n_jobs: int) -> dict[str, int] | None:
    """Send counts once the jobs are done and nothing is on its way any more."""
    status = store.status()
    jobs = status["jobs"]
    sends = _outbound(store)
    if jobs["done"] != n_jobs or not sends or status["summaries_owed"]:
        return None
    if sends["pending"] or sends["sending"] or sends["committing"]:
        return None
    return sends


def _result_uids(settings: Settings) -> dict[str, str]:
    """SOP Instance UID -> Modality of every DICOM result object in the node's outbox."""
    out = {}
    for path in settings.outbox_dir.rglob("*"):
        if path.is_file() and path.suffix != ".json":
            ds = dcmread(path, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = str(ds.Modality)
    return out


def _orthanc_uids(orthanc: Orthanc) -> set[str]:
    return {
        str(orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"])
        for i in orthanc.get("/instances")
    }


def _stores_sent(settings: Settings) -> Counter[str]:
    """How often each object was stored at Orthanc with success (the audit trail)."""
    counts: Counter[str] = Counter()
    for line in settings.audit_path.read_text().splitlines():
        record = json.loads(line)
        if record["direction"] == "sent" and record["outcome"] == "sent":
            counts[record["sop_instance_uid"]] += 1
    return counts


def _last_hook_commitment(hooks: HookServer) -> str | None:
    received = hooks.received()
    return received[-1].json()["delivery"]["commitment"] if received else None


def _audited(settings: Settings, outcome: str) -> Counter[str]:
    """How often the audit trail records ``outcome`` for each object."""
    return Counter(
        record["sop_instance_uid"]
        for record in map(json.loads, settings.audit_path.read_text().splitlines())
        if record["outcome"] == outcome
    )


def test_results_committed_across_a_restart_and_after_a_resend(
    tmp_path: Path, orthanc: Orthanc, hooks: HookServer
) -> None:
    # first Orthanc cannot reach the node: its reports are lost, the requests stay open
    settings = _settings(
        tmp_path, orthanc, hooks, commitment_timeout_s=2.0, commitment_retries=2
    )
    _declare_node(orthanc, free_port())
    files = _sources(tmp_path, STUDY_RESEND, 2)
    node = start_node(settings, cascade=ScriptedCascade({}))
    try:
        assert storescu(settings.port, files).returncode == 0
        wait_for(lambda: node.store.status()["jobs"]["done"] == 2, timeout=60)

        def requested() -> bool:
            sends = _outbound(node.store)
            open_ = Commitments(node.store).open_transactions()
            return (
                not sends["pending"] and not sends["sending"]
                and sends["committing"] > 0
                and sum(open_.values()) == sends["committing"]
            )

        wait_for(requested, timeout=60)
        assert _outbound(node.store)["sent"] == 0  # stored is not delivered
        assert Commitments(node.store).study_states(["orthanc"]) == {STUDY_RESEND: "pending"}
    finally:
        node.stop()

    # the open requests are in the database: a restarted node asks again when overdue
    store = JobStore.open(settings.db_url)
    try:
        waiting = Commitments(store).open_transactions()
        assert waiting and _outbound(store)["committing"] == sum(waiting.values())
        rows = build_worklist(store.studies(["orthanc"]))
        assert [r["delivery"] for r in rows] == [{"ris": None, "commitment": "pending"}]
    finally:
        store.close()
    status = status_report(settings)["delivery"]["commitment"]
    assert status == {
        "studies": {"done": 0, "pending": 1, "dead": 0},
        "not_done": [{"study_instance_uid": STUDY_RESEND, "state": "pending"}],
    }

    _declare_node(orthanc, settings.port)
    node = start_node(settings, cascade=ScriptedCascade({}))
    try:
        sends = wait_for(lambda: _settled(node.store, 2), timeout=90)
        results = _result_uids(settings)
        assert sends["dead"] == 0 and sends["sent"] == len(results)
        # Orthanc keeps every result object now: the dropped SRs were sent again
        assert set(results) <= _orthanc_uids(orthanc)
        stored = _stores_sent(settings)
        srs = {uid for uid, modality in results.items() if modality == SR_MODALITY}
        assert srs and all(stored[uid] == 2 for uid in srs)
        assert all(stored[uid] == 1 for uid in set(results) - srs)
        # the audit trail: Orthanc's word on each object (every SR failed before it committed)
        assert set(_audited(settings, "committed")) == set(results)
        assert set(_audited(settings, "commitment_failed")) == srs
        assert Commitments(node.store).study_states(["orthanc"]) == {STUDY_RESEND: "done"}
        assert Commitments(node.store).open_transactions() == {}
        (row,) = build_worklist(node.store.studies(["orthanc"]))
        assert row["delivery"] == {"ris": None, "commitment": "done"}
        # the webhook tells the outcome too (posted again once the commitment is done)
        wait_for(lambda: _last_hook_commitment(hooks) == "done", timeout=30)
        assert {h.json()["delivery"]["commitment"] for h in hooks.received()} <= {
            "pending", "done"}
    finally:
        node.stop()
    assert status_report(settings)["delivery"]["commitment"] == {
        "studies": {"done": 1, "pending": 0, "dead": 0}, "not_done": [],
    }


def test_object_the_pacs_never_keeps_ends_dead_with_the_reason(
    tmp_path: Path, orthanc: Orthanc, hooks: HookServer
) -> None:
    settings = _settings(
        tmp_path, orthanc, hooks, commitment_timeout_s=30.0, commitment_retries=1
    )
    _declare_node(orthanc, settings.port)
    files = _sources(tmp_path, STUDY_DEAD, 1)
    node = start_node(settings, cascade=ScriptedCascade({}))
    try:
        assert storescu(settings.port, files).returncode == 0
        sends = wait_for(lambda: _settled(node.store, 1), timeout=90)
        results = _result_uids(settings)
        srs = {uid for uid, modality in results.items() if modality == SR_MODALITY}
        others = set(results) - srs
        assert sends["dead"] == len(srs) and sends["sent"] == len(others)
        dead = node.store.dead_letters()["sends"]
        assert len(dead) == len(srs)
        for item in dead:
            assert "storage commitment failed after 2 request(s)" in item["error"]
            assert "no such object instance (0x0112)" in item["error"]
        assert others <= _orthanc_uids(orthanc) and not srs & _orthanc_uids(orthanc)
        stored = _stores_sent(settings)
        assert all(stored[uid] == 2 for uid in srs)  # sent once more after the failure
        assert Commitments(node.store).study_states(["orthanc"]) == {STUDY_DEAD: "dead"}
        wait_for(lambda: _last_hook_commitment(hooks) == "dead", timeout=30)
        assert {h.json()["delivery"]["commitment"] for h in hooks.received()} <= {
            "pending", "dead"}
    finally:
        node.stop()
    status = status_report(settings)
    assert status["exit_code"] & STATUS_DEAD
    assert status["delivery"]["commitment"]["not_done"] == [
        {"study_instance_uid": STUDY_DEAD, "state": "dead"}
    ]


# -- a peer that reports on the same association, or never ------------------------------------


class CommitmentPeer:
    """A pynetdicom Storage and Storage Commitment SCP on loopback (a stand-in PACS).

    It keeps every object stored by C-STORE. With ``report=True`` it answers each N-ACTION
    and then, on the same association, sends the N-EVENT-REPORT: the referenced objects it
    holds committed, the others failed (0x0112). With ``report=False`` it never reports.
    """

    def __init__(self, report: bool) -> None:
        self.report = report
        self.stored: set[str] = set()
        self.requests: list[tuple[str, list[str]]] = []
        self.port = free_port()
        self.ae = AE("PEERPACS")
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.server: Any = None

    def start(self) -> CommitmentPeer:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_N_ACTION, self._action),
                (evt.EVT_DIMSE_SENT, self._sent),
            ],
        )
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def _store(self, event: evt.Event) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        uids = [str(item.ReferencedSOPInstanceUID) for item in info.ReferencedSOPSequence]
        self.requests.append((str(info.TransactionUID), uids))
        return 0x0000, None

    def _sent(self, event: evt.Event) -> None:
        """After the N-ACTION response went out: the report, on the same association."""
        if not self.report or type(event.message).__name__ != "N_ACTION_RSP":
            return
        transaction_uid, uids = self.requests[-1]
        report = Dataset()
        report.TransactionUID = transaction_uid
        held, failed = [], []
        for uid in uids:
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
            item.ReferencedSOPInstanceUID = uid
            if uid in self.stored:
                held.append(item)
            else:
                item.FailureReason = 0x0112
                failed.append(item)
        report.ReferencedSOPSequence = held
        if failed:
            report.FailedSOPSequence = failed
        event.assoc.send_n_event_report(
            report, 2 if failed else 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )


def _peer_settings(tmp_path: Path, peer: CommitmentPeer, **destination: Any) -> Settings:
    return node_settings(
        tmp_path,
        destinations=[
            {
                "name": "orthanc",  # the name _outbound and _settled read
                "ae_title": "PEERPACS",
                "host": "127.0.0.1",
                "port": peer.port,
                "storage_commitment": True,
                **destination,
            }
        ],
    )


def test_report_on_the_same_association_commits(tmp_path: Path) -> None:
    peer = CommitmentPeer(report=True).start()
    # the association stays open until the report came; the peer never opens one to the node
    settings = _peer_settings(tmp_path, peer, commitment_report_wait_s=60.0)
    node = start_node(settings, cascade=ScriptedCascade({}))
    try:
        files = _sources(tmp_path, "1.2.826.0.1.3680043.8.498.8103", 1)
        assert storescu(settings.port, files).returncode == 0
        sends = wait_for(lambda: _settled(node.store, 1), timeout=60)
        results = _result_uids(settings)
        assert sends["sent"] == len(results) and sends["dead"] == 0
        assert peer.stored == set(results)
        assert {uid for _, uids in peer.requests for uid in uids} == set(results)
    finally:
        node.stop()
        peer.stop()


def test_no_report_ends_dead_after_the_retries(tmp_path: Path) -> None:
    peer = CommitmentPeer(report=False).start()
    settings = _peer_settings(
        tmp_path, peer, commitment_timeout_s=0.5, commitment_retries=1,
        commitment_report_wait_s=0,
    )
    node = start_node(settings, cascade=ScriptedCascade({}))
    try:
        files = _sources(tmp_path, "1.2.826.0.1.3680043.8.498.8104", 1)
        assert storescu(settings.port, files).returncode == 0
        sends = wait_for(lambda: _settled(node.store, 1), timeout=60)
        results = _result_uids(settings)
        assert sends["dead"] == len(results) and sends["sent"] == 0
        assert peer.stored == set(results)  # stored, but never confirmed
        for item in node.store.dead_letters()["sends"]:
            assert item["error"].startswith(
                "no storage commitment report within 0.5 s after 2 request(s)")
        # each object was asked for twice, each time in a new transaction
        transactions = [t for t, _ in peer.requests]
        assert len(set(transactions)) == len(transactions)
        asked = Counter(uid for _, uids in peer.requests for uid in uids)
        assert asked == {uid: 2 for uid in results}
        # replay: stored and asked again from the start (its requests counted afresh)
        assert node.store.replay("sends") == len(results)
        sends = wait_for(lambda: _settled(node.store, 1), timeout=60)
        assert sends["dead"] == len(results)
        asked = Counter(uid for _, uids in peer.requests for uid in uids)
        assert asked == {uid: 4 for uid in results}
    finally:
        node.stop()
        peer.stop()

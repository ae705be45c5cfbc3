"""Outbox retention: a result object delivered to every destination is removed after
``outbox_retention_h``; anything not yet delivered (pending, dead) keeps its file for replay."""

from __future__ import annotations

from pathlib import Path

from spine_node.dispatcher import outbox_retention_sweep
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, JobStore, SendSpec


def test_delivered_objects_leave_the_outbox_after_the_retention(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = JobStore.open(f"sqlite:///{tmp_path / 'q.db'}", clock=lambda: now[0])
    outbox = tmp_path / "outbox"
    names = {uid: relative_name(uid) for uid in ("1.2.3.1", "1.2.3.2", "1.2.3.3")}
    for rel in names.values():
        write_durable(outbox, rel, b"DICM")
    dicom = DestinationKind.DICOM
    store.add_sends([
        SendSpec("pacs", dicom, "1.2.3.1", names["1.2.3.1"]),  # delivered to both peers
        SendSpec("archive", dicom, "1.2.3.1", names["1.2.3.1"]),
        SendSpec("pacs", dicom, "1.2.3.2", names["1.2.3.2"]),  # delivered to one peer only
        SendSpec("archive", dicom, "1.2.3.2", names["1.2.3.2"]),
        SendSpec("pacs", dicom, "1.2.3.3", names["1.2.3.3"]),  # never delivered
    ])
    claimed = store.claim_sends(60.0, 10)
    for send in claimed:
        if send.object_uid == "1.2.3.1" or (send.object_uid, send.destination) == ("1.2.3.2",
                                                                                  "pacs"):
            store.mark_sent(send.send_id)
    retention_s = 3600.0
    now[0] += retention_s - 1  # not yet
    assert outbox_retention_sweep(store, outbox, retention_s, now[0]) == 0
    assert all((outbox / rel).is_file() for rel in names.values())
    now[0] += 2
    assert outbox_retention_sweep(store, outbox, retention_s, now[0]) == 1
    assert not (outbox / names["1.2.3.1"]).exists()
    assert (outbox / names["1.2.3.2"]).is_file() and (outbox / names["1.2.3.3"]).is_file()
    assert outbox_retention_sweep(store, outbox, retention_s, now[0]) == 0  # listed once
    assert store.is_own_object("1.2.3.1")  # loop prevention still knows it as ours
    store.close()

"""The dispatcher against DCMTK storescp: down, then up; every object arrives once."""

from __future__ import annotations

import random
from pathlib import Path

from pydicom import dcmread

from spine_node.dispatcher import Dispatcher, dispatch_settings, echo, retention_sweep
from spine_node.node import open_store, prepare_data_dir
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, InstanceRecord, JobOutcome, SendSpec
from tests.nodekit import StoreSCP, free_port, make_image, node_settings


def _queue_objects(settings, store, n: int, tmp_path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    uids = []
    sends = []
    for i in range(n):
        ds = make_image(tmp_path / f"r{i}.dcm", seed=i)
        uid = str(ds.SOPInstanceUID)
        rel = relative_name(uid)
        write_durable(settings.outbox_dir, rel, (tmp_path / f"r{i}.dcm").read_bytes())
        sends += [SendSpec(d.name, DestinationKind.DICOM, uid, rel) for d in settings.destinations]
        uids.append(uid)
    store.record_instance(InstanceRecord("src.1", "1.2", "1.3", "1.4", "1.2.840.10008.1.2.1", "M",
                                         "x/y.dcm", 1))
    (job,) = store.claim_jobs("w", 60, 1, 3)
    store.complete_job(job.job_id, "w", JobOutcome("negative", 0.1, None, {}), sends)
    return uids


def test_destination_down_then_up_every_object_arrives_once(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs", port=free_port())
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        send_backoff_base_s=0.01, send_backoff_max_s=0.02, send_max_attempts=50,
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    uids = _queue_objects(settings, store, 3, tmp_path)
    dispatcher = Dispatcher(store, settings.destinations, settings.outbox_dir,
                            dispatch_settings(settings), random.Random(0))
    assert dispatcher.run_once() == 3  # PACS down: all fail, retried later
    assert store.status()["outbound"]["pacs"]["pending"] == 3
    assert echo(settings.destination("pacs"), "SPINENODE", 2.0) is None
    pacs.start()
    try:
        assert echo(settings.destination("pacs"), "SPINENODE", 5.0) == 0
        import time

        deadline = time.monotonic() + 20
        while store.status()["outbound"]["pacs"]["sent"] < 3 and time.monotonic() < deadline:
            dispatcher.run_once()
            time.sleep(0.05)
        assert store.status()["outbound"]["pacs"]["sent"] == 3
        for _ in range(3):
            dispatcher.run_once()  # nothing more goes out
        got = sorted(str(dcmread(p).SOPInstanceUID) for p in pacs.received())
        assert got == sorted(uids)
    finally:
        pacs.stop()
        store.close()


def test_last_attempt_marks_send_dead_visibly(tmp_path: Path) -> None:
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        send_backoff_base_s=0.001, send_backoff_max_s=0.001, send_max_attempts=2,
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    _queue_objects(settings, store, 1, tmp_path)
    dispatcher = Dispatcher(store, settings.destinations, settings.outbox_dir,
                            dispatch_settings(settings), random.Random(0))
    import time

    for _ in range(3):
        dispatcher.run_once()
        time.sleep(0.01)
    dead = store.dead_letters()["sends"]
    assert len(dead) == 1 and "could not be made" in dead[0]["error"]
    assert store.replay("sends") == 1
    assert store.status()["outbound"]["pacs"]["pending"] == 1
    store.close()


def test_retention_removes_only_delivered_spool_files(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    prepare_data_dir(settings)
    store = open_store(settings)
    for uid in ("a.1", "a.2"):
        rel = relative_name(uid)
        write_durable(settings.spool_dir, rel, b"x")
        store.record_instance(InstanceRecord(uid, "1.2", "1.3", "1.4", "1.2.840.10008.1.2.1", "M",
                                             rel, 1))
    (job,) = store.claim_jobs("w", 60, 1, 3)  # a.1 finishes; a.2 stays queued
    store.complete_job(job.job_id, "w", JobOutcome("negative", 0.1, None, {}), [])
    import time

    assert retention_sweep(store, settings.spool_dir, 3600, time.time()) == 0  # too recent
    assert retention_sweep(store, settings.spool_dir, 0, time.time() + 1) == 1
    assert not (settings.spool_dir / relative_name("a.1")).exists()
    assert (settings.spool_dir / relative_name("a.2")).exists()
    store.close()


def test_the_stored_file_is_sent_as_encoded_not_decoded_and_re_encoded(tmp_path: Path) -> None:
    """Bytes a decode and re-encode would change (an element stored out of tag order, as
    some archives write them; pydicom sorts on encoding) arrive exactly as stored."""
    from pynetdicom import AE, evt
    from pynetdicom.dsutils import split_dataset

    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.DataSet.getvalue())  # type: ignore[union-attr]
        return 0x0000

    pacs_ae = AE(ae_title="PACS")
    pacs_ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = pacs_ae.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        source = tmp_path / "r.dcm"
        ds = make_image(source)
        ds.Manufacturer = "ACME"
        ds.save_as(source, enforce_file_format=True)
        manufacturer = b"\x08\x00\x70\x00LO\x04\x00ACME"
        encoded = source.read_bytes()
        assert encoded.count(manufacturer) == 1
        # the (0008,0070) element moved after the pixel data
        encoded = encoded.replace(manufacturer, b"") + manufacturer
        uid = str(ds.SOPInstanceUID)
        rel = relative_name(uid)
        write_durable(settings.outbox_dir, rel, encoded)
        store.add_sends([SendSpec("pacs", DestinationKind.DICOM, uid, rel)])
        dispatcher = Dispatcher(store, settings.destinations, settings.outbox_dir,
                                dispatch_settings(settings), random.Random(0))
        assert dispatcher.run_once() == 1
        assert store.status()["outbound"]["pacs"]["sent"] == 1
        _, offset = split_dataset(settings.outbox_dir / rel)
        stored = (settings.outbox_dir / rel).read_bytes()[offset:]
        assert received == [stored]
        assert received[0].endswith(manufacturer)
    finally:
        server.shutdown()
        store.close()


def test_acknowledging_socket_reads_a_pdu_sent_in_pieces_and_stops_at_a_close() -> None:
    """AcknowledgingSocket.recv returns exactly what was asked for, however the peer split it
    (each partial read acknowledges at once), and what came when the peer closes early."""
    import socket
    import threading

    from pynetdicom import AE
    from pynetdicom.association import Association

    from spine_node.transport import AcknowledgingSocket

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    reader = AcknowledgingSocket(Association(AE(), "requestor"), client_socket=client)
    header = bytes([4, 0, 0, 0, 0, 150]) + b"\x00" * 6
    body = bytes(range(138))

    def send_in_pieces() -> None:
        peer.sendall(header)  # DCMTK's way: a 12-byte first piece, then the rest
        peer.sendall(body)
        peer.sendall(b"tail")
        peer.close()

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    try:
        assert bytes(reader.recv(6)) == header[:6]
        assert bytes(reader.recv(144)) == header[6:] + body
        assert bytes(reader.recv(10)) == b"tail"  # the peer closed: what came
        assert bytes(reader.recv(10)) == b""
    finally:
        sender.join(timeout=10)
        client.close()


def test_outgoing_associations_send_at_once_and_acknowledge_at_once(tmp_path: Path) -> None:
    """DCMTK storescp writes each DIMSE response in two pieces with Nagle on: the node's own
    associations disable Nagle (TCP_NODELAY) and read through an AcknowledgingSocket (an
    immediate TCP_QUICKACK on a partly arrived PDU), so no exchange waits for a delayed
    acknowledgement (the latency benchmark shows the time)."""
    import socket

    from pynetdicom import evt

    from spine_node.transport import AcknowledgingSocket, low_latency_handlers

    pacs = StoreSCP(tmp_path / "pacs").start()
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        uids = _queue_objects(settings, store, 2, tmp_path)
        dispatcher = Dispatcher(store, settings.destinations, settings.outbox_dir,
                                dispatch_settings(settings), random.Random(0))
        assoc = dispatcher._associate(settings.destination("pacs"), [])
        try:
            assert assoc.is_established
            raw = assoc.dul.socket.socket
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert type(assoc.dul.socket) is AcknowledgingSocket
            bound = {event for event, *_ in low_latency_handlers()}
            assert bound == {evt.EVT_CONN_OPEN}
            assert all(assoc.get_handlers(event) for event in bound)
        finally:
            assoc.release()
        assert dispatcher.run_once() == 2  # and the objects go out on such an association
        assert store.status()["outbound"]["pacs"]["sent"] == 2
        got = sorted(str(dcmread(p).SOPInstanceUID) for p in pacs.received())
        assert got == sorted(uids)
    finally:
        pacs.stop()
        store.close()

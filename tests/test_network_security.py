"""Hostile peers at the receiver: oversized PDUs, stalls, floods, path characters, big objects.

Raw sockets speak just enough DICOM Upper Layer to attack; the association request they replay
is captured from a real pynetdicom SCU, and DCMTK's echoscu/storescu check the node afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from spine_node.config import Settings
from spine_node.node import RunningNode, start_node
from spine_node.spool import relative_name
from spine_node.store import JobStore
from spine_node.transport import INCOMING_DIR
from tests.nodekit import (
    CR_IMAGE_STORAGE,
    make_image,
    node_settings,
    storescu,
    wait_for,
    write_config,
)

TWO_GIB = 2**31


def echoscu(port: int, aet: str = "MODALITY1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", "SPINENODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def capture_associate_rq(port: int) -> bytes:
    """The A-ASSOCIATE-RQ PDU a real SCU sends (one context: CR Image Storage, explicit LE)."""
    sent: list[bytes] = []
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="SPINENODE",
        evt_handlers=[(evt.EVT_DATA_SENT, lambda e: sent.append(e.data))],
    )
    assert assoc.is_established
    assoc.release()
    assert sent[0][0] == 0x01
    return sent[0]


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Read one PDU; (0, b"") when the peer closed the connection."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            break
        body += chunk
    return pdu_type, body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the peer closes ``sock`` (reads and ignores what it sends meanwhile)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - start


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, RunningNode]]:
    settings = node_settings(
        tmp_path, network_timeout_s=1.0, acse_timeout_s=2.0, max_associations=3
    )
    running = start_node(settings, ("receiver",))
    yield settings, running
    running.stop()


def _flood_after(sock: socket.socket, header: bytes, total: int) -> int:
    """Send a header then up to ``total`` junk bytes until the server closes; bytes sent."""
    sock.sendall(header)
    junk = b"\xab" * 65536
    sent = 0
    try:
        while sent < total:
            sent += sock.send(junk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


@pytest.mark.parametrize("stage", ["associate", "p-data"])
def test_oversized_pdu_is_aborted_before_allocation(
    node: tuple[Settings, RunningNode], stage: str
) -> None:
    settings, running = node
    rq = capture_associate_rq(settings.port)
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", settings.port), timeout=5) as sock:
            if stage == "p-data":
                sock.sendall(rq)
                assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
                header = struct.pack(">BBL", 0x04, 0, TWO_GIB)
            else:
                header = struct.pack(">BBL", 0x01, 0, TWO_GIB)
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            sock.settimeout(5)
            sent = _flood_after(sock, header, 64 * 1024 * 1024)
            _, peak = tracemalloc.get_traced_memory()
            # The server answered the header with an A-ABORT and closed: the 64 MiB never went
            assert sent < 32 * 1024 * 1024
            assert closed_within(sock, 5) < 5
    finally:
        tracemalloc.stop()
    # Nothing near the claimed (or the sent) size was allocated while refusing it
    assert peak - base < 4 * 1024 * 1024
    assert echoscu(settings.port).returncode == 0  # the node keeps serving
    assert running.store.status()["instances"] == 0


def test_oversized_pdu_gets_an_a_abort(node: tuple[Settings, RunningNode]) -> None:
    settings, _ = node
    with socket.create_connection(("127.0.0.1", settings.port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, TWO_GIB))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x07 and len(body) == 4  # A-ABORT (PS3.8 AA-1)
        assert closed_within(sock, 5) < 5


def test_p_data_one_byte_over_max_pdu_is_refused(node: tuple[Settings, RunningNode]) -> None:
    settings, _ = node
    rq = capture_associate_rq(settings.port)
    with socket.create_connection(("127.0.0.1", settings.port), timeout=5) as sock:
        sock.sendall(rq)
        assert read_pdu(sock)[0] == 0x02
        sock.sendall(struct.pack(">BBL", 0x04, 0, settings.max_pdu_length + 1))
        assert read_pdu(sock)[0] == 0x07


def test_silent_connection_is_closed_after_the_acse_timeout(
    node: tuple[Settings, RunningNode],
) -> None:
    settings, _ = node
    with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as sock:
        elapsed = closed_within(sock, 10)
    assert settings.acse_timeout_s - 0.5 < elapsed < settings.acse_timeout_s + 3


def test_peer_stalling_inside_a_pdu_is_closed_after_the_network_timeout(
    node: tuple[Settings, RunningNode],
) -> None:
    settings, _ = node
    rq = capture_associate_rq(settings.port)
    with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as sock:
        sock.sendall(rq[:40])  # header promises the whole request; only 34 bytes follow
        elapsed = closed_within(sock, 10)
    assert elapsed < settings.network_timeout_s + 3
    assert echoscu(settings.port).returncode == 0


def test_idle_association_is_aborted_after_the_network_timeout(
    node: tuple[Settings, RunningNode],
) -> None:
    settings, _ = node
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
    assert assoc.is_established
    start = time.monotonic()
    wait_for(lambda: not assoc.is_established, timeout=10, interval=0.05)
    assert assoc.is_aborted
    assert time.monotonic() - start < settings.network_timeout_s + 3


def test_association_limit_holds(
    node: tuple[Settings, RunningNode], caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = node
    caplog.set_level(logging.WARNING, logger="spine_node.receiver")
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [
        ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
        for _ in range(settings.max_associations)
    ]
    try:
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
        assert extra.is_rejected and not extra.is_established
        refused = [r.getMessage() for r in caplog.records if "association refused" in r.getMessage()]
        assert refused and "calling AE 'MODALITY1' called AE 'SPINENODE'" in refused[0]
        assert "too many associations" in refused[0] and "127.0.0.1:" in refused[0]
        out = echoscu(settings.port)
        assert out.returncode != 0 and "Rejected" in out.stdout + out.stderr
        held.pop().release()
        time.sleep(0.3)
        again = ae.associate("127.0.0.1", settings.port, ae_title="SPINENODE")
        assert again.is_established
        held.append(again)
    finally:
        for a in held:
            a.release()


def test_connection_flood_is_capped_at_accept(tmp_path: Path) -> None:
    # a long ACSE timeout, so "closed at accept" and "closed by the timeout" cannot be confused
    settings = node_settings(
        tmp_path, network_timeout_s=1.0, acse_timeout_s=8.0, max_associations=3
    )
    running = start_node(settings, ("receiver",))
    try:
        _flood(settings, running)
    finally:
        running.stop()


def _flood(settings: Settings, running: RunningNode) -> None:
    cap = 2 * settings.max_associations
    server = running.server
    socks = [
        socket.create_connection(("127.0.0.1", settings.port), timeout=10) for _ in range(cap + 4)
    ]
    try:
        time.sleep(2.0)  # all handed over to association threads (or refused) by now
        held = len(server.active_associations)
        assert server._in_handler == 0 and 0 < held <= cap  # never more than the cap
        # every connection over the cap is closed, at the latest by the ACSE timeout
        closed = sum(
            closed_within(s, settings.acse_timeout_s + 3) < settings.acse_timeout_s + 3
            for s in socks
        )
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()
    wait_for(
        lambda: echoscu(settings.port).returncode == 0,
        timeout=settings.acse_timeout_s + 10,
        interval=0.3,
    )


def test_path_characters_in_ae_titles_and_uids_stay_in_the_data_dir(
    node: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, running = node
    assert settings.allowed_calling_aes == ()  # any calling AE is accepted
    src = tmp_path / "a.dcm"
    ds = make_image(src)
    ds.StudyInstanceUID = "../../../../study"
    ds.SeriesInstanceUID = "/etc/cron.d/x"
    ds.SOPInstanceUID = "../../x/../y"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(src, enforce_file_format=True)
    out = storescu(settings.port, [src], aet="../../x")
    assert out.returncode == 0, out.stdout + out.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != src]
    written = [p for p in files if settings.data_dir not in p.parents]
    assert written == []
    stored = settings.spool_dir / relative_name(str(ds.SOPInstanceUID))
    assert stored.is_file() and dcmread(stored).SeriesInstanceUID == "/etc/cron.d/x"
    assert not (tmp_path / "x").exists() and not (settings.data_dir / "x").exists()
    assert running.store.status()["instances"] == 1


def _command_and_data_pdus(ds_bytes: bytes, uid: str, max_pdu: int) -> list[bytes]:
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CR_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = uid
    primitive.Priority = 2
    primitive.DataSet = __import__("io").BytesIO(ds_bytes)
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    pdus = []
    for p in msg.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        pdus.append(pdu.encode())
    return pdus


def test_half_received_dataset_is_discarded(
    node: tuple[Settings, RunningNode], tmp_path: Path
) -> None:
    settings, running = node
    rq = capture_associate_rq(settings.port)
    uid = generate_uid()
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, uid
    ds.BitsAllocated = 8
    ds.PixelData = b"\0" * 400_000
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    pdus = _command_and_data_pdus(buf.getvalue(), uid, settings.max_pdu_length)
    incoming = settings.spool_dir / INCOMING_DIR
    with socket.create_connection(("127.0.0.1", settings.port), timeout=5) as sock:
        sock.sendall(rq)
        assert read_pdu(sock)[0] == 0x02
        for pdu in pdus[: len(pdus) // 2]:
            sock.sendall(pdu)
        wait_for(lambda: any(incoming.iterdir()), timeout=5)  # it is being streamed to disk
    wait_for(lambda: not any(incoming.iterdir()), timeout=10)  # gone once the link dropped
    assert running.store.status()["instances"] == 0


# ---------------------------------------------------------------------------------------------
# Chunked receive of a large object in a separate node process


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _big_image(path: Path, megabytes: int) -> Dataset:
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5)
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CR", side, side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = (np.arange(side * side, dtype=np.uint32) % 4096).astype(np.uint16)
    ds.PixelData = ramp.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_large_object_is_received_in_bounded_memory(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    config = write_config(tmp_path / "node.toml", settings)
    src = tmp_path / "big.dcm"
    ds = _big_image(src, 60)
    size = src.stat().st_size
    digest = hashlib.sha256(ds.PixelData).hexdigest()
    del ds
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spine_node.cli",
            "serve",
            "--config",
            str(config),
            "--role",
            "receiver",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: echoscu(settings.port).returncode == 0, timeout=60, interval=0.3)
        before = _vm_kib(proc.pid, "VmHWM")
        out = storescu(settings.port, [src])
        assert out.returncode == 0, out.stdout + out.stderr
        growth = (_vm_kib(proc.pid, "VmHWM") - before) * 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"object {size / 2**20:.1f} MiB, receiver peak RSS growth {growth / 2**20:.1f} MiB")
    assert growth < size / 4
    stored = settings.spool_dir / relative_name(
        str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    )
    assert hashlib.sha256(dcmread(stored).PixelData).hexdigest() == digest
    assert not any((settings.spool_dir / INCOMING_DIR).iterdir())
    store = JobStore.open(settings.db_url)
    try:
        assert store.status()["jobs"]["queued"] == 1
    finally:
        store.close()

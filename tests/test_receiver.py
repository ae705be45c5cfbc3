"""The receiver with real DCMTK peers on loopback: files, rows, states and statuses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE

from spine_node.config import Settings
from spine_node.node import RunningNode, start_node
from spine_node.spool import relative_name
from tests.nodekit import make_image, node_settings, storescu


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Settings, RunningNode]]:
    settings = node_settings(tmp_path, allowed_calling_aes=["MODALITY1", "ROUTER"])
    node = start_node(settings, ("receiver",))
    yield settings, node
    node.stop()


def scu_send(port: int, path: Path, aet: str = "MODALITY1") -> int:
    """Send one file as it is on disk (command UIDs from its file meta); return the status."""
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=aet)
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status)
    finally:
        assoc.release()
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = False


def test_echoscu(receiver: tuple[Settings, RunningNode]) -> None:
    settings, _ = receiver
    out = subprocess.run(["echoscu", "-aet", "MODALITY1", "-aec", "SPINENODE", "127.0.0.1",
                          str(settings.port)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_storescu_stores_raw_bytes_and_queues(receiver: tuple[Settings, RunningNode],
                                              tmp_path: Path) -> None:
    settings, node = receiver
    src = tmp_path / "a.dcm"
    ds = make_image(src)
    j2k = Path(get_testdata_file("RG3_J2KR.dcm"))  # CR, compressed, sent as is
    out = storescu(settings.port, [src])
    assert out.returncode == 0, out.stdout + out.stderr
    out = storescu(settings.port, [j2k], extra=("-xv",))  # propose JPEG 2000 lossless
    assert out.returncode == 0, out.stdout + out.stderr
    stored = settings.spool_dir / relative_name(str(ds.SOPInstanceUID))
    assert stored.is_file()
    assert dcmread(stored).PixelData == ds.PixelData
    j2k_ds = dcmread(j2k)
    stored_j2k = dcmread(settings.spool_dir / relative_name(str(j2k_ds.SOPInstanceUID)))
    assert stored_j2k.file_meta.TransferSyntaxUID == j2k_ds.file_meta.TransferSyntaxUID
    assert stored_j2k.PixelData == j2k_ds.PixelData  # no decode / re-encode
    status = node.store.status()
    assert status["instances"] == 2 and status["jobs"]["queued"] == 2
    assert oct(stored.stat().st_mode & 0o777) == "0o600"
    assert not list(settings.spool_dir.rglob("*.part"))


def test_same_instance_twice_is_one_job(receiver: tuple[Settings, RunningNode],
                                        tmp_path: Path) -> None:
    settings, node = receiver
    src = tmp_path / "a.dcm"
    make_image(src)
    for _ in range(2):
        assert storescu(settings.port, [src]).returncode == 0
    assert scu_send(settings.port, src) == 0x0000
    status = node.store.status()
    assert status["instances"] == 1 and sum(status["jobs"].values()) == 1


def test_calling_ae_not_allowed_is_rejected(receiver: tuple[Settings, RunningNode],
                                            tmp_path: Path) -> None:
    settings, node = receiver
    src = tmp_path / "a.dcm"
    make_image(src)
    out = storescu(settings.port, [src], aet="INTRUDER")
    assert out.returncode != 0
    assert "Rejected" in out.stdout + out.stderr or "rejected" in out.stdout + out.stderr
    assert node.store.status()["instances"] == 0


def test_wrong_called_ae_is_rejected(receiver: tuple[Settings, RunningNode],
                                     tmp_path: Path) -> None:
    settings, node = receiver
    src = tmp_path / "a.dcm"
    make_image(src)
    assert storescu(settings.port, [src], aec="OTHERNODE").returncode != 0
    assert node.store.status()["instances"] == 0


def test_dataset_not_matching_command_is_a900(receiver: tuple[Settings, RunningNode],
                                              tmp_path: Path) -> None:
    settings, node = receiver
    src = tmp_path / "a.dcm"
    ds = make_image(src)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"  # the command takes this one
    ds.save_as(src, enforce_file_format=False)
    assert scu_send(settings.port, src) == 0xA900
    assert node.store.status()["instances"] == 0


def test_vindr_like_file_without_sop_class_is_accepted(receiver: tuple[Settings, RunningNode],
                                                        tmp_path: Path) -> None:
    settings, node = receiver
    src = tmp_path / "a.dcm"
    ds = make_image(src)
    del ds.SOPClassUID
    del ds.Modality
    ds.save_as(src, enforce_file_format=False)
    assert scu_send(settings.port, src) == 0x0000
    assert node.store.status()["instances"] == 1


def test_misrouted_ct_is_stored_not_bounced(receiver: tuple[Settings, RunningNode]) -> None:
    # outside the intended use (CR, DX): acknowledged, recorded "out of scope", no job
    settings, node = receiver
    ct = Path(get_testdata_file("CT_small.dcm"))
    out = storescu(settings.port, [ct])
    assert out.returncode == 0, out.stdout + out.stderr
    status = node.store.status()
    assert status["instances"] == 1 and status["jobs"]["queued"] == 0
    assert status["categories"]["out_of_scope"] == 1


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs), to fill up or make read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _node_on(tmp_path: Path, data_dir: Path, **kw: object) -> tuple[Settings, RunningNode]:
    settings = node_settings(tmp_path, data_dir=str(data_dir), **kw)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    # keep the database off the small filesystem: only the spool is constrained
    settings = node_settings(tmp_path, data_dir=str(data_dir),
                             database_url=f"sqlite:///{tmp_path / 'q.db'}", **kw)
    return settings, start_node(settings, ("receiver",))


def test_disk_full_is_a700_without_partial_file(tmp_path: Path, small_mount: Path) -> None:
    settings, node = _node_on(tmp_path, small_mount)
    try:
        big = tmp_path / "big.dcm"
        make_image(big, rows=256, cols=256)  # 128 KiB of pixels > 64 KiB filesystem
        assert scu_send(settings.port, big) == 0xA700
        assert not [p for p in settings.spool_dir.rglob("*") if p.is_file()]
        small = tmp_path / "small.dcm"
        make_image(small, rows=16, cols=16)
        assert scu_send(settings.port, small) == 0x0000  # keeps serving
        assert node.store.status()["instances"] == 1
    finally:
        node.stop()


def test_free_space_watermark_is_a700(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, min_free_bytes=10**18)
    node = start_node(settings, ("receiver",))
    try:
        src = tmp_path / "a.dcm"
        make_image(src)
        assert scu_send(settings.port, src) == 0xA700
        assert node.store.status()["instances"] == 0
    finally:
        node.stop()


def test_read_only_spool_is_a700(tmp_path: Path, small_mount: Path) -> None:
    settings, node = _node_on(tmp_path, small_mount)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
        src = tmp_path / "a.dcm"
        make_image(src)
        assert scu_send(settings.port, src) == 0xA700
        assert node.store.status()["instances"] == 0
    finally:
        node.stop()


def test_hostile_uid_cannot_escape_data_dir(receiver: tuple[Settings, RunningNode],
                                            tmp_path: Path) -> None:
    settings, _node = receiver
    src = tmp_path / "a.dcm"
    ds = make_image(src)
    ds.SOPInstanceUID = "../../../../tmp/evil"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(src, enforce_file_format=True)
    assert scu_send(settings.port, src) == 0x0000
    files = [p for p in settings.data_dir.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert len(files) == 1 and settings.spool_dir in files[0].parents
    assert not Path("/tmp/evil").exists()

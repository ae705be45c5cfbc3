"""Helpers for node tests: free ports, small DICOM files, node settings, DCMTK peers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from spine_node.config import Settings, settings_from_mapping

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_image(
    path: Path,
    *,
    sop_uid: str | None = None,
    study_uid: str | None = None,
    sop_class: str = CR_IMAGE_STORAGE,
    rows: int = 64,
    cols: int = 48,
    modality: str = "CR",
    body_part: str = "LSPINE",
    seed: int = 0,
) -> Dataset:
    """Write a small, valid uncompressed radiograph and return its dataset."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Secret"
    ds.PatientID = "SECRET-ID-42"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def node_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a node under ``tmp_path`` on a free loopback port."""
    data: dict[str, Any] = {
        "ae_title": "SPINENODE",
        "port": free_port(),
        "bind_address": "127.0.0.1",
        "data_dir": str(tmp_path / "data"),
        "allowed_calling_aes": [],
        "min_free_bytes": 0,
        "sweep_interval_s": 0.2,
        "worker_poll_s": 0.1,
        "send_backoff_base_s": 0.2,
        "send_backoff_max_s": 1.0,
        "web": {"port": free_port()},  # `serve` without --role starts the page too
    }
    data.update(overrides)
    return settings_from_mapping(data, environ={})


def storescu(port: int, files: list[Path], *, aet: str = "MODALITY1", aec: str = "SPINENODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu; return the finished process (verbose output)."""
    cmd = ["storescu", "-v", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


__all__ = ["CR_IMAGE_STORAGE", "DX_PRESENTATION", "CTImageStorage", "free_port", "make_image",
           "node_settings", "storescu", "wait_for"]


class StoreSCP:
    """DCMTK ``storescp`` playing the PACS on loopback; files land in ``out_dir``."""

    def __init__(self, out_dir: Path, port: int | None = None, aet: str = "PACS",
                 unique_names: bool = False) -> None:
        self.out_dir = out_dir
        self.port = port or free_port()
        self.aet = aet
        self.unique_names = unique_names  # storescp +uf: a duplicate is a second file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "-od", str(self.out_dir),
             *(["+uf"] if self.unique_names else []), "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self._listening, timeout=15)
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


def write_config(path: Path, settings: Settings) -> Path:
    """Write settings as a TOML file the ``spine-node`` command reads."""
    data = settings.model_dump(mode="json", exclude_none=True)

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(type(v))

    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif key == "destinations":
            continue
        else:
            lines.append(f"{key} = {fmt(value)}")
    for key, table in tables:
        lines.append(f"[{key}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for dest in data.get("destinations", []):
        lines.append("[[destinations]]")
        lines += [f"{k} = {fmt(v)}" for k, v in dest.items() if not isinstance(v, dict)]
        for k, v in dest.items():
            if isinstance(v, dict):
                lines.append(f"[destinations.{k}]")
                lines += [f"{kk} = {fmt(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class CountingPACS:
    """A pynetdicom C-STORE SCP that records every SOP Instance UID it receives (duplicates too)."""

    def __init__(self, port: int | None = None, aet: str = "PACS") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = port or free_port()
        self.received: list[str] = []
        self.classes: list[str] = []
        self._evt = evt
        self._ae = AE(ae_title=aet)
        for cx in AllStoragePresentationContexts:
            self._ae.add_supported_context(cx.abstract_syntax)
        self._ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        self.received.append(str(ds.SOPInstanceUID))
        self.classes.append(str(ds.SOPClassUID))
        return 0x0000

    def start(self) -> CountingPACS:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(self._evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

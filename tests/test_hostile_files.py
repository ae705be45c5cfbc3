"""Odd and hostile input: pydicom's own test files by C-STORE, and malformed datasets
pushed through the cascade (property-based)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pynetdicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from spine_node.node import start_node
from spine_node.pipeline import Cascade
from spine_node.results.types import Status
from tests.nodekit import node_settings, wait_for

pytest_plugins = ("tests.fixtures_models",)


def _send_as_is(port: int, path: Path) -> int | None:
    """C-STORE a file as it is on disk; None when no SCU could send it at all."""
    try:
        meta = dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    fm = getattr(meta, "file_meta", None)
    sop_class = (fm.get("MediaStorageSOPClassUID") if fm else None) or meta.get("SOPClassUID")
    sop_uid = (fm.get("MediaStorageSOPInstanceUID") if fm else None) or meta.get("SOPInstanceUID")
    ts = (fm.get("TransferSyntaxUID") if fm else None) or ExplicitVRLittleEndian
    if not sop_class or not sop_uid:
        return None
    ae = AE(ae_title="MODALITY1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    try:
        ae.add_requested_context(str(sop_class), str(ts))
    except ValueError:
        return None
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    if not assoc.is_established:
        return None
    try:
        chunked = bool(fm and fm.get("TransferSyntaxUID") and fm.get("MediaStorageSOPInstanceUID"))
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = chunked
        try:
            rsp = assoc.send_c_store(path if chunked else dcmread(path, force=True))
        except Exception:
            return None
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()


def test_every_pydicom_test_file_ends_in_a_defined_outcome(tmp_path: Path,
                                                           tiny_bundle: Path) -> None:
    files = get_testdata_files()
    # every modality among the files is "intended" here, so that every image is decoded and
    # analysed (by default only CR and DX are; the rest would be recorded as out of scope)
    modalities = set()
    for name in files:
        try:
            modality = dcmread(name, stop_before_pixels=True, force=True).get("Modality")
        except Exception:
            continue
        if isinstance(modality, str) and modality.strip():
            modalities.add(modality.strip().upper())
    settings = node_settings(tmp_path, bundle=str(tiny_bundle), device="cpu",
                             worker_batch_size=8, job_max_attempts=2,
                             intended_modalities=sorted(modalities), report_out_of_scope=True)
    node = start_node(settings)
    outcomes: dict[str, int | None] = {}
    try:
        for name in files:
            outcomes[name] = _send_as_is(settings.port, Path(name))
        echo = subprocess.run(["echoscu", "-aec", "SPINENODE", "127.0.0.1", str(settings.port)],
                              capture_output=True, timeout=30)
        assert echo.returncode == 0, "the node stopped serving"

        def settled() -> dict | None:  # type: ignore[type-arg]
            s = node.store.status()
            open_jobs = s["jobs"]["queued"] + s["jobs"]["running"] + s["jobs"]["failed"]
            return s if open_jobs == 0 else None

        status = wait_for(settled, timeout=900, interval=1.0)
    finally:
        node.stop()
    statuses = [s for s in outcomes.values() if s is not None]
    assert len(statuses) >= 200, "most test files must be sendable"
    # success, or a proper failure status: out of resources / mismatch / cannot understand
    assert set(statuses) <= {0x0000, 0xA700, 0xA900, 0xC210}, sorted(set(statuses))
    assert status["jobs"]["dead"] == 0
    # images (and images without a usable modality, reported as out of scope) get a job and a
    # result; non-image objects are recorded without either
    categories = status["categories"]
    assert sum(categories.values()) == status["instances"]
    with_jobs = categories["image"] + categories["out_of_scope"]
    assert with_jobs >= 100, categories
    assert status["jobs"]["done"] + status["jobs"]["not_processed"] == with_jobs
    assert sum(status["results"].values()) == with_jobs
    print(f"sent {len(statuses)} of {len(outcomes)} files; statuses "
          f"{ {hex(k): statuses.count(k) for k in set(statuses)} }; results {status['results']}")


def _base_dataset(rows: int = 300, cols: int = 260) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (rows, cols), np.uint16).tobytes()
    return ds


def _nest(depth: int) -> DicomSequence:
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = DicomSequence([inner])
        inner = outer
    return DicomSequence([inner])


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 300 * 260 * 2)),
    st.tuples(st.just("garbage"), st.binary(min_size=0, max_size=4096)),
    st.tuples(st.just("rows"), st.integers(0, 70000)),
    st.tuples(st.just("columns"), st.integers(0, 70000)),
    st.tuples(st.just("bits"), st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64])),
    st.tuples(st.just("samples"), st.integers(0, 5)),
    st.tuples(st.just("photometric"), st.sampled_from(["", "RGB", "YBR_FULL", "PALETTE COLOR",
                                                       "MONOCHROME1", "NONSENSE"])),
    st.tuples(st.just("nesting"), st.integers(1, 60)),
    st.tuples(st.just("window"), st.text(max_size=20)),
    st.tuples(st.just("charset"), st.sampled_from(["ISO_IR 192", "ISO 2022 IR 87", "BOGUS",
                                                   "ISO_IR 100\\ISO_IR 144", ""])),
    st.tuples(st.just("frames"), st.integers(-3, 100000)),
    st.tuples(st.just("modality"), st.text(max_size=8)),
)


def _apply(ds: Dataset, change: tuple[str, object]) -> None:
    kind, value = change
    if kind == "truncate":
        ds.PixelData = ds.PixelData[: int(value)]  # type: ignore[call-overload]
    elif kind == "garbage":
        ds.PixelData = value
    elif kind == "rows":
        ds.Rows = value
    elif kind == "columns":
        ds.Columns = value
    elif kind == "bits":
        ds.BitsAllocated = value
    elif kind == "samples":
        ds.SamplesPerPixel = value
    elif kind == "photometric":
        ds.PhotometricInterpretation = value
    elif kind == "nesting":
        ds.ContentSequence = _nest(int(value))  # type: ignore[call-overload]
    elif kind == "window":
        ds.add_new(0x00281050, "DS", None)
        ds[0x00281050]._value = value  # wrong VR content, as a sloppy modality writes it
    elif kind == "charset":
        ds.SpecificCharacterSet = value
        ds.add_new(0x00100010, "PN", "Yamada^Tarou=山田^太郎".encode("iso2022_jp", "ignore"))
    elif kind == "frames":
        ds.NumberOfFrames = value
    elif kind == "modality":
        ds.Modality = value


@pytest.fixture(scope="module")
def cascade(tiny_bundle: Path) -> Cascade:
    return Cascade.load(tiny_bundle, device="cpu")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(mutation, min_size=1, max_size=3))
def test_malformed_datasets_always_get_an_answer(cascade: Cascade,
                                                 changes: list[tuple[str, object]]) -> None:
    ds = _base_dataset()
    for change in changes:
        try:
            _apply(ds, change)
        except (ValueError, TypeError, OverflowError):
            pass  # pydicom refused to even build it: nothing to send
    t0 = time.monotonic()
    (result,) = cascade.analyze([ds])
    assert time.monotonic() - t0 < 60
    assert result.status in set(Status)
    if result.status is Status.NOT_PROCESSED:
        assert result.reason
    else:
        assert result.score is not None and 0.0 <= result.score <= 1.0

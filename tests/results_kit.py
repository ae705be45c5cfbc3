"""Helpers shared by the result-object tests: sources, dciodvfy, round trips."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

from spine_node import imaging
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"

MODEL = ModelInfo(name="dernet-yolo11", version="1.2.0", intended_use="Research triage")


def dx_source(
    *,
    study: str = "1.2.826.0.1.3680043.8.498.1",
    series: str = "1.2.826.0.1.3680043.8.498.2",
    sop: str = "1.2.826.0.1.3680043.8.498.3",
    rows: int = 128,
    columns: int = 96,
    charset: str | list[str] = "ISO_IR 100",
) -> Dataset:
    """A small DX spine-like image with window centre/width, in memory."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "DX"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = "20250101"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "A1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Lumbar spine"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ramp = (np.arange(rows * columns, dtype=np.uint32).reshape(rows, columns) * 7) % 4096
    ds.PixelData = ramp.astype("<u2").tobytes()
    return ds


def write_and_read(ds: Dataset, path: Path) -> Dataset:
    """Save ``ds`` as a Part 10 file and read it back (raw elements, as the worker does)."""
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def positive(source: Dataset, n: int = 2) -> CascadeResult:
    """A positive result with ``n`` findings inside the source image."""
    rows, cols = int(source.Rows), int(source.Columns)
    findings = tuple(
        Finding(
            "Osteophytes",
            0.9 - 0.01 * i,
            (cols * 0.1, rows * (0.1 + 0.08 * i), cols * 0.5, rows * (0.15 + 0.08 * i)),
        )
        for i in range(n)
    )
    return CascadeResult(
        sop_instance_uid=str(source.SOPInstanceUID),
        status=Status.POSITIVE,
        score=0.91,
        threshold=0.5,
        findings=findings,
        display=display_of(source),  # what the cascade hands on
    )


def display_of(source: Dataset) -> imaging.SourceImage | None:
    """The display image the cascade would hand on; None when the source does not decode."""
    try:
        return imaging.decode(source)
    except Exception:  # the cascade reports any decoder error as "not decoded"
        return None


def save_object(ds: Dataset, directory: Path) -> tuple[Path, Dataset]:
    """Encode a result object to bytes, write it, and read it back with pydicom."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = directory / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
    path.write_bytes(buffer.getvalue())
    return path, pydicom.dcmread(path)


def dciodvfy_errors(path: Path) -> list[str]:
    """Return dciodvfy's "Error" lines for ``path`` (the summary line excluded)."""
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [
        line
        for line in lines
        if line.startswith("Error") and "Dicom dataset contains invalid data values" not in line
    ]


def sr_texts(sr: Dataset) -> list[str]:
    """Every TEXT content item's value in an SR content tree, depth first."""
    found: list[str] = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found

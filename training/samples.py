"""Standard DICOM sample studies for ``spine-node demo`` (shipped in ``spine_node/samples``).

The phantom writes files shaped like VinDr-SpineXR (no SOP Class UID, 32-hex "UIDs", JPEG 2000),
which a PACS or ``storescu`` refuses. This module turns a few phantom images into what a modality
sends: CR Image Storage, valid ``2.25`` UIDs, Explicit VR Little Endian, 8-bit pixels (small
files), an adult patient's age, a lumbar spine body part. The demo bundle builder writes them next
to the bundle; ``spine-node demo`` sends them and ``spine-node demo --write-samples DIR`` copies
them out for a newcomer's PACS.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
#: Seed and size of the shipped samples (the demo bundle's phantom size).
SAMPLE_SEED = 20261122
SAMPLE_SIZE = (512, 384)


@dataclass(frozen=True)
class SampleImage:
    """One written sample: file name, study, and what the phantom put in it."""

    file: str
    study: str
    sop_instance_uid: str
    study_instance_uid: str
    abnormal: bool
    lesions: tuple[str, ...]


def _uid(*parts: str) -> str:
    """A deterministic, valid ``2.25`` UID from text."""
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


def _to_8bit(source: Dataset) -> np.ndarray:
    """Apply the source's window (12-bit phantom values) and quantise to 0..255."""
    pixels = source.pixel_array.astype(np.float64)
    center = float(source.WindowCenter) if "WindowCenter" in source else float(pixels.mean())
    width = float(source.WindowWidth) if "WindowWidth" in source else float(np.ptp(pixels) or 1)
    low = center - width / 2.0
    scaled = np.clip((pixels - low) / width, 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def standard_sample(
    source: Dataset, *, study: str, index: int, patient: str, age_years: int
) -> Dataset:
    """Build a CR image a PACS accepts from one phantom dataset.

    Parameters
    ----------
    source : pydicom.Dataset
        A phantom file (any photometric interpretation, JPEG 2000 or not).
    study : str
        Study label; with ``index`` it seeds the UIDs.
    index : int
        Image number within the study (1-based).
    patient : str
        Patient ID (a made-up one; the name is ``PHANTOM^<patient>``).
    age_years : int
        Patient's Age in years (adult, inside the demo bundle's intended use).
    """
    if index < 1:
        raise ValueError(f"index must be >= 1, got {index!r}")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = _uid("spine-node-sample", study, str(index))
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = f"DEMO-{patient[-1]}"
    ds.Modality = "CR"
    ds.Manufacturer = "spine-node phantom (synthetic, not a patient)"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Lumbar spine (synthetic phantom)"
    ds.SeriesDescription = "LSPINE"
    ds.PatientName = f"PHANTOM^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = f"{age_years:03d}Y"
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "AP" if index % 2 else "LL"
    ds.StudyInstanceUID = _uid("spine-node-sample", study)
    ds.SeriesInstanceUID = _uid("spine-node-sample", study, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index
    ds.PatientOrientation = ""
    pixels = _to_8bit(source)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = str(source.PhotometricInterpretation)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.preamble = b"\0" * 128
    return ds


def _labels(phantom_dir: Path) -> dict[str, set[str]]:
    """image_id -> lesion types (empty for "No finding") over both splits."""
    labels: dict[str, set[str]] = {}
    for split in ("train", "test"):
        path = phantom_dir / "annotations" / f"{split}.csv"
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                lesions = labels.setdefault(row["image_id"], set())
                if row["lesion_type"] != "No finding":
                    lesions.add(row["lesion_type"])
    return labels


def write_demo_samples(
    out_dir: Path, *, seed: int = SAMPLE_SEED, abnormal: int = 2, normal: int = 1
) -> list[SampleImage]:
    """Write sample studies (one abnormal, one normal) and an ``index.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Folder for ``*.dcm`` and ``index.json`` (created; old ``*.dcm`` removed).
    seed : int
        Phantom seed (same seed, same files).
    abnormal, normal : int
        Images in the abnormal and the normal study.

    Returns
    -------
    list of SampleImage
    """
    from training.phantom import write_phantom_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.dcm"):
        old.unlink()
    written: list[SampleImage] = []
    with tempfile.TemporaryDirectory() as tmp:
        phantom = Path(tmp)
        write_phantom_dataset(
            phantom, 4 * (abnormal + normal), seed, balanced=True, size=SAMPLE_SIZE, workers=1
        )
        labels = _labels(phantom)
        files = sorted(phantom.glob("*_images/*.dicom"))
        wanted = {"a": abnormal, "n": normal}
        plan = {"a": ("study-abnormal", "PHANTOM-A", 56), "n": ("study-normal", "PHANTOM-N", 47)}
        for path in files:
            lesions = labels.get(path.stem, set())
            kind = "a" if lesions else "n"
            if wanted[kind] == 0:
                continue
            study, patient, age = plan[kind]
            index = (abnormal if kind == "a" else normal) - wanted[kind] + 1
            wanted[kind] -= 1
            ds = standard_sample(
                dcmread(path), study=study, index=index, patient=patient, age_years=age
            )
            name = f"{study}-{index}.dcm"
            ds.save_as(out_dir / name, enforce_file_format=True)
            written.append(
                SampleImage(
                    name,
                    study,
                    str(ds.SOPInstanceUID),
                    str(ds.StudyInstanceUID),
                    bool(lesions),
                    tuple(sorted(lesions)),
                )
            )
        if any(wanted.values()):
            raise RuntimeError(f"the phantom (seed {seed}) had too few images of a kind: {wanted}")
    entries = [s.__dict__ | {"lesions": list(s.lesions)} for s in written]
    (out_dir / "index.json").write_text(json.dumps(entries, indent=2) + "\n")
    return written

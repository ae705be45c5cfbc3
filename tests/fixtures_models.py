"""Fixtures for the model tests: one tiny random-weight bundle per session, copied per test.

Use them from a test module with ``pytest_plugins = ("tests.fixtures_models",)``; the image
helpers are fixtures too (``dx_dataset``, ``spine_like``), so test modules need not import
this module (which would stop pytest from registering it as a plugin cleanly).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from training.export import make_tiny_bundle, synthetic_radiographs

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle (with ONNX exports and gate statistics), built once per session."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_bundle")
    make_tiny_bundle(out, seed=0)
    return out


@pytest.fixture()
def tiny_bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def make_spine_like(rows: int = 200, columns: int = 130, *, seed: int = 1) -> np.ndarray:
    """A [0, 1] image from the tiny gate's training distribution, cropped to ``rows x columns``."""
    size = max(rows, columns)
    return synthetic_radiographs(1, size, seed=seed)[0][:rows, :columns].copy()


def make_dx_dataset(
    pixels: np.ndarray | None = None,
    *,
    rows: int = 300,
    columns: int = 260,
    seed: int = 1,
    **tags: object,
) -> pydicom.Dataset:
    """A minimal DX dataset (16-bit MONOCHROME2) holding ``pixels`` (a [0, 1] image)."""
    if pixels is None:
        pixels = make_spine_like(rows, columns, seed=seed)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(DX_SOP_CLASS)
    ds.SOPClassUID = DX_SOP_CLASS
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.clip(pixels, 0, 1) * 4095).round().astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(name="dx_dataset")
def dx_dataset_fixture() -> Callable[..., pydicom.Dataset]:
    """The :func:`make_dx_dataset` factory."""
    return make_dx_dataset


@pytest.fixture(name="spine_like")
def spine_like_fixture() -> Callable[..., np.ndarray]:
    """The :func:`make_spine_like` factory."""
    return make_spine_like

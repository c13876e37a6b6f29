"""Real annotation files from torchxrayvision's package data, and placeholder images for them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def txv_data(name: str) -> Path:
    """A file of torchxrayvision's ``data`` folder, found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchxrayvision is not installed (pip install -e .[test])")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.exists():
        raise RuntimeError(f"torchxrayvision ships no {name}")
    return path


def link(target: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or target.name)
    path.symlink_to(target)
    return path


def placeholder_dicom(path: Path, columns: int, rows: int) -> Path:
    """A MONOCHROME2 8-bit image of the given size: a gradient, so the pixels are not all equal."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.tile(np.linspace(0, 255, columns, dtype=np.uint8), (rows, 1)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def placeholder_png(path: Path, columns: int, rows: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((rows, columns)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path

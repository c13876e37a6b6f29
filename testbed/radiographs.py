"""The real radiographs of pydicom-data: RG1 (a CR chest PA) and RG3 (a tibia), and new instances of RG1."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"  # the chest PA in pydicom-data
RG3_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"  # the tibia


def radiograph(name: str) -> Path:
    """A real file from pydicom-data; fails loudly if the package is missing."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise RuntimeError(f"{name} not found: install pydicom-data (pip install -e .[test])")
    return Path(path)


def rg1_copy(folder: Path, name: str = "copy.dcm", **changes: object) -> Path:
    """RG1_UNCI as a new instance of the same study (a new SOP Instance UID), with ``changes``."""
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path

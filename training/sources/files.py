"""Reading the files public CXR data sets ship: CSV tables (plain, gzip or one-member zip) and
image headers."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image
from pydicom import dcmread

#: width, height in pixels of the image at a path
ImageSize = Callable[[Path], tuple[int, int]]

DICOM_SUFFIXES = (".dcm", ".dicom")


class MissingData(FileNotFoundError):
    """The folder does not hold the data set's layout; the message names what was looked for."""


def find(root: Path, *names: str) -> Path:
    """The first of ``names`` (relative to ``root``) that exists."""
    for name in names:
        if (root / name).exists():
            return root / name
    raise MissingData(f"{root} holds none of: {', '.join(names)}")


def _text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8")  # type: ignore[return-value]
    if path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        members = [m for m in archive.namelist() if m.endswith(".csv")]
        if len(members) != 1:
            raise MissingData(f"{path} should hold one CSV file, holds {members}")
        return io.TextIOWrapper(archive.open(members[0]), encoding="utf-8", newline="")
    return path.open(newline="", encoding="utf-8")  # type: ignore[return-value]


def rows(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV table as dicts of strings (an unnamed index column is dropped)."""
    with _text(path) as handle:
        for row in csv.DictReader(handle):
            row.pop("", None)
            yield row


def raw_rows(path: Path) -> Iterator[list[str]]:
    """The rows of a CSV table whose header cannot name its columns (NIH's ``Bbox [x,y,w,h]``)."""
    with _text(path) as handle:
        reader = csv.reader(handle)
        next(reader, None)
        yield from reader


def header_size(path: Path) -> tuple[int, int]:
    """Width and height from the file's header alone (DICOM Columns/Rows, or the image size)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as image:
        return image.size


def number(value: str | None) -> float | None:
    """A CSV cell as a float; blank is None."""
    if value is None or not value.strip():
        return None
    return float(value)

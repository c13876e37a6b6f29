"""Reading the files public CXR data sets ship: CSV tables (plain, gzip or one-member zip) and
image headers; and each data set's layout, as ``train dataset --help`` and docs/training.md show it."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from pydicom import dcmread

from training.errors import Refused

#: width, height in pixels of the image at a path
ImageSize = Callable[[Path], tuple[int, int]]

DICOM_SUFFIXES = (".dcm", ".dicom")


class MissingData(Refused, FileNotFoundError):
    """The folder does not hold the data set's layout (a file, or a column of a table); the message
    names what was looked for and where."""


class UnusableImage(Refused, OSError):
    """An image that is missing or does not open; the message names the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Table:
    """A table a builder reads: the names it is looked for under (the first found is read) and the
    columns it must have."""

    names: tuple[str, ...]
    columns: tuple[str, ...]
    optional: tuple[str, ...] = ()  # read when present

    def describe(self) -> str:
        columns = ", ".join([*self.columns, *(f"[{c}]" for c in self.optional)])
        return f"{' or '.join(self.names)}" + (f" ({columns})" if columns else "")


@dataclass(frozen=True)
class Layout:
    """What a data set's folder holds for the builders, as the data set ships it."""

    tables: tuple[Table, ...]
    images: str  # where the images are, relative to the folder

    def describe(self) -> list[str]:
        return [table.describe() for table in self.tables] + [f"images: {self.images}"]


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


def rows(path: Path, columns: Sequence[str] = (), one_of: Sequence[str] = ()) -> Iterator[dict[str, str]]:
    """The rows of a CSV table as dicts of strings (an unnamed index column is dropped).

    ``columns``: those the caller reads; ``one_of``: at least one of these. A table without them is
    ``MissingData`` naming the file and the column, before any row is read.
    """
    with _text(path) as handle:
        reader = csv.DictReader(handle)
        header = [name for name in (reader.fieldnames or []) if name]
        missing = [name for name in columns if name not in header]
        if one_of and not set(one_of) & set(header):
            missing.append(" or ".join(one_of))
        if missing:
            raise MissingData(f"{path}: no column {', '.join(repr(m) for m in missing)} "
                              f"(its columns: {', '.join(header[:20]) or 'none'}{', ...' if len(header) > 20 else ''})")
        for row in reader:
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


def checked_size(path: Path) -> tuple[int, int]:
    """Width and height of an image known to open: a DICOM file whose header reads, with Rows and
    Columns, or a file PIL opens and verifies. Anything else is an ``UnusableImage`` saying why."""
    if not path.is_file():
        raise UnusableImage(path, "no such file")
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return int(ds.Columns), int(ds.Rows)
        with Image.open(path) as image:
            size = image.size
            image.verify()
            return size
    except Exception as exc:  # whatever the reader raises, the verdict is the same: it does not open
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnusableImage(path, f"does not open ({type(exc).__name__}: {first[:200]})") from exc


def number(value: str | None) -> float | None:
    """A CSV cell as a float; blank is None."""
    if value is None or not value.strip():
        return None
    return float(value)

"""Received instances on disk, byte for byte as they arrived (DICOM Part 10 files)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: str) -> bool:
    """A UID as PS3.5 9.1 defines it: digits and dots, no leading zeros, at most 64 characters."""
    return 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


class InstanceStore:
    """Files under ``root/<study>/<series>/<sop>.dcm``, each placed atomically once fully received."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for name, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
            if not valid_uid(uid):
                raise ValueError(f"invalid {name} UID {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def sync(self, incoming: Path) -> None:
        """Force a received file to disk (when ``fsync`` is on); may run on another thread."""
        if self.fsync:
            with incoming.open("rb") as fh:
                os.fsync(fh.fileno())

    def place(self, incoming: Path, relative: str) -> None:
        """Move a completely received (and synced) file to ``relative``.

        A rename when ``incoming`` is on the storage file system (the node receives into a folder
        under the root), otherwise a copy. Either way a reader never sees a partial file.
        """
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(incoming, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy(incoming, target)
        if self.fsync:
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _copy(self, source: Path, target: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def same_device_as(self, folder: Path) -> bool:
        return os.stat(folder).st_dev == os.stat(self.root).st_dev

    def path(self, relative: str) -> Path:
        return self.root / relative

    def remove(self, relative: str) -> int:
        """Delete a stored file (already gone is fine) and the series and study folders it leaves
        empty; the bytes it held."""
        target = self.root / relative
        try:
            size = target.stat().st_size
            target.unlink()
        except FileNotFoundError:
            size = 0
        for folder in (target.parent, target.parent.parent):
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): the study still has files
                break
        return size

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def removed(when: datetime) -> str:
    """What a reader of a removed image is told."""
    return f"its images were removed from this node on {when:%Y-%m-%d} (node.keep_images_days); the PACS keeps them"

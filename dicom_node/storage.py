"""Received instances on disk, byte for byte as they arrived (DICOM Part 10 files)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: str) -> bool:
    """A UID as PS3.5 9.1 defines it: digits and dots, no leading zeros, at most 64 characters."""
    return 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


class InstanceStore:
    """Files under ``root/<study>/<series>/<sop>.dcm``, written atomically (temp file, fsync, rename)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for name, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
            if not valid_uid(uid):
                raise ValueError(f"invalid {name} UID {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def write(self, relative: str, data: bytes | memoryview) -> int:
        """Write ``data`` at ``relative``; return its size. A reader never sees a partial file."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(data)

    def remove(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

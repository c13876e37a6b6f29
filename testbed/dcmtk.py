"""DCMTK's storescu, the real peer most modalities and PACS behave like."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DCMTK_STORESCU = "/usr/bin/storescu"  # a venv's PATH would find pynetdicom's app of the same name


def storescu(port: int, *files: Path, calling: str = "STORESCU", called: str = "RADVLM",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu, the real peer most modalities and PACS behave like."""
    if shutil.which(DCMTK_STORESCU) is None:
        raise RuntimeError("DCMTK storescu missing: apt-get install dcmtk")
    cmd = [DCMTK_STORESCU, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

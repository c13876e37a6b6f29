"""Service processes for tests: the real ``radvlm-pacs`` commands, with logs kept for failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENTRY = [sys.executable, "-m", "radvlm_pacs"]


@contextmanager
def service(name: str, args: list[str], env: dict[str, str], logs: Path) -> Iterator[subprocess.Popen]:
    """Start ``radvlm-pacs ARGS`` in its own process group; kill the group afterwards."""
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / f"{name}.log").open("ab")
    process = subprocess.Popen([*ENTRY, *args], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def kill_hard(process: subprocess.Popen) -> None:
    """SIGKILL the whole group: what a crash or an OOM kill does to a worker."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

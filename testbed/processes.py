"""Service processes for tests and benchmarks: the real ``radvlm-pacs`` commands, with logs kept for failures."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENTRY = [sys.executable, "-m", "radvlm_pacs"]


@contextmanager
def service(name: str, args: list[str], env: dict[str, str], logs: Path, *, entry: list[str] = ENTRY,
            cwd: Path | None = None, stop_timeout: float = 15) -> Iterator[subprocess.Popen]:
    """Start ``radvlm-pacs ARGS`` (``entry`` + ``args``) in its own process group, its output in
    ``logs/NAME.log``; SIGTERM to the group afterwards, SIGKILL if it has not stopped ``stop_timeout`` s later."""
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / f"{name}.log").open("ab")
    process = subprocess.Popen([*entry, *args], env={**os.environ, **env}, cwd=cwd, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def kill_hard(process: subprocess.Popen) -> None:
    """SIGKILL the whole group: what a crash or an OOM kill does to a worker."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class PrivateRedis:
    """A Redis of the test's own on a free port, as production runs it (append-only file, here fsynced on
    every write), so that a test can kill and restart it without touching the machine's Redis."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        assert self.process is not None
        kill_hard(self.process)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb in a temporary folder, a free port), so that a test
    can stop and start it without touching the machine's server. Run as ``postgres`` when the tests run
    as root, since the server refuses root."""

    def __init__(self, port: int) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries missing: apt-get install postgresql")
        self.bin = Path(bins[-1]).parent
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="radvlm-pg-"))
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.folder / "data"), "-U", "postgres", "-A", "trust", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-o", options, "-l", str(self.folder / "log"), "-w",
                  "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: the server dies without a checkpoint, as in a crash (it recovers at start)."""
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)


def serve_env(tmp_path: Path, database_url: str, node_port: int, api_port: int, destinations: list[dict],
              **extra: str) -> dict[str, str]:
    """``radvlm-pacs serve`` on loopback for a test: scripted model, quick completion, the given destinations."""
    return {"RADVLM_DATABASE_URL": database_url, "RADVLM_STORAGE_DIR": str(tmp_path / "dicom"),
            "RADVLM_NODE__PORT": str(node_port), "RADVLM_NODE__BIND_ADDRESS": "127.0.0.1",
            "RADVLM_NODE__STABLE_AGE_S": "1", "RADVLM_NODE__COMPLETION_POLL_S": "0.2",
            "RADVLM_NODE__DISK_RESERVE_MB": "1", "RADVLM_NODE__METRICS_PORT": "0",
            "RADVLM_API__PORT": str(api_port), "RADVLM_API__BIND_ADDRESS": "127.0.0.1",
            "RADVLM_MODEL__BACKEND": "scripted", "RADVLM_DESTINATIONS": json.dumps(destinations), **extra}


def production_env(tmp_path: Path, database_url: str, broker_url: str, port: int, **extra: str) -> dict[str, str]:
    """The production layout (``node``, ``worker``, ``api`` apart, over ``broker_url``) on loopback for a test:
    scripted model, quick completion, metrics on free ports."""
    return {
        "RADVLM_DATABASE_URL": database_url, "RADVLM_BROKER_URL": broker_url,
        "RADVLM_STORAGE_DIR": str(tmp_path / "dicom"), "RADVLM_NODE__PORT": str(port),
        "RADVLM_NODE__BIND_ADDRESS": "127.0.0.1", "RADVLM_NODE__STABLE_AGE_S": "1",
        "RADVLM_NODE__COMPLETION_POLL_S": "0.2", "RADVLM_NODE__DISK_RESERVE_MB": "1",
        "RADVLM_MODEL__BACKEND": "scripted", "RADVLM_LOG_LEVEL": "INFO",
        "RADVLM_NODE__METRICS_PORT": "0", "RADVLM_WORKER__METRICS_PORT": "0", **extra,
    }

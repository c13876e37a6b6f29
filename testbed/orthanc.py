"""A real Orthanc (Debian's package) started on loopback ports with a throwaway configuration."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.network import free_port

ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    ae_title: str

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=60) as rsp:
            payload = rsp.read()
        return json.loads(payload) if payload else None

    def upload(self, path: Path) -> str:
        return str(self.request("POST", "/instances", raw=path.read_bytes())["ID"])

    def send(self, modality: str, *resources: str) -> Any:
        return self.request("POST", f"/modalities/{modality}/store",
                            {"Resources": list(resources), "Synchronous": True})


@contextmanager
def running_orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]], ae_title: str = "ORTHANC",
                    dicom_port: int | None = None, extra: dict[str, Any] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with ``modalities`` (name -> AE, host, port) and ``extra`` settings; stop it afterwards."""
    if shutil.which(ORTHANC) is None:
        raise RuntimeError("Orthanc missing: apt-get install orthanc")
    workdir.mkdir(parents=True, exist_ok=True)
    orthanc = Orthanc(http_port=free_port(), dicom_port=dicom_port or free_port(), ae_title=ae_title)
    config = {
        "Name": "radvlm-test", "HttpPort": orthanc.http_port, "DicomPort": orthanc.dicom_port,
        "DicomAet": ae_title, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "SaveJobs": False, "Plugins": [], "DicomCheckCalledAet": False,
        "DicomModalities": {name: list(spec) for name, spec in modalities.items()},
        **(extra or {}),
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                orthanc.request("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: see {workdir / 'orthanc.log'}")
                time.sleep(0.1)
        yield orthanc
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

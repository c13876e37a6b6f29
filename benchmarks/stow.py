"""STOW-RS: one large upload to the node's API and, as the baseline in the same run, to Orthanc's DICOMweb
plugin: time, MiB/s and the receiver's peak memory (VmHWM), so that "streamed to disk, never held in
memory" is a figure and not a claim.

Sends the same N synthetic 2048x2048 16-bit DX instances (8 MiB each) as one multipart/related body,
streamed by the client from the files, to ``radvlm-pacs api`` (SQLite, fsync on) and to Orthanc.

    .venv/bin/python benchmarks/stow.py [--count 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import free_port, make_instances, wait_listening  # noqa: E402

BOUNDARY = "radvlm-bench-boundary"
TOKEN = "benchmark sender token"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def body(files: list[Path]) -> Iterator[bytes]:
    """The multipart body, read from disk 1 MiB at a time: the client holds no more than that."""
    for path in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def upload(url: str, files: list[Path], headers: dict[str, str]) -> tuple[float, int]:
    """Send; return the seconds and the HTTP status, having checked that every instance is listed as stored."""
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    start = time.perf_counter()
    rsp = httpx.post(url, content=body(files), headers={**headers, "Content-Type": content_type,
                                                          "Accept": "application/dicom+json"}, timeout=3600)
    elapsed = time.perf_counter() - start
    stored = len(rsp.json().get("00081199", {}).get("Value", []))
    if stored != len(files):
        raise RuntimeError(f"{url}: {stored} of {len(files)} instances stored (HTTP {rsp.status_code})")
    return elapsed, rsp.status_code


def run_node(work: Path, files: list[Path]) -> tuple[float, int, float, float]:
    port = free_port()
    users = [{"name": "bench", "role": "sender", "ae_title": "BENCH",
              "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]
    env = {**os.environ, "RADVLM_DATABASE_URL": f"sqlite:///{work / 'radvlm.sqlite'}",
           "RADVLM_STORAGE_DIR": str(work / "dicom"), "RADVLM_API__PORT": str(port),
           "RADVLM_API__USERS": json.dumps(users), "RADVLM_NODE__DISK_RESERVE_MB": "1", "RADVLM_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "radvlm_pacs", "api"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc)
        idle = peak_rss_mib(proc.pid)
        elapsed, status = upload(f"http://127.0.0.1:{port}/dicom-web/studies", files,
                                 {"Authorization": f"Bearer {TOKEN}"})
        return elapsed, status, idle, peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_orthanc(work: Path, files: list[Path]) -> tuple[float, int, float, float]:
    from testbed.orthanc import running_orthanc

    extra = {"Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with running_orthanc(work / "orthanc", {}, extra=extra) as orthanc:
        pid = int(subprocess.run(["pgrep", "-f", str(work / "orthanc" / "orthanc.json")], capture_output=True,
                                 text=True).stdout.split()[0])
        idle = peak_rss_mib(pid)
        elapsed, status = upload(f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies", files, {})
        return elapsed, status, idle, peak_rss_mib(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="radvlm-stow-") as scratch:
        work = Path(scratch)
        files = make_instances(work, args.count)
        mib = sum(f.stat().st_size for f in files) / (1 << 20)
        print(f"one STOW-RS request: {args.count} DX instances, {mib:.0f} MiB, streamed from disk by the client")
        print(f"{'receiver':<22}{'HTTP':>6}{'s':>8}{'MiB/s':>8}{'RSS idle MiB':>14}{'RSS peak MiB':>14}")
        for name, run in (("radvlm-pacs api", run_node), ("Orthanc DICOMweb", run_orthanc)):
            (work / name).mkdir()
            elapsed, status, idle, peak = run(work / name, files)
            print(f"{name:<22}{status:>6}{elapsed:>8.1f}{mib / elapsed:>8.1f}{idle:>14.1f}{peak:>14.1f}")


if __name__ == "__main__":
    main()

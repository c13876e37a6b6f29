"""Ingest throughput: the node against DCMTK storescp, Orthanc and a discard-only receiver.

Sends the same N synthetic 2048x2048 16-bit DX instances (8 MiB each) over one association with
DCMTK storescu to each receiver on loopback, in rounds of one run per receiver (three rounds by
default), and prints the median instances/s and MiB/s with the node's ratios. The node runs as
configured for production: its own process, PostgreSQL, fsync on (as Orthanc's default
SyncStorageArea), and once more with fsync off. The discard-only receiver is the node's own
association server (pynetdicom with the node's socket) answering success and keeping nothing.
The durable-only receiver is that server keeping each dataset on disk and doing nothing else (the
node's spool, fsync and rename; no header read, no database): it shows how near the ceiling any
receiver that answers only once the file is on disk can come on this machine in this run.

    .venv/bin/python benchmarks/ingest.py [--count 200] [--runs 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def make_instances(folder: Path, count: int) -> list[Path]:
    """N DX For Presentation instances, 2048x2048x16 bit, distinct UIDs, one study."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(2048, 2048), dtype=np.uint16).tobytes()
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^Mark", "DX"
        ds.BodyPartExamined, ds.ViewPosition, ds.InstanceNumber = "CHEST", "PA", index + 1
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Rows = ds.Columns = 2048
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = folder / f"dx{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")
    return elapsed


@contextmanager
def process(cmd: list[str], port: int, env: dict[str, str] | None = None,
            log: Path | None = None) -> Iterator[None]:
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text

    name = f"radvlm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


BROKER = "redis://127.0.0.1:6379/12"
CEILING, DURABLE = "discard-only (network ceiling)", "durable-only (spool, fsync, rename)"


def run_node(work: Path, files: list[Path], admin_url: str, fsync: bool) -> float:
    port = free_port()
    storage = work / "node"
    with postgres_database(admin_url) as url:
        env = {**os.environ, "RADVLM_DATABASE_URL": url, "RADVLM_STORAGE_DIR": str(storage),
               "RADVLM_NODE__PORT": str(port), "RADVLM_NODE__BIND_ADDRESS": "127.0.0.1",
               "RADVLM_NODE__DISK_RESERVE_MB": "64", "RADVLM_LOG_LEVEL": "WARNING",
               "RADVLM_NODE__FSYNC": str(fsync).lower(),
               "RADVLM_BROKER_URL": BROKER}  # the node hands complete studies to Celery; no worker needed
        with process([str(ROOT / ".venv/bin/radvlm-pacs"), "node"], port, env, work / "node.log"):
            elapsed = send(port, files, "RADVLM")
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as conn:
            stored = conn.execute(text("select count(*) from instances")).scalar_one()
        engine.dispose()
    if stored != len(files):
        raise RuntimeError(f"node recorded {stored} of {len(files)} instances")
    shutil.rmtree(storage)
    return elapsed


def run_storescp(work: Path, files: list[Path]) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    with process([STORESCP, "-pdu", "131072", "-od", str(out), "-aet", "STORESCP", str(port)], port):
        elapsed = send(port, files, "STORESCP")
    stored = len(list(out.iterdir()))
    shutil.rmtree(out)
    if stored != len(files):
        raise RuntimeError(f"storescp wrote {stored} of {len(files)} files")
    return elapsed


def run_orthanc(work: Path, files: list[Path]) -> float:
    from testbed.orthanc import running_orthanc

    with running_orthanc(work / "orthanc", {}) as orthanc:
        elapsed = send(orthanc.dicom_port, files, "ORTHANC")
        stored = orthanc.request("GET", "/statistics")["CountInstances"]
    shutil.rmtree(work / "orthanc")
    if stored != len(files):
        raise RuntimeError(f"Orthanc holds {stored} of {len(files)} instances")
    return elapsed


def run_discard(work: Path, files: list[Path]) -> float:
    port = free_port()
    cmd = [sys.executable, __file__, "--discard-server", str(port)]
    with process(cmd, port):
        return send(port, files, "DISCARD")


def run_durable(work: Path, files: list[Path]) -> float:
    port = free_port()
    out = work / "durable"
    cmd = [sys.executable, __file__, "--durable-server", str(port), str(out)]
    with process(cmd, port):
        elapsed = send(port, files, "DURABLE")
    stored = len(list((out / "instances").iterdir()))
    shutil.rmtree(out)
    if stored != len(files):
        raise RuntimeError(f"durable-only receiver kept {stored} of {len(files)} files")
    return elapsed


def bare_server(port: int, keep_in: Path | None) -> None:
    """The node's association server (contexts, PDU size, socket) answering success. With ``keep_in``, each
    dataset is kept as the node keeps it (spool, fsync, rename) and nothing more is done; without, nothing
    is kept."""
    from pynetdicom import _config, evt

    from dicom_node import spool
    from dicom_node.server import INCOMING, build_ae
    from dicom_node.transport import serve
    from records.settings import NodeSettings
    from records.storage import InstanceStore

    def handle_store(event) -> int:  # type: ignore[no-untyped-def]
        if keep_in is not None:
            incoming = Path(event.dataset_path)
            spool.finish(incoming)
            store.sync(incoming)
            store.place(incoming, f"instances/{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    if keep_in is not None:
        store = InstanceStore(keep_in, fsync=True)
        _config.STORE_RECV_CHUNKED_DATASET = True
        spool.install(keep_in / INCOMING, writeback=True)
    ae = build_ae(NodeSettings(ae_title="BARE", port=port))
    ae.require_called_aet = False
    serve(ae, ("127.0.0.1", port), [(evt.EVT_C_STORE, handle_store)])
    threading.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", default=POSTGRES_ADMIN, help="admin URL to create a scratch database")
    parser.add_argument("--discard-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--durable-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.discard_server:
        bare_server(args.discard_server, None)
        return
    if args.durable_server:
        bare_server(int(args.durable_server[0]), Path(args.durable_server[1]))
        return

    receivers: dict[str, Callable[[Path, list[Path]], float]] = {
        "radvlm-pacs node (PostgreSQL, fsync: the default)": lambda w, f: run_node(w, f, args.database_url, True),
        "radvlm-pacs node (PostgreSQL, fsync = false)": lambda w, f: run_node(w, f, args.database_url, False),
        "DCMTK storescp -pdu 131072": run_storescp,
        "Orthanc": run_orthanc,
        CEILING: run_discard,
        DURABLE: run_durable,
    }
    with tempfile.TemporaryDirectory(prefix="radvlm-ingest-") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        files = make_instances(work / "in", args.count)
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"{args.count} instances, {mib:.0f} MiB, one association each run, {args.runs} rounds, median\n")
        # rounds of one run per receiver, so that a slower spell of the machine falls on all of them
        times: dict[str, list[float]] = {name: [] for name in receivers}
        for _ in range(args.runs):
            for name, run in receivers.items():
                os.sync()  # no run pays for writing back the input files or an earlier run's
                times[name].append(run(work, files))
        medians = {name: statistics.median(runs) for name, runs in times.items()}
        for name, runs in times.items():
            print(f"  {name}: runs {', '.join(f'{t:.1f}' for t in runs)} s", flush=True)

    print("\n| receiver | inst/s | MiB/s |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {args.count / seconds:.1f} | {mib / seconds:.0f} |")
    for node in [name for name in medians if name.startswith("radvlm-pacs")]:
        print(f"\n{node}:")
        for name, target in (("DCMTK storescp -pdu 131072", 1.5), ("Orthanc", 2.5),
                             (CEILING, 0.6)):
            ratio = medians[name] / medians[node]
            print(f"  / {name}: {ratio:.2f}x (target {target}x) {'OK' if ratio >= target else 'BELOW TARGET'}")
        print(f"  / {DURABLE}: {medians[DURABLE] / medians[node]:.2f}x (no target)")
    print(f"\n{DURABLE} / {CEILING}: {medians[CEILING] / medians[DURABLE]:.2f}x: the most of the ceiling that "
          "a receiver answering only once each file is on disk reached in this run")


if __name__ == "__main__":
    main()

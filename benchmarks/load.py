"""Load: 20 concurrent associations of 50 instances each, round after round, against the node process.

Each round sends 1,000 new DX instances (256x256, 16 bit) of 10 studies; every association also sends
5 instances of its neighbour again, so studies arrive from several associations at once and duplicates
race. After each round the script waits for the studies to complete and checks the database: every
instance stored exactly once (and one file each), every study completed once. It prints per round the
node's resident memory, and beside the node the same load sent to DCMTK's storescp (--fork), measured
in the same run, as the baseline.

    .venv/bin/python benchmarks/load.py [--rounds 5] [--associations 20] [--per-association 50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ingest import BROKER, POSTGRES_ADMIN, STORESCP, free_port, postgres_database, wait_listening  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402

from records.tables import Instance, Study, StudyVersion  # noqa: E402

STUDIES_PER_ROUND = 10
PIXELS = np.random.default_rng(0).integers(0, 4096, size=(256, 256), dtype=np.uint16).tobytes()


def instance(study: str, series: str, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "LOAD", "Load^Test", "DX"
    ds.BodyPartExamined, ds.ViewPosition, ds.InstanceNumber = "CHEST", "PA", number
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = PIXELS
    return ds


def round_batches(associations: int, per: int) -> tuple[list[list[Dataset]], list[str]]:
    """What each association sends: its own instances, then 5 of its neighbour's again."""
    studies = [(generate_uid(), generate_uid()) for _ in range(STUDIES_PER_ROUND)]
    own = [[instance(*studies[(a + i) % STUDIES_PER_ROUND], i + 1) for i in range(per)]
           for a in range(associations)]
    batches = [own[a] + own[(a + 1) % associations][:5] for a in range(associations)]
    return batches, [study for study, _ in studies]


def send_all(port: int, called: str, batches: list[list[Dataset]]) -> tuple[float, int]:
    """One association per batch, all at once; returns the seconds and the C-STOREs not answered 0x0000."""
    failures = []

    def one(batch: list[Dataset]) -> None:
        ae = AE(ae_title="LOADTEST")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            failures.append(len(batch))
            return
        for sent, ds in enumerate(batch):
            if not assoc.is_established:  # the peer aborted: the rest of the batch is not sent
                failures.append(len(batch) - sent)
                return
            status = assoc.send_c_store(ds)
            if int(status.get("Status", -1)) != 0:
                failures.append(1)
        assoc.release()

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, sum(failures)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def storescp_seconds(work: Path, batches: list[list[Dataset]]) -> tuple[float, int]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen([STORESCP, "--fork", "-od", str(out), "-aet", "STORESCP", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        return send_all(port, "STORESCP", batches)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--per-association", type=int, default=50)
    parser.add_argument("--database-url", default=POSTGRES_ADMIN, help="admin URL to create a scratch database")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as folder, postgres_database(args.database_url) as url:
        work = Path(folder)
        port = free_port()
        env = {**os.environ, "RADVLM_DATABASE_URL": url, "RADVLM_STORAGE_DIR": str(work / "node"),
               "RADVLM_NODE__PORT": str(port), "RADVLM_NODE__BIND_ADDRESS": "127.0.0.1",
               "RADVLM_NODE__MAX_ASSOCIATIONS": str(args.associations + 5), "RADVLM_NODE__STABLE_AGE_S": "2",
               "RADVLM_NODE__DISK_RESERVE_MB": "64", "RADVLM_LOG_LEVEL": "WARNING", "RADVLM_NODE__METRICS_PORT": "0",
               "RADVLM_BROKER_URL": BROKER}
        log = (work / "node.log").open("w")
        node = subprocess.Popen([sys.executable, "-m", "radvlm_pacs", "node"], env=env, cwd=HERE.parent,
                                stdout=log, stderr=subprocess.STDOUT)
        engine = create_engine(url)
        try:
            wait_listening(port, node)
            print(f"{args.associations} associations x {args.per_association} instances (+5 repeats each), "
                  f"{STUDIES_PER_ROUND} studies per round; node on PostgreSQL, fsync on")
            print(f"{'round':>5} {'node s':>7} {'inst/s':>7} {'storescp s':>10} {'inst/s':>7} {'stored':>7} "
                  f"{'files':>6} {'completed':>9} {'node RSS MiB':>12}")
            first_rss = None
            for number in range(1, args.rounds + 1):
                batches, studies = round_batches(args.associations, args.per_association)
                unique = args.associations * args.per_association
                seconds, failures = send_all(port, "RADVLM", batches)
                baseline, baseline_failures = storescp_seconds(work, batches)
                if baseline_failures:
                    print(f"  storescp: {baseline_failures} C-STORE(s) not stored (its associations aborted)")
                deadline = time.monotonic() + 120
                with engine.connect() as conn:
                    while True:
                        completed = conn.scalar(select(func.count()).select_from(StudyVersion).join(Study).where(
                            Study.study_instance_uid.in_(studies)))
                        if completed >= len(studies) or time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
                    time.sleep(3)  # a second completion of any study would show now
                    completed = conn.scalar(select(func.count()).select_from(StudyVersion).join(Study).where(
                        Study.study_instance_uid.in_(studies)))
                    stored = conn.scalar(select(func.count()).select_from(Instance).join(Study).where(
                        Study.study_instance_uid.in_(studies)))
                files = sum(1 for study in studies for _ in (work / "node").glob(f"{study}/*/*.dcm"))
                rss = rss_mib(node.pid)
                first_rss = first_rss or rss
                print(f"{number:>5} {seconds:>7.1f} {unique / seconds:>7.0f} {baseline:>10.1f} "
                      f"{unique / baseline:>7.0f} {stored:>7} {files:>6} {completed:>9} {rss:>12.1f}", flush=True)
                if failures or stored != unique or files != unique or completed != len(studies):
                    print(f"  round {number}: {failures} C-STORE failure(s); expected {unique} stored and "
                          f"{len(studies)} completed once")
                    ok = False
            print(f"node memory after round 1: {first_rss:.1f} MiB, after round {args.rounds}: {rss:.1f} MiB "
                  f"({rss - first_rss:+.1f} MiB)")
        finally:
            engine.dispose()
            node.terminate()
            node.wait(timeout=30)
            log.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

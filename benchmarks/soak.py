"""Soak: studies sent for --minutes against ``serve`` (and the production layout); resident memory each --interval.

--associations studies are sent at once, each by DCMTK storescu: copies of pydicom-data's RG1_UNCI chest
(CR PA, 1955x1841, 7 MiB) with fresh UIDs, a lateral of it (skipped by selection), RG3's tibia (skipped as
not chest) and one copy deflated (inflated in memory by reception and analysis; sent on an association of
its own). ``serve`` runs with the scripted model on a temporary SQLite database and storage; the production
layout runs ``node``, ``api``, a gpu ``worker`` (scripted model) and an io ``worker`` on a PostgreSQL
database made for the run and an empty Redis database. Every --interval seconds one line: minutes elapsed,
studies sent, studies analysed (from the database), studies finished otherwise or still waiting (other),
and each service's resident memory (VmRSS, its child processes included), in MiB. At the end, per service,
the resident memory of the first line after --warmup minutes against the last, and the growth per hour (from
those two, and the least-squares slope of every line after the warm-up): a service that keeps nothing per
study stays flat after warm-up. The services get this script's environment: MALLOC_ARENA_MAX=16 gives them
glibc's default number of malloc arenas on 2 cores, as before radvlm_pacs limited it. The files stay
in the temporary storage for the run: about 36 MiB a study, 6.5 GB for 30 minutes at the default rate.

--trace runs ``serve`` with tracemalloc on (--trace-frames, from after its imports: traced, they take minutes)
and a thread (in this script, not in the product) that takes a snapshot after the warm-up and, each
interval, writes the 15 largest differences against it by traceback; the last is printed at the end.
Tracing slows ``serve`` about tenfold (up to a minute a study on 2 busy cores): give it one study a minute,
--copies 1, --associations 1. Its resident memory then includes tracemalloc's own tables: compare RSS
untraced.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--interval 60] [--layout serve|production|both]
        [--studies-per-minute 6] [--associations 4] [--copies 2] [--warmup 3] [--trace [--trace-frames 25]]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import pydicom  # noqa: E402
from ingest import POSTGRES_ADMIN, STORESCU, free_port, postgres_database, wait_listening  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402

from records.tables import Study, StudyState  # noqa: E402
from testbed.processes import ENTRY, service  # noqa: E402

REDIS_DBS = range(13, 16)  # the tests use 11, ingest.py and load.py 12

# Run as ``python -c TRACER OUT INTERVAL WARMUP FRAMES``: ``serve`` in the main thread (its signal handlers need it),
# traced from after its imports, and beside it a thread writing the largest allocation differences since the
# warm-up snapshot.
TRACER = r"""
import sys, threading, time, tracemalloc
from pathlib import Path

out, interval, warmup, frames = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

def trace():
    time.sleep(warmup)
    base = tracemalloc.take_snapshot()  # unfiltered: filter_traces (fnmatch per trace) took minutes
    taken = time.monotonic()
    while True:
        time.sleep(interval)
        snapshot = tracemalloc.take_snapshot()
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"{(time.monotonic() - taken) / 60:.1f} min after the warm-up snapshot: traced "
                 f"{traced / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)"]
        for stat in snapshot.compare_to(base, "traceback")[:15]:
            lines.append(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks "
                         f"(now {stat.size / 1024:.1f} KiB in {stat.count} blocks)")
            lines += ["      " + line for line in stat.traceback.format(limit=8, most_recent_first=True)]
        part = out.with_suffix(".part")
        part.write_text("\n".join(lines) + "\n")
        part.replace(out)

import alembic.command, api.askers, api.main, dicom_node.server, radvlm_pacs, records.settings, uvicorn  # noqa
import radvlm.backends.scripted, results.outbox, worker.dispatch, worker.attempts, worker.model_thread  # noqa
tracemalloc.start(frames)  # after the imports: traced, they take minutes
threading.Thread(target=trace, name="tracemalloc", daemon=True).start()
sys.exit(radvlm_pacs.main(["serve"]))
"""


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` and of its descendants, in MiB (0 for a process gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue  # ended between the reads (or a kernel thread without VmRSS)
    return total / 1024


class StudyMaker:
    """New studies from the pydicom-data radiographs: ``copies`` frontal chests, a lateral, a tibia, a deflated
    frontal; every UID fresh."""

    def __init__(self, copies: int) -> None:
        self.copies = copies
        chest, tibia = get_testdata_file("RG1_UNCI.dcm"), get_testdata_file("RG3_UNCI.dcm")
        if chest is None or tibia is None:
            raise SystemExit("pydicom-data is not installed: pip install pydicom-data")
        self.chest, self.tibia = Path(chest), Path(tibia)

    @staticmethod
    def _write(template: Path, path: Path, study: str, series: str, deflated: bool = False,
               **changes: object) -> Path:
        ds = pydicom.dcmread(template)  # read each time: a copy would share the template's elements
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if deflated:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
        return path

    def study(self, folder: Path, number: int) -> list[Path]:
        """The study's files in ``folder``, the deflated one last."""
        study, chest_series, other_series = generate_uid(), generate_uid(), generate_uid()
        accession = {"AccessionNumber": f"SOAK{number:06d}"}
        files = [self._write(self.chest, folder / f"chest{n}.dcm", study, chest_series, InstanceNumber=n + 1,
                             **accession) for n in range(self.copies)]
        files.append(self._write(self.chest, folder / "lateral.dcm", study, other_series, ViewPosition="LL",
                                 **accession))
        files.append(self._write(self.tibia, folder / "tibia.dcm", study, other_series, **accession))
        files.append(self._write(self.chest, folder / "deflated.dcm", study, chest_series, deflated=True,
                                 InstanceNumber=99, **accession))
        return files


class Sender:
    """A thread sending ``associations`` new studies at once, one per storescu, every ``associations`` periods
    (at once when the last ones took longer); each study's deflated file last, on an association of its own."""

    def __init__(self, port: int, folder: Path, copies: int, period_s: float, associations: int) -> None:
        self.port, self.folder, self.period_s, self.associations = port, folder, period_s, associations
        self.maker = StudyMaker(copies)
        self.sent = self.failed = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def _one(self, number: int) -> None:
        folder = self.folder / str(number)
        folder.mkdir()
        *files, deflated = self.maker.study(folder, number)
        # offered deflate, storescu would deflate every file: the deflated one goes on an association of its own
        results = [self._send(files), self._send([deflated], "-xd")]
        for path in [*files, deflated]:
            path.unlink()
        folder.rmdir()
        failures = [result for result in results if result.returncode != 0]
        with self._lock:
            if not failures:
                self.sent += 1
            else:
                self.failed += 1
                self.last_error = (failures[0].stderr or failures[0].stdout).strip()[-300:]

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            start = time.monotonic()
            threads = [threading.Thread(target=self._one, args=(number + n + 1,)) for n in range(self.associations)]
            number += self.associations
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self._stop.wait(max(0.0, self.period_s * self.associations - (time.monotonic() - start)))

    def _send(self, files: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([STORESCU, *options, "-aet", "SOAK", "-aec", "RADVLM", "127.0.0.1", str(self.port),
                               *map(str, files)], capture_output=True, text=True, timeout=300)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def spare_redis_db(stack: ExitStack) -> str:
    """The URL of an empty database on the machine's Redis, of those reserved for benchmarks; emptied again
    once the services have stopped (Celery leaves its results there)."""
    import redis

    for number in REDIS_DBS:
        url = f"redis://127.0.0.1:6379/{number}"
        client = redis.Redis.from_url(url)
        if client.dbsize() == 0:
            stack.callback(client.flushdb)
            return url
    raise SystemExit(f"no empty Redis database among {list(REDIS_DBS)} on 127.0.0.1:6379")


def common_env(work: Path, database_url: str, port: int, associations: int) -> dict[str, str]:
    return {"RADVLM_DATABASE_URL": database_url, "RADVLM_STORAGE_DIR": str(work / "dicom"),
            "RADVLM_NODE__PORT": str(port), "RADVLM_NODE__BIND_ADDRESS": "127.0.0.1",
            # one closing while the next opens must not find the limit reached
            "RADVLM_NODE__MAX_ASSOCIATIONS": str(associations + 5),
            "RADVLM_NODE__STABLE_AGE_S": "2", "RADVLM_NODE__COMPLETION_POLL_S": "0.5",
            "RADVLM_NODE__DISK_RESERVE_MB": "256", "RADVLM_NODE__METRICS_PORT": "0",
            "RADVLM_WORKER__METRICS_PORT": "0", "RADVLM_API__PORT": str(free_port()),
            "RADVLM_API__BIND_ADDRESS": "127.0.0.1", "RADVLM_MODEL__BACKEND": "scripted",
            "RADVLM_LOG_LEVEL": "INFO", "RADVLM_DESTINATIONS": json.dumps([])}


def studies_by_state(engine) -> dict[StudyState, int]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return dict(conn.execute(select(Study.state, func.count()).group_by(Study.state)).all())


def soak(layout: str, args: argparse.Namespace, work: Path, stack: ExitStack) -> bool:
    """Run one layout and print its lines; True when storescu never failed and every study sent was analysed."""
    port = free_port()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    trace = work / "tracemalloc.txt"
    if layout == "serve":
        url = f"sqlite:///{work / 'radvlm.db'}"
        env = common_env(work, url, port, args.associations)
        entry, command = ENTRY, ["serve"]
        if args.trace:
            entry = [sys.executable, "-c", TRACER]
            command = [str(trace), str(args.interval), str(args.warmup * 60), str(args.trace_frames)]
        services = {"serve": stack.enter_context(service("serve", command, env, logs, entry=entry, cwd=ROOT,
                                                         stop_timeout=30))}
    else:
        url = stack.enter_context(postgres_database(args.database_url))
        env = {**common_env(work, url, port, args.associations), "RADVLM_BROKER_URL": spare_redis_db(stack)}
        subprocess.run([*ENTRY, "db", "upgrade"], env={**os.environ, **env}, cwd=ROOT, check=True,
                       capture_output=True)  # once, before four processes would each try
        services = {name: stack.enter_context(service(name, command, env, logs, cwd=ROOT, stop_timeout=30))
                    for name, command in
                    (("node", ["node"]), ("api", ["api"]), ("gpu-worker", ["worker"]),
                     ("io-worker", ["worker", "--queues", "io"]))}
    wait_listening(port, services.get("serve") or services["node"], timeout=120)
    engine = create_engine(url)
    stack.callback(engine.dispose)
    (work / "outgoing").mkdir()
    sender = Sender(port, work / "outgoing", args.copies, 60 / args.studies_per_minute, args.associations)
    print(f"\n{layout}: {args.studies_per_minute:g} studies a minute, {args.associations} at once, for "
          f"{args.minutes:g} min; each {args.copies} frontal chest(s) + lateral + tibia + deflated frontal "
          f"(storescu); logs in {logs}", flush=True)
    names = list(services)
    print(f"{'min':>5} {'sent':>5} {'analysed':>8} {'other':>5}  " + " ".join(f"{n + ' MiB':>14}" for n in names),
          flush=True)
    start = time.monotonic()
    sender.start()
    rows: list[tuple[float, dict[str, float]]] = []
    ok = True
    try:
        for tick in range(1, int(args.minutes * 60 // args.interval) + 1):
            time.sleep(max(0.0, start + tick * args.interval - time.monotonic()))
            gone = [name for name, process in services.items() if process.poll() is not None]
            if gone:
                print(f"stopped: {', '.join(gone)} (see {logs})", flush=True)
                return False
            states = studies_by_state(engine)
            analysed = states.get(StudyState.analysed, 0)
            other = sum(states.values()) - analysed - states.get(StudyState.receiving, 0)
            minutes = (time.monotonic() - start) / 60
            rss = {name: rss_mib(process.pid) for name, process in services.items()}
            rows.append((minutes, rss))
            print(f"{minutes:>5.1f} {sender.sent:>5} {analysed:>8} {other:>5}  "
                  + " ".join(f"{rss[n]:>14.1f}" for n in names), flush=True)
    finally:
        sender.stop()
    if sender.failed:
        print(f"storescu failed {sender.failed} time(s), last: {sender.last_error}")
        ok = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the last studies complete and are analysed
        states = studies_by_state(engine)
        if not states.get(StudyState.receiving) and not states.get(StudyState.ready) \
                and not states.get(StudyState.analysing):
            break
        time.sleep(1)
    print(f"studies by state at the end: { {s.value: n for s, n in sorted(states.items())} }")
    if states.get(StudyState.analysed, 0) != sender.sent:
        print(f"  {sender.sent} studies sent, {states.get(StudyState.analysed, 0)} analysed")
        ok = False
    after = [row for row in rows if row[0] >= args.warmup]
    if len(after) < 2:
        print(f"too short to compare: fewer than two lines after the {args.warmup:g} min warm-up")
        return ok
    (first_min, first), (last_min, last) = after[0], after[-1]
    hours = (last_min - first_min) / 60
    for name in names:
        # the least-squares slope of every line after the warm-up: one line caught with transfers in flight
        # (tens of MiB each) weighs less than in first against last
        trend = statistics.linear_regression([m / 60 for m, _ in after], [r[name] for _, r in after]).slope
        print(f"{layout} {name}: {first[name]:.1f} MiB at {first_min:.1f} min, {last[name]:.1f} MiB at "
              f"{last_min:.1f} min: {(last[name] - first[name]) / hours:+.1f} MiB/hour (least squares over "
              f"{len(after)} lines: {trend:+.1f} MiB/hour)")
    if args.trace and trace.exists():
        print(f"tracemalloc, the largest differences since the warm-up (25 frames traced, 8 shown):\n"
              f"{trace.read_text()}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--interval", type=float, default=60, help="seconds between two memory lines")
    parser.add_argument("--warmup", type=float, default=3, help="minutes before the reference line")
    parser.add_argument("--layout", choices=["serve", "production", "both"], default="serve")
    parser.add_argument("--studies-per-minute", type=float, default=6)
    parser.add_argument("--copies", type=int, default=2, help="uncompressed frontal chest images per study")
    parser.add_argument("--associations", type=int, default=4, help="studies sent at once, each on its own "
                                                                     "association (the rate stays the same)")
    parser.add_argument("--trace", action="store_true", help="serve: tracemalloc differences since the warm-up")
    parser.add_argument("--trace-frames", type=int, default=25, help="frames of each traced allocation (fewer: "
                                                                      "faster)")
    parser.add_argument("--database-url", default=POSTGRES_ADMIN, help="admin URL to create a scratch database")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, database, files)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.interval <= 0 or args.studies_per_minute <= 0 or args.copies < 1 \
            or args.associations < 1:
        parser.error("--minutes, --interval, --studies-per-minute, --copies and --associations must be positive")
    # stopped by a signal, the services are stopped and the scratch database and folders removed all the same
    # (a background job's SIGINT may be ignored: it is restored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = True
    for layout in (["serve", "production"] if args.layout == "both" else [args.layout]):
        with ExitStack() as stack:
            if args.keep:
                work = args.keep / layout
                work.mkdir(parents=True, exist_ok=False)
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"soak-{layout}-")))
            ok = soak(layout, args, work, stack) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures: free ports, a fresh database (SQLite or PostgreSQL), real radiographs, a running node."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.server import Node
from records.clock import utcnow
from records.db import make_engine, make_session_factory, upgrade
from records.settings import NodeSettings, Settings
from records.storage import InstanceStore
from records.tables import Study, StudyState

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"  # the chest PA in pydicom-data
RG3_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"  # the tibia
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DCMTK_STORESCU = "/usr/bin/storescu"  # a venv's PATH would find pynetdicom's app of the same name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def radiograph(name: str) -> Path:
    """A real file from pydicom-data; fails loudly if the package is missing."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise RuntimeError(f"{name} not found: install pydicom-data (pip install -e .[test])")
    return Path(path)


def rg1_copy(folder: Path, name: str = "copy.dcm", **changes: object) -> Path:
    """RG1_UNCI as a new instance of the same study (a new SOP Instance UID), with ``changes``."""
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def storescu(port: int, *files: Path, calling: str = "STORESCU", called: str = "RADVLM",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu, the real peer most modalities and PACS behave like."""
    if shutil.which(DCMTK_STORESCU) is None:
        raise RuntimeError("DCMTK storescu missing: apt-get install dcmtk")
    cmd = [DCMTK_STORESCU, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def flushed_redis(db: int) -> str:
    """The URL of database ``db`` on the machine's Redis, emptied: each test module that needs a broker has its own."""
    import redis

    url = f"redis://127.0.0.1:6379/{db}"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (scripts/test.sh starts it)")
    return url


def _postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind the service supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'radvlm.sqlite'}"
        upgrade(url)
        yield url
        return
    if not _postgres_available():
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 (see README: start it)")
    name = f"radvlm_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate for 127.0.0.1 and two client certificates: one the CA signed,
    one self-signed (a stranger's)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=Test Hospital CA")
    for name, cn, san in (("server", "radvlm", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                          ("client", "PACS", "subjectAltName=DNS:pacs.example")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / f"{name}-key.pem"),
                 "-out", str(folder / f"{name}.csr"), "-subj", f"/CN={cn}")
        (folder / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(folder / f"{name}.pem"), "-days", "2",
                 "-extfile", str(folder / f"{name}.ext"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "stranger-key.pem"),
             "-out", str(folder / "stranger.pem"), "-days", "2", "-subj", "/CN=stranger")
    return Pki(ca=ca, server_cert=folder / "server.pem", server_key=folder / "server-key.pem",
               client_cert=folder / "client.pem", client_key=folder / "client-key.pem",
               stranger_cert=folder / "stranger.pem", stranger_key=folder / "stranger-key.pem")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'radvlm.sqlite'}"
    upgrade(url)
    return url


@dataclass
class RunningNode:
    """A node started in-process on a free port, with the ready events it emitted."""

    node: Node
    sessions: sessionmaker[Session]
    store: InstanceStore
    url: str
    ready: list[tuple[int, int]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.node.port


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Factory: start a node on ``url`` with node settings overridden by keyword."""
    started: list[RunningNode] = []

    def _start(url: str, storage: Path | None = None, on_ready: Callable[[int, int], None] | None = None,
               **node_overrides: object) -> RunningNode:
        overrides = {"port": 0, "bind_address": "127.0.0.1", "stable_age_s": 1.0, "completion_poll_s": 0.2,
                     "disk_reserve_mb": 1, "fsync": False, **node_overrides}
        settings = NodeSettings(**overrides)
        engine = make_engine(url, pre_ping=False)  # as `radvlm-pacs node` makes it
        sessions = make_session_factory(engine)
        store = InstanceStore(storage or tmp_path / f"dicom-{len(started)}", fsync=settings.fsync)
        running: RunningNode
        def record_and_forward(study_id: int, version: int) -> None:
            running.ready.append((study_id, version))
            if on_ready is not None:
                on_ready(study_id, version)

        node = Node(settings, sessions, store, on_ready=record_and_forward, clock=utcnow)
        running = RunningNode(node=node, sessions=sessions, store=store, url=url)
        node.start()
        started.append(running)
        return running

    yield _start
    for running in started:
        running.node.stop()


@pytest.fixture(autouse=True)
def _quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random LLaVA-OneVision checkpoint, built once per test session."""
    from radvlm.tiny_checkpoint import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-llava-onevision"))


def worker_context(running: RunningNode, backend, outputs=None, **settings):  # type: ignore[no-untyped-def]
    """What a worker holds, over the running node's database and storage, with ``backend``."""
    from results.outbox import Routing
    from worker.context import WorkerContext
    from worker.pipeline import AnalysisOptions

    return WorkerContext(settings=Settings(**settings), sessions=running.sessions, store=running.store,
                         options=AnalysisOptions(max_new_tokens=64), outputs=outputs or Routing(), _backend=backend)


@dataclass
class AnalysedNode:
    """A node that received RG1 (chest, analysed by the scripted model) and RG3 (tibia, not analysable),
    and the model thread and runner that analysed it, still running (its outbox loop delivers)."""

    running: RunningNode
    runner: object
    model_thread: object


@pytest.fixture
def analysed_node(sqlite_url: str, start_node) -> Iterator[AnalysedNode]:  # type: ignore[no-untyped-def]
    from radvlm.backends.scripted import ScriptedBackend
    from worker.dispatch import InProcessRunner
    from worker.model_thread import ModelThread

    holder: dict[str, InProcessRunner] = {}
    node = start_node(sqlite_url, on_ready=lambda s, v: holder["runner"](s, v))
    with ModelThread() as model_thread:
        runner = holder["runner"] = InProcessRunner(worker_context(node, ScriptedBackend()), model_thread)
        runner.start()
        assert storescu(node.port, radiograph("RG1_UNCI.dcm"), radiograph("RG3_UNCI.dcm")).returncode == 0

        def state(uid: str) -> StudyState | None:
            with node.sessions() as session:
                return session.scalar(select(Study.state).where(Study.study_instance_uid == uid))

        # both settled: the tibia too, or a test that asks about it could find it still receiving under load
        wait_for(lambda: state(RG1_STUDY) is StudyState.analysed and state(RG3_STUDY) is StudyState.nothing_to_analyse,
                 30)
        yield AnalysedNode(node, runner, model_thread)
        runner.close()


@contextmanager
def serving(app: object) -> Iterator[str]:
    """An ASGI app on a free loopback port (uvicorn in a thread) for the length of the block: its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)

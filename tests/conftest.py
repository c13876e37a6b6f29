"""Fixtures: a fresh database (SQLite or PostgreSQL), a test PKI, a running node, a node that analysed RG1 and RG3,
the tiny checkpoint, the production layout's broker. The helpers they use live in testbed/."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from dicom_node.server import Node
from records.clock import utcnow
from records.db import make_engine, make_session_factory, upgrade
from records.settings import NodeSettings, Settings
from records.storage import InstanceStore
from records.tables import Study, StudyState
from testbed.databases import POSTGRES_ADMIN_URL, flushed_redis, postgres_available
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.node import AnalysedNode, RunningNode, worker_context
from testbed.pki import Pki, make_pki
from testbed.radiographs import RG1_STUDY, RG3_STUDY, radiograph

REDIS_DB = 11  # the production layout's database on the machine's Redis (test_lapses.py uses 9), flushed per test


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind the service supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'radvlm.sqlite'}"
        upgrade(url)
        yield url
        return
    if not postgres_available():
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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'radvlm.sqlite'}"
    upgrade(url)
    return url


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

        node = Node(settings, sessions, store, on_ready=record_and_forward, clock=utcnow,
                    stat_rules=Settings().worker.stat_rules)  # the site's default rules, as `node` gets them
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


@pytest.fixture
def broker_url() -> str:
    """An emptied database on the machine's Redis, for the production layout's Celery."""
    return flushed_redis(REDIS_DB)

"""A GPU worker that dies holds nothing for long: its running analyses are queued again and its questions
fail at once (worker.lapses), within a minute of its Redis announcement lapsing, however long Redis's
visibility timeout (an hour by default) would keep its unacknowledged message."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pydicom
import pytest
import redis
from alembic import command
from pydicom.uid import generate_uid
from sqlalchemy import func, inspect, select

from radvlm.backends.scripted import ScriptedBackend
from records.chat_events import channel
from records.db import alembic_config, make_engine, make_session_factory, upgrade
from records.tables import (
    STAT_PRIORITY,
    Conversation,
    Exchange,
    ExchangeState,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
)
from testbed.accounts import HOUSE, users
from testbed.databases import flushed_redis
from testbed.dcmtk import storescu
from testbed.network import free_port, listening, wait_for
from testbed.node import rg1_study
from testbed.processes import kill_hard, production_env, service
from testbed.radiographs import RG1_STUDY, radiograph, rg1_copy
from worker.analysis import claim
from worker.lapses import STOPPED, LapseSweep
from worker.presence import PREFIX

REDIS_DB = 9  # a database of its own on the machine's Redis (test_production_layout uses 11), flushed per test
T0 = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def lapse_broker() -> str:
    return flushed_redis(REDIS_DB)


def _held(session, uid: str, worker: str) -> tuple[Job, Exchange]:  # type: ignore[no-untyped-def]
    """A STAT study in analysis by ``worker``, which is also answering a question about it."""
    study = Study(study_instance_uid=uid, state=StudyState.analysing, version=1, priority=STAT_PRIORITY,
                  first_received_at=T0, last_received_at=T0)
    session.add(study)
    session.flush()
    job = Job(study_id=study.id, study_version=1, model_id="scripted-radvlm", model_revision="scripted",
              state=JobState.running, attempts=1, created_at=T0, started_at=T0, worker=worker)
    conversation = Conversation(study_id=study.id, sop_instance_uid=f"{uid}.1", user_name="dr.house", created_at=T0)
    session.add_all([job, conversation])
    session.flush()
    exchange = Exchange(conversation_id=conversation.id, position=1, question="Where is it?",
                        state=ExchangeState.answering, asked_at=T0, worker=worker)
    session.add(exchange)
    return job, exchange


def test_a_lapsed_worker_s_work_is_given_back_once(database_url, lapse_broker):
    """Three workers hold work; only the one whose announcement stays gone for the grace is taken for dead,
    and what it held is given back once however many passes follow."""
    sessions = make_session_factory(make_engine(database_url))
    client = redis.Redis.from_url(lapse_broker)
    with sessions() as session, session.begin():
        held = {name: _held(session, f"1.2.3.{n}", name) for n, name in enumerate(["dead", "alive", "flaky"])}
    ids = {name: (job.id, exchange.id) for name, (job, exchange) in held.items()}
    client.set(PREFIX + "alive", "scripted-radvlm")
    now = [T0]
    resent: list[tuple[int, int, int]] = []
    sweep = LapseSweep(sessions, client, lambda *analysis: resent.append(analysis),
                       lambda exchange_id, event: client.publish(channel(exchange_id), json.dumps(event)),
                       grace_s=15, interval_s=5, clock=lambda: now[0])
    waiting = client.pubsub()
    waiting.subscribe(channel(ids["dead"][1]))

    assert sweep.run_once().jobs == []  # "dead" and "flaky" missed once: within the grace
    client.set(PREFIX + "flaky", "scripted-radvlm")  # back (Redis was away a moment)
    now[0] += timedelta(seconds=10)
    assert sweep.run_once().jobs == []
    client.delete(PREFIX + "flaky")  # gone again: its grace starts again
    now[0] += timedelta(seconds=10)
    given = sweep.run_once()
    assert (given.jobs, given.exchanges) == ([ids["dead"][0]], [ids["dead"][1]])
    now[0] += timedelta(minutes=1)
    again = sweep.run_once()  # "flaky" lapsed too now; "dead" has nothing left
    assert (again.jobs, again.exchanges) == ([ids["flaky"][0]], [ids["flaky"][1]])
    assert sweep.run_once().jobs == []

    with sessions() as session:
        dead_job = session.get_one(Job, ids["dead"][0])
        study = session.get_one(Study, dead_job.study_id)
        assert resent == [(study.id, 1, STAT_PRIORITY), (session.get_one(Job, ids["flaky"][0]).study_id, 1,
                                                         STAT_PRIORITY)]
        assert dead_job.state is JobState.queued and study.state is StudyState.ready
        assert study.state_reason == "queued again: the GPU worker analysing it stopped (dead)"
        exchange = session.get_one(Exchange, ids["dead"][1])
        assert (exchange.state, exchange.error) == (ExchangeState.failed, STOPPED)
        alive_job, alive_exchange = session.get_one(Job, ids["alive"][0]), session.get_one(Exchange, ids["alive"][1])
        assert alive_job.state is JobState.running and alive_exchange.state is ExchangeState.answering
    messages = [m for m in iter(lambda: waiting.get_message(timeout=2), None) if m["type"] == "message"]
    assert [json.loads(m["data"]) for m in messages] == [{"type": "error", "status": 502, "detail": STOPPED}]

    # the next worker claims the job given back (the resent message); the dead one's, redelivered, finds it done
    assert claim(sessions, study.id, 1, ScriptedBackend(), T0, "next") == dead_job.id
    with sessions() as session:
        job = session.get_one(Job, dead_job.id)
        assert (job.state, job.worker, job.attempts) == (JobState.running, "next", 2)
    client.set(PREFIX + "next", "scripted-radvlm")
    assert sweep.run_once().jobs == []


def test_the_worker_columns_migrate_up_and_down(sqlite_url):
    def columns(table: str) -> set[str]:
        engine = make_engine(sqlite_url)
        try:
            return {c["name"] for c in inspect(engine).get_columns(table)}
        finally:
            engine.dispose()

    assert "worker" in columns("jobs") and "worker" in columns("exchanges")
    command.downgrade(alembic_config(sqlite_url), "0009")
    assert "worker" not in columns("jobs") and "worker" not in columns("exchanges")
    upgrade(sqlite_url)
    assert "worker" in columns("jobs") and "worker" in columns("exchanges")


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # as production runs: once is enough
def test_a_worker_killed_mid_study_and_mid_question_with_the_default_visibility_timeout(database_url, lapse_broker,
                                                                                        tmp_path):
    """Production processes with Redis's default visibility timeout (an hour): a GPU worker killed while it
    analyses a STAT study and answers a question. Within a minute, the question's request answers 502 with
    the reason and the study is analysed, once, by the next worker."""
    port, api_port = free_port(), free_port()
    env = production_env(tmp_path, database_url, lapse_broker, port, RADVLM_API__PORT=str(api_port),
               RADVLM_API__USERS=json.dumps(users()),
               RADVLM_MODEL__SCRIPTED_DELAY_S="2.5")  # an answer: 2.5 s of "GPU" work; a study, four answers
    assert "RADVLM_WORKER__VISIBILITY_TIMEOUT_S" not in env
    sessions = make_session_factory(make_engine(database_url))
    request = pydicom.Dataset()
    request.RequestedProcedurePriority = "STAT"
    stat_uid = generate_uid()
    stat = rg1_copy(tmp_path, "stat.dcm", StudyInstanceUID=stat_uid, RequestAttributesSequence=[request])
    logs = tmp_path / "logs"

    def stat_study() -> Study | None:
        with sessions() as session:
            return session.scalar(select(Study).where(Study.study_instance_uid == stat_uid))

    def stat_job() -> Job | None:
        with sessions() as session:
            return session.scalar(select(Job).join(Study).where(Study.study_instance_uid == stat_uid))

    def exchange() -> Exchange | None:
        with sessions() as session:
            return session.scalar(select(Exchange))

    with service("node", ["node"], env, logs), service("io-worker", ["worker", "--queues", "io"], env, logs), \
            service("api", ["api"], env, logs), ThreadPoolExecutor(1) as pool, \
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=HOUSE, timeout=150) as client:
        with service("worker-a", ["worker", "--concurrency", "2"], env, logs) as first:
            wait_for(lambda: listening(port), 30)  # one port at a time (see test_production_layout)
            wait_for(lambda: listening(api_port), 30)
            assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
            wait_for(lambda: (s := rg1_study(sessions)) and s.state is StudyState.analysed, 60)
            created = client.post(f"/studies/{RG1_STUDY}/conversations", json={})
            assert created.status_code == 201, created.text
            questions = f"/studies/{RG1_STUDY}/conversations/{created.json()['id']}/questions"
            assert storescu(port, stat).returncode == 0
            wait_for(lambda: (j := stat_job()) and j.state is JobState.running, 60)
            asked = pool.submit(client.post, questions, json={"text": "Is there a pleural effusion?"})
            wait_for(lambda: (e := exchange()) and e.state is ExchangeState.answering, 30)
            assert stat_job().state is JobState.running  # the worker holds both
            kill_hard(first)
        killed = time.monotonic()
        with service("worker-b", ["worker"], env, logs) as second:
            try:
                wait_for(lambda: asked.done() and (s := stat_study()) and s.state is StudyState.analysed, 90)
            except TimeoutError:
                pytest.fail(f"90 s after the kill: question answered {asked.done()}, STAT study {stat_study().state}")
            recovered = time.monotonic() - killed
    answer = asked.result()
    assert answer.status_code == 502 and answer.json()["detail"] == "the GPU worker answering it stopped", answer.text
    assert recovered < 90  # Redis alone would have held both for an hour
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 2  # the routine study's and the STAT one's
        job = session.scalar(select(Job).join(Study).where(Study.study_instance_uid == stat_uid))
        assert job.state is JobState.done and job.attempts == 2 and job.result is not None
        assert f"-{second.pid}." in (job.worker or "")  # the next worker's name (host, pid, this start)
        assert session.get_one(Study, job.study_id).priority == STAT_PRIORITY
    failed = exchange()
    assert (failed.state, failed.error) == (ExchangeState.failed, STOPPED)
    io_log = Path(logs / "io-worker.log").read_text()
    assert "queued again (priority 1)" in io_log and "stopped announcing itself" in io_log

"""Stopping with a backlog: SIGTERM ends ``serve`` within docker's 10 s, and a restart finishes the work once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.completion import CompletionMonitor
from dicom_node.retention import remove_old_images
from radvlm.backends.scripted import ScriptedBackend
from radvlm_pacs.composition import STOP_GRACE_S
from records.clock import utcnow
from records.db import make_engine, make_session_factory
from records.storage import InstanceStore
from records.tables import Job, JobState, Result, Study, StudyState, StudyVersion
from testbed.dcmtk import storescu
from testbed.network import free_port, listening, wait_for
from testbed.node import worker_context
from testbed.processes import serve_env, service
from testbed.radiographs import rg1_copy
from worker.analysis import claim
from worker.dispatch import InProcessRunner, unfinished_analyses
from worker.model_thread import ModelThread


def _studies(folder: Path, studies: int, instances: int = 1) -> list[Path]:
    """RG1 copies: ``studies`` new studies of ``instances`` images each."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        files += [rg1_copy(folder, f"{s}-{i}.dcm", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
                  for i in range(instances)]
    return files


def _states(sessions: sessionmaker[Session]) -> Counter[StudyState]:
    with sessions() as session:
        return Counter(session.scalars(select(Study.state)))


def _exactly_once(sessions: sessionmaker[Session], studies: int) -> None:
    """Every study analysed at version 1, with one job and one result: none lost, none twice."""
    with sessions() as session:
        assert _states(sessions) == {StudyState.analysed: studies}
        versions = session.execute(select(StudyVersion.study_id, StudyVersion.version)).all()
        assert len(versions) == studies and {v for _, v in versions} == {1}
        jobs = session.scalars(select(Job)).all()
        assert len(jobs) == studies and {j.state for j in jobs} == {JobState.done}
        results = select(Job.study_id, Job.study_version).join(Result, Result.job_id == Job.id)
        per_version = Counter(session.execute(results))
        assert sorted(per_version) == sorted(versions) and set(per_version.values()) == {1}


class SlowStore(InstanceStore):
    """A store whose every read of a file waits ``delay_s``: a slow disk under a backlog."""

    def __init__(self, root: Path, delay_s: float) -> None:
        super().__init__(root, fsync=False)
        self.delay_s, self.reads = delay_s, 0

    def path(self, relative_path: str) -> Path:
        self.reads += 1
        time.sleep(self.delay_s)
        return super().path(relative_path)


def test_completion_monitor_stops_between_files_and_studies(sqlite_url, start_node, tmp_path):
    node = start_node(sqlite_url, stable_age_s=3600, completion_poll_s=3600)  # receives; this test's monitors complete
    assert storescu(node.port, *_studies(tmp_path / "sent", studies=4, instances=3)).returncode == 0
    ready: list[tuple[int, int]] = []
    slow = SlowStore(node.store.root, delay_s=0.5)  # the whole pass: 12 reads, 6 s
    monitor = CompletionMonitor(node.sessions, slow, stable_age=timedelta(0), poll_interval=0.01,
                                on_ready=lambda s, v: ready.append((s, v)), clock=utcnow)
    monitor.start()
    wait_for(lambda: slow.reads >= 2, 10)  # into the first study's files

    start = time.monotonic()
    monitor.stop()
    assert time.monotonic() - start < 2
    assert slow.reads < 12

    # the next start completes every study once: none half done, none twice
    again = CompletionMonitor(node.sessions, node.store, stable_age=timedelta(0), poll_interval=0.01,
                              on_ready=lambda s, v: ready.append((s, v)), clock=utcnow)
    again.run_once()
    with node.sessions() as session:
        versions = session.scalars(select(StudyVersion)).all()
    assert len(versions) == 4 and {(v.version, v.instance_count, v.outcome) for v in versions} == {
        (1, 3, StudyState.ready)}
    assert sorted(ready) == sorted((v.study_id, 1) for v in versions)


def test_runner_start_takes_up_the_analyses_a_stopped_run_left(database_url, start_node, tmp_path):
    node = start_node(database_url)  # its ready events are taken (recorded) but never run: the queue was dropped
    assert storescu(node.port, *_studies(tmp_path / "sent", studies=3)).returncode == 0
    wait_for(lambda: len(node.ready) == 3, 30)
    [(midway, version), *_] = node.ready
    assert claim(node.sessions, midway, version, ScriptedBackend(), utcnow()) is not None  # stopped mid-analysis
    assert len(unfinished_analyses(node.sessions)) == 3

    with ModelThread() as thread:
        runner = InProcessRunner(worker_context(node, ScriptedBackend()), thread)
        runner.start()
        wait_for(lambda: _states(node.sessions)[StudyState.analysed] == 3, 60)
        runner.close()
    _exactly_once(node.sessions, 3)
    with node.sessions() as session:
        assert session.scalar(select(Job.attempts).where(Job.study_id == midway)) == 2  # the running job, run again
    assert unfinished_analyses(node.sessions) == []


def test_model_thread_drops_queued_work_and_bounds_the_wait(tmp_path):
    release = threading.Event()
    thread = ModelThread()
    running = thread.submit(release.wait)
    queued = [thread.submit(time.sleep, 0) for _ in range(5)]
    wait_for(running.running, 5)

    start = time.monotonic()
    thread.shutdown(cancel_futures=True, timeout=0.5)
    assert time.monotonic() - start < 1.5
    assert all(f.cancelled() for f in queued) and not thread.stopped
    release.set()
    wait_for(lambda: thread.stopped, 5)


def test_node_stop_aborts_an_open_association(sqlite_url, start_node):
    node = start_node(sqlite_url)
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", node.port, ae_title="RADVLM")
    assert assoc.is_established  # and then idle: its reader would wait network_timeout_s (120 s)

    start = time.monotonic()
    node.node.stop()
    wait_for(lambda: not node.node.ae.active_associations, 2)
    assert time.monotonic() - start < 3
    wait_for(lambda: assoc.is_aborted, 5)


@pytest.mark.parametrize("seconds_per_answer", [0.5, 30.0], ids=["running-item-finishes", "running-item-abandoned"])
def test_serve_stops_within_10_s_with_a_backlog_and_finishes_it_once_after_restart(seconds_per_answer, sqlite_url,
                                                                                     tmp_path):
    studies = 30
    port, api_port = free_port(), free_port()
    env = serve_env(tmp_path, sqlite_url, port, api_port, [], RADVLM_MODEL__SCRIPTED_DELAY_S=str(seconds_per_answer))
    sessions = make_session_factory(make_engine(sqlite_url))
    files = _studies(tmp_path / "sent", studies)

    def underway() -> bool:  # one analysis running, at least one waiting for the model, and more arriving
        return _states(sessions)[StudyState.analysing] == 1 and len(unfinished_analyses(sessions)) >= 2

    with service("serve", ["serve"], env, tmp_path / "logs") as process:
        wait_for(lambda: listening(port), 60)
        assert storescu(port, *files).returncode == 0
        wait_for(underway, 120)
        time.sleep(1)  # into the running analysis
        os.kill(process.pid, signal.SIGTERM)  # what docker stop sends to PID 1
        start = time.monotonic()
        code = process.wait(timeout=60)
        took = time.monotonic() - start
    left = _states(sessions)
    print(f"serve stopped {took:.1f} s after SIGTERM with exit code {code}; left: {dict(left)}")
    assert code == 0 and took < 10
    assert left[StudyState.analysed] < studies  # a backlog was left...
    assert unfinished_analyses(sessions)  # ...including work the model thread had queued and dropped
    with sessions() as session:
        running = session.scalars(select(Job.id).where(Job.state == JobState.running)).all()
    assert len(running) == (1 if seconds_per_answer > STOP_GRACE_S else 0)  # abandoned, or finished in the grace

    with service("serve-again", ["serve"], {**env, "RADVLM_MODEL__SCRIPTED_DELAY_S": "0"},
                 tmp_path / "logs") as process:
        wait_for(lambda: _states(sessions)[StudyState.analysed] == studies, 180)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    _exactly_once(sessions, studies)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == studies
        assert [session.get_one(Job, job_id).attempts for job_id in running] == [2] * len(running)


def test_retention_pass_stops_between_studies(analysed_node):
    running = analysed_node.running
    stop, later = threading.Event(), utcnow() + timedelta(days=2)
    stop.set()
    assert remove_old_images(running.sessions, running.store, timedelta(days=1), later, stop=stop) == 0
    assert remove_old_images(running.sessions, running.store, timedelta(days=1), later) == 2  # the next pass

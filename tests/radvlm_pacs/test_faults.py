"""Faults in the production layout, each with the same promise afterwards: no accepted instance lost,
no study analysed twice, every result delivered once.

The node killed in the middle of a C-STORE, Redis killed while studies wait in the queue, PostgreSQL
stopped in the middle of an association. (The worker killed during an analysis is in
test_production_layout and test_lapses; the destination down during the analysis, in test_delivery.)"""

from __future__ import annotations

import json
import os
import time

from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import func, select

from dicom_node.server import INCOMING
from records.clock import utcnow
from records.db import make_engine, make_session_factory, upgrade
from records.tables import DeliveryState, Instance, Job, JobState, OutboxItem, Result, Study, StudyState, StudyVersion
from testbed.dcmtk import storescu
from testbed.network import free_port, listening, wait_for
from testbed.node import rg1_study
from testbed.orthanc import running_orthanc
from testbed.processes import PrivatePostgres, PrivateRedis, kill_hard, production_env, service
from testbed.radiographs import radiograph, rg1_copy
from worker.dispatch import OutboxSweep


def test_node_killed_during_a_c_store(sqlite_url, broker_url, tmp_path):
    port = free_port()
    env = production_env(tmp_path, sqlite_url, broker_url, port,
               RADVLM_NODE__MAX_PDU_BYTES="16384")  # the sender cuts the dataset into 16 KiB PDUs
    sessions = make_session_factory(make_engine(sqlite_url))
    logs = tmp_path / "logs"
    rg1 = dcmread(radiograph("RG1_UNCI.dcm"))
    sent_pdus = []

    with service("node", ["node"], env, logs) as node:
        wait_for(lambda: listening(port), 30)

        def kill_mid_transfer(event) -> None:  # type: ignore[no-untyped-def]
            sent_pdus.append(event.pdu)
            if len(sent_pdus) == 40:  # of about 440 P-DATA PDUs of 16 KiB: the dataset is half sent
                kill_hard(node)

        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(rg1.SOPClassUID, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM", evt_handlers=[(evt.EVT_PDU_SENT, kill_mid_transfer)])
        assert assoc.is_established
        status = assoc.send_c_store(rg1)
        assert "Status" not in status  # no answer: the sender knows the instance was not taken
        assoc.abort()
    assert len(sent_pdus) >= 40
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    incoming = tmp_path / "dicom" / INCOMING  # where a dataset is received, outside the study tree
    assert [p for p in (tmp_path / "dicom").rglob("*.dcm") if incoming not in p.parents] == []
    (incoming / "tmp-left-by-a-crash.dcm").write_bytes(b"\x00" * 132)  # as a kill later in a transfer leaves
    leftovers = list(incoming.glob("*.dcm"))
    for path in leftovers:  # as if the node had stayed down two hours
        os.utime(path, (time.time() - 2 * 3600,) * 2)

    with service("node-again", ["node"], env, logs), service("worker", ["worker"], env, logs):
        wait_for(lambda: listening(port), 30)
        assert not any(path.exists() for path in leftovers)  # removed as the node started
        assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
        study = wait_for(lambda: (s := rg1_study(sessions)) and s.state is StudyState.analysed and s, 90)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert study.version == 1
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) == 1


def _counts(sessions, *tables) -> list[int]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return [session.scalar(select(func.count()).select_from(t)) for t in tables]


def test_redis_killed_while_studies_are_queued(sqlite_url, tmp_path):
    """One study in analysis and one in the queue when Redis dies; a third arrives while it is down.
    Redis comes back from its append-only file: the queued study is still there, the node sends the
    third, and results whose messages could not be sent are found by the io worker's sweep."""
    broker = PrivateRedis(tmp_path / "redis", free_port())
    broker.start()
    port = free_port()
    sessions = make_session_factory(make_engine(sqlite_url))
    logs = tmp_path / "logs"
    studies = [rg1_copy(tmp_path, f"study-{n}.dcm", StudyInstanceUID=generate_uid()) for n in range(3)]

    def dispatched() -> int:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(StudyVersion)
                                  .where(StudyVersion.dispatched_at.is_not(None)))

    def running() -> bool:
        with sessions() as session:
            return session.scalar(select(Job).where(Job.state == JobState.running)) is not None

    try:
        with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
            destinations = json.dumps([{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                        "port": orthanc.dicom_port}])
            env = production_env(tmp_path, sqlite_url, broker.url, port, RADVLM_DESTINATIONS=destinations,
                       RADVLM_MODEL__SCRIPTED_DELAY_S="1.0",  # 4 answers: 4 s of "GPU" work per study
                       RADVLM_WORKER__TASK_TIME_LIMIT_S="8", RADVLM_WORKER__VISIBILITY_TIMEOUT_S="10",
                       RADVLM_DELIVERY__SWEEP_S="1", RADVLM_DELIVERY__SWEEP_GRACE_S="3")
            with service("node", ["node"], env, logs), service("gpu-worker", ["worker"], env, logs), \
                    service("io-worker", ["worker", "--queues", "io"], env, logs):
                wait_for(lambda: listening(port), 30)
                assert storescu(port, studies[0]).returncode == 0
                wait_for(running, 60)
                assert storescu(port, studies[1]).returncode == 0
                wait_for(lambda: dispatched() == 2, 30)  # the second waits in Redis behind the first
                broker.kill()
                assert storescu(port, studies[2]).returncode == 0  # the node takes studies without Redis
                time.sleep(8)  # the first analysis ends, its results cannot be queued; the third cannot be
                assert dispatched() == 2
                broker.start()
                wait_for(lambda: _counts(sessions, Result) == [3], 120)
                wait_for(lambda: orthanc.request("GET", "/statistics")["CountInstances"] == 9, 60)
                time.sleep(12)  # past the visibility timeout: a message whose ack was lost comes back
                received = [orthanc.request("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                            for i in orthanc.request("GET", "/instances")]
    finally:
        broker.kill()
    with sessions() as session:
        jobs = session.scalars(select(Job)).all()
        items = session.scalars(select(OutboxItem)).all()
        states = {s.state for s in session.scalars(select(Study))}
    assert len(jobs) == 3 and all(j.state is JobState.done and j.attempts == 1 for j in jobs)
    assert states == {StudyState.analysed}
    assert len(items) == 9 and all(i.state is DeliveryState.sent for i in items)
    assert sorted(received) == sorted(i.object_uid for i in items)  # each object once
    node_log = (logs / "node.log").read_text()
    assert "not taken; will retry" in node_log  # the node felt the outage and kept the event
    assert "wait in the outbox" in (logs / "gpu-worker.log").read_text()
    assert "outbox sweep queued" in (logs / "io-worker.log").read_text()


def test_postgresql_stopped_during_an_association(broker_url, tmp_path):
    """PostgreSQL crashes after four instances of a twelve-instance study: the node answers "cannot
    store" (A701) for each instance while it is down, keeps the association, stores again once the
    server is back, and the sender's retry of the refused ones completes the study, analysed once."""
    postgres = PrivatePostgres(free_port())
    try:
        postgres.start()
        upgrade(postgres.url)
        port = free_port()
        env = production_env(tmp_path, postgres.url, broker_url, port)
        sessions = make_session_factory(make_engine(postgres.url))
        files = [rg1_copy(tmp_path, f"{n}.dcm") for n in range(12)]
        datasets = [dcmread(f) for f in files]
        logs = tmp_path / "logs"
        with service("node", ["node"], env, logs), service("worker", ["worker"], env, logs):
            wait_for(lambda: listening(port), 30)
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM")
            assert assoc.is_established
            statuses = []
            for n, ds in enumerate(datasets):
                if n == 4:
                    postgres.stop("immediate")
                if n == 8:
                    postgres.start()
                statuses.append(assoc.send_c_store(ds))
            refused = [ds for ds, st in zip(datasets, statuses) if st.Status != 0]
            retried = [assoc.send_c_store(ds).Status for ds in refused]  # what a PACS does with a refusal
            assoc.release()
            study = wait_for(lambda: (s := rg1_study(sessions)) and s.state is StudyState.analysed and s, 90)
            stored_files = sorted(p.name for p in (tmp_path / "dicom").rglob("*.dcm"))
        with sessions() as session:
            stored = set(session.scalars(select(Instance.sop_instance_uid)))
            [job] = session.scalars(select(Job)).all()
        sessions.kw["bind"].dispose()
    finally:
        postgres.remove()
    codes = [st.Status for st in statuses]
    assert codes[:4] == [0] * 4 and codes[4:8] == [0xA701] * 4, codes
    assert all("database unavailable" in st.ErrorComment for st in statuses[4:8])
    assert codes[8:] == [0] * 4  # the node's connections came back with the server, on the same association
    assert retried == [0] * 4
    assert stored == {ds.SOPInstanceUID for ds in datasets}
    assert len(stored_files) == 12
    assert study.version == 1 and job.state is JobState.done and job.attempts == 1
    assert "database unavailable" in (logs / "node.log").read_text()


def test_the_sweep_leaves_a_draining_queue_alone():
    """While the io queue holds messages, overdue items are late, not lost: no duplicate is queued."""
    queued: list[list[int]] = []
    sweep = OutboxSweep(None, queued.append, interval_s=1, grace_s=0, clock=utcnow,  # type: ignore[arg-type]
                        backlog=lambda: 250)
    assert sweep.run_once(0) == [] and queued == []  # the database is not even asked

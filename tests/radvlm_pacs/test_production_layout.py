"""Production layout: node process, Redis, and separate ``radvlm-pacs worker`` processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from records.db import make_engine, make_session_factory
from records.tables import (
    ROUTINE_PRIORITY,
    STAT_PRIORITY,
    DeliveryState,
    Job,
    JobState,
    OutboxItem,
    Result,
    Study,
    StudyState,
    StudyVersion,
)
from testbed.accounts import HOUSE, users
from testbed.chat import sse
from testbed.dcmtk import storescu
from testbed.metrics import sample, scrape
from testbed.network import free_port, listening, wait_for
from testbed.node import rg1_study
from testbed.orthanc import running_orthanc
from testbed.processes import ENTRY, kill_hard, production_env, service
from testbed.radiographs import RG1_STUDY, radiograph, rg1_copy


def test_node_redis_and_worker_processes(database_url, broker_url, tmp_path):
    port = free_port()
    sessions = make_session_factory(make_engine(database_url))
    logs = tmp_path / "logs"
    with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
        destinations = json.dumps([{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                    "port": orthanc.dicom_port}])
        env = production_env(tmp_path, database_url, broker_url, port, RADVLM_DESTINATIONS=destinations)
        with service("node", ["node"], env, logs), service("gpu-worker", ["worker"], env, logs), \
                service("io-worker", ["worker", "--queues", "io"], env, logs):
            wait_for(lambda: listening(port), 30)
            assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
            wait_for(lambda: (s := rg1_study(sessions)) and s.state is StudyState.analysed, 60)
            wait_for(lambda: orthanc.request("GET", "/statistics")["CountInstances"] == 3, 30)
        with sessions() as session:
            [result] = session.scalars(select(Result)).all()
            [job] = session.scalars(select(Job)).all()
            items = session.scalars(select(OutboxItem)).all()
        received = {orthanc.request("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                    for i in orthanc.request("GET", "/instances")}
    assert job.state is JobState.done and job.attempts == 1
    assert sorted(i.kind for i in items) == ["gsps", "narrative", "sr"]
    assert all(i.state is DeliveryState.sent for i in items)
    assert received == {i.object_uid for i in items}
    io_log = (logs / "io-worker.log").read_text()
    assert "radvlm.deliver" in io_log and "loaded " not in io_log  # the io worker never loads the model
    assert result.payload["backend"] == "scripted"
    image = result.payload["images"][0]
    assert {k for k, v in image["labels"].items() if v} == {"Cardiomegaly", "Pleural Effusion"}


def test_reanalyse_and_resend_go_through_celery(sqlite_url, broker_url, tmp_path):
    """With a broker, the CLI queues the work itself: the GPU worker analyses the new version, the io worker
    sends the objects again."""
    port = free_port()
    sessions = make_session_factory(make_engine(sqlite_url))
    logs = tmp_path / "logs"

    def items(version: int) -> list[OutboxItem]:
        with sessions() as session:
            return [i for i in session.scalars(select(OutboxItem).join(Job, OutboxItem.job_id == Job.id)
                                               .where(Job.study_version == version).order_by(OutboxItem.id))]

    with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
        destinations = json.dumps([{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                    "port": orthanc.dicom_port}])
        env = production_env(tmp_path, sqlite_url, broker_url, port, RADVLM_DESTINATIONS=destinations)
        with service("node", ["node"], env, logs), service("gpu-worker", ["worker"], env, logs), \
                service("io-worker", ["worker", "--queues", "io"], env, logs):
            wait_for(lambda: listening(port), 30)
            assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
            wait_for(lambda: len(items(1)) == 3 and all(i.state is DeliveryState.sent for i in items(1)), 60)
            cli = {**os.environ, **env}
            run = subprocess.run([*ENTRY, "reanalyse", RG1_STUDY], env=cli, capture_output=True, text=True)
            assert run.returncode == 0 and "reanalysed: 1 of 1 study" in run.stdout, run.stderr
            wait_for(lambda: len(items(2)) == 3 and all(i.state is DeliveryState.sent for i in items(2)), 60)
            with sessions() as session, session.begin():
                for item in session.scalars(select(OutboxItem)):
                    item.state = DeliveryState.failed
            run = subprocess.run([*ENTRY, "resend", RG1_STUDY, "--failed-only"], env=cli, capture_output=True,
                                 text=True)
            assert run.returncode == 0 and "3 object(s) handed to the io workers" in run.stdout, run.stderr
            wait_for(lambda: all(i.state is DeliveryState.sent for i in items(2)), 30)
            assert all(i.state is DeliveryState.failed for i in items(1))  # only the latest analysis goes again
            assert orthanc.request("GET", "/statistics")["CountInstances"] == 6
    assert rg1_study(sessions).version == 2 and rg1_study(sessions).state is StudyState.analysed


def test_worker_killed_mid_study_is_analysed_once_by_the_next(sqlite_url, broker_url, tmp_path):
    port = free_port()
    env = production_env(tmp_path, sqlite_url, broker_url, port,
               RADVLM_MODEL__SCRIPTED_DELAY_S="1.5",  # 4 answers: 6 s of "GPU" work
               RADVLM_WORKER__TASK_TIME_LIMIT_S="20", RADVLM_WORKER__VISIBILITY_TIMEOUT_S="25")
    sessions = make_session_factory(make_engine(sqlite_url))

    def job() -> Job | None:
        with sessions() as session:
            return session.scalar(select(Job))

    logs = tmp_path / "logs"
    with service("node", ["node"], env, logs):
        wait_for(lambda: listening(port), 30)
        with service("worker-a", ["worker"], env, logs) as first:
            assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
            wait_for(lambda: (j := job()) and j.state is JobState.running, 60)
            time.sleep(1.0)  # inside the model's answers
            kill_hard(first)
        assert job().state is JobState.running and job().attempts == 1
        with service("worker-b", ["worker"], env, logs):
            study = wait_for(lambda: (s := rg1_study(sessions)) and s.state is StudyState.analysed and s, 90)
    assert study.state is StudyState.analysed
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 1
        [finished] = session.scalars(select(Job)).all()
    assert finished.state is JobState.done and finished.attempts == 2


def test_stat_study_is_analysed_before_routine_ones(sqlite_url, broker_url, tmp_path):
    port = free_port()
    env = production_env(tmp_path, sqlite_url, broker_url, port)
    sessions = make_session_factory(make_engine(sqlite_url))
    request = pydicom.Dataset()
    request.RequestedProcedurePriority = "STAT"
    studies = [rg1_copy(tmp_path, f"routine{n}.dcm", StudyInstanceUID=generate_uid()) for n in range(3)]
    stat = rg1_copy(tmp_path, "stat.dcm", StudyInstanceUID=generate_uid(), RequestAttributesSequence=[request])
    logs = tmp_path / "logs"
    with service("node", ["node"], env, logs):
        wait_for(lambda: listening(port), 30)
        for path in [*studies, stat]:  # the STAT study arrives last
            assert storescu(port, path).returncode == 0

        def queued() -> int:
            with sessions() as session:
                return len(session.scalars(select(StudyVersion).where(StudyVersion.dispatched_at.is_not(None))).all())

        wait_for(lambda: queued() == 4, 30)
        with service("worker", ["worker"], env, logs):
            wait_for(lambda: len(_all_jobs(sessions)) == 4 and all(j.state is JobState.done
                                                                   for j in _all_jobs(sessions)), 60)
    with sessions() as session:
        first = min(_all_jobs(sessions), key=lambda j: j.started_at)
        assert session.get_one(Study, first.study_id).priority == STAT_PRIORITY
        priorities = sorted(s.priority for s in session.scalars(select(Study)))
    assert priorities == [STAT_PRIORITY] + [ROUTINE_PRIORITY] * 3


def _all_jobs(sessions) -> list[Job]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(Job)))


def test_questions_go_to_the_gpu_worker_and_stream_back(sqlite_url, broker_url, tmp_path):
    """`radvlm-pacs api` never loads the model: questions run on the GPU worker (Celery, gpu queue) and
    the answer streams back over Redis; with no worker running, the API says the model is down."""
    port, api_port = free_port(), free_port()
    env = production_env(tmp_path, sqlite_url, broker_url, port, RADVLM_API__PORT=str(api_port),
               RADVLM_API__USERS=json.dumps(users()), RADVLM_MODEL__SCRIPTED_DELAY_S="0.5")
    sessions = make_session_factory(make_engine(sqlite_url))
    logs = tmp_path / "logs"
    base = f"http://127.0.0.1:{api_port}"
    with service("node", ["node"], env, logs), service("api", ["api"], env, logs):
        with service("gpu-worker", ["worker"], env, logs):
            # one port at a time: each probe of the DICOM port is an association attempt that holds
            # one of the node's max_associations slots until its ACSE timeout
            wait_for(lambda: listening(port), 30)
            wait_for(lambda: listening(api_port), 30)
            assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
            wait_for(lambda: (s := rg1_study(sessions)) and s.state is StudyState.analysed, 60)
            with httpx.Client(base_url=base, headers=HOUSE, timeout=60) as client:
                cid = client.post(f"/studies/{RG1_STUDY}/conversations", json={}).json()["id"]
                questions = f"/studies/{RG1_STUDY}/conversations/{cid}/questions"
                first = client.post(questions, json={"text": "Is there a pleural effusion?"})
                assert first.status_code == 200, first.text
                with client.stream("POST", questions + "/stream", json={"text": "Where is it?"}) as response:
                    events = sse(response.read().decode())
        with httpx.Client(base_url=base, headers=HOUSE, timeout=60) as client:
            down = client.post(questions, json={"text": "And the heart?"})
    assert first.json()["answer"] == "Yes, there is pleural effusion on this Chest X-ray."
    assert [kind for kind, _ in events].count("token") > 5 and events[-1][0] == "done"
    assert len(events[-1][1]["boxes"]) == 2  # "it" resolved from the history the worker was given
    assert down.status_code == 503 and "no GPU worker" in down.json()["detail"]
    api_log = (logs / "api.log").read_text()
    assert "loaded " not in api_log and "radvlm.chat" in (logs / "gpu-worker.log").read_text()


def json_lines(path: Path) -> list[dict]:
    """Every line of a process's log is one JSON object (a line that is not fails the test here), but for
    the notice Celery prints itself when it is stopped ("worker: Warm shutdown (MainProcess)")."""
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("worker: Warm shutdown")]


PATIENT_NAME, PATIENT_ID = "Secretperson^Jane", "PID-93751"


def test_two_workers_share_the_studies_and_report_metrics_and_json_logs(database_url, broker_url, tmp_path):
    """Six studies, two GPU workers on one Redis: each study analysed once, by one of them, both busy;
    every process's metrics and JSON logs say what happened, and no log names the patient."""
    port, api_port = free_port(), free_port()
    node_metrics, worker_metrics, io_metrics = free_port(), [free_port(), free_port()], free_port()
    sessions = make_session_factory(make_engine(database_url))
    uids = [generate_uid() for _ in range(6)]
    files = [rg1_copy(tmp_path, f"s{n}.dcm", StudyInstanceUID=uid, PatientName=PATIENT_NAME, PatientID=PATIENT_ID)
             for n, uid in enumerate(uids)]
    logs = tmp_path / "logs"
    with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
        destinations = json.dumps([{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                    "port": orthanc.dicom_port}])
        env = production_env(tmp_path, database_url, broker_url, port, RADVLM_DESTINATIONS=destinations,
                   RADVLM_LOG_FORMAT="json", RADVLM_MODEL__SCRIPTED_DELAY_S="0.3",
                   RADVLM_NODE__METRICS_PORT=str(node_metrics), RADVLM_API__PORT=str(api_port))
        workers = [service(f"worker-{n}", ["worker", "--metrics-port", str(p)], env, logs)
                   for n, p in enumerate(worker_metrics)]
        with service("node", ["node"], env, logs), workers[0], workers[1], \
                service("io-worker", ["worker", "--queues", "io", "--metrics-port", str(io_metrics)], env, logs), \
                service("api", ["api"], env, logs):
            wait_for(lambda: listening(port), 30)  # each probe holds one of the node's association slots a while
            wait_for(lambda: all(listening(p) for p in [api_port, *worker_metrics]), 30)
            assert storescu(port, *files, radiograph("RG3_UNCI.dcm")).returncode == 0

            def analysed() -> int:
                with sessions() as session:
                    return len(session.scalars(select(Study).where(Study.state == StudyState.analysed)).all())

            wait_for(lambda: analysed() == 6, 90)
            wait_for(lambda: orthanc.request("GET", "/statistics")["CountInstances"] == 18, 60)
            wait_for(lambda: sample(scrape(io_metrics), "radvlm_deliveries_total", kind="gsps", outcome="sent") == 6,
                     10)
            node_page, io_page, api_page = scrape(node_metrics), scrape(io_metrics), scrape(api_port)
            worker_pages = [scrape(p) for p in worker_metrics]

    with sessions() as session:
        jobs = session.scalars(select(Job)).all()
        assert session.scalar(select(func.count()).select_from(Result)) == 6
    assert sorted((j.state, j.attempts) for j in jobs) == [(JobState.done, 1)] * 6

    # the node: one association, seven instances stored, six studies to analyse, the tibia skipped
    assert sample(node_page, "radvlm_associations_total", outcome="accepted") == 1
    assert sample(node_page, "radvlm_instances_received_total", outcome="stored") == 7
    assert sample(node_page, "radvlm_studies_completed_total", outcome="ready") == 6
    assert sample(node_page, "radvlm_studies_completed_total", outcome="nothing_to_analyse") == 1
    assert sample(node_page, "radvlm_instances_skipped_total", reason="not chest") == 1
    # the GPU workers: both analysed some, six in all, with their latency, tokens and outcomes
    per_worker = [sample(page, "radvlm_analysis_latency_seconds_count") for page in worker_pages]
    assert sum(per_worker) == 6 and min(per_worker) >= 1, per_worker
    assert sum(sample(page, "radvlm_analyses_total", outcome="done") for page in worker_pages) == 6
    assert all(sample(page, "radvlm_model_generated_tokens_total", task="analysis") > 0 for page in worker_pages)
    assert all(sample(page, "radvlm_model_tokens_per_second", task="analysis") > 0 for page in worker_pages)
    # delivery: every object confirmed, with its latency
    assert sample(io_page, "radvlm_delivery_latency_seconds_count", kind="sr") == 6
    assert sample(io_page, "radvlm_deliveries_total", kind="narrative", outcome="sent") == 6
    # the API's view of the database and the queues
    assert sample(api_page, "radvlm_studies", state="analysed") == 6
    assert sample(api_page, "radvlm_studies", state="nothing_to_analyse") == 1
    assert sample(api_page, "radvlm_outbox_items", state="sent") == 18
    assert sample(api_page, "radvlm_queue_depth", queue="gpu") == 0
    assert sample(api_page, "radvlm_gpu_workers") == 2

    # logs: JSON lines; each worker's analyses carry the Celery task and the study; no patient data anywhere
    done_by = []
    for n in range(2):
        records = json_lines(logs / f"worker-{n}.log")
        done_by.append({r["study_uid"] for r in records if " analysed in " in r["message"] and "task_id" in r})
    assert done_by[0] and done_by[1] and not done_by[0] & done_by[1]
    assert done_by[0] | done_by[1] == set(uids)
    node_records = json_lines(logs / "node.log")
    assert {r["study_uid"] for r in node_records if "complete:" in r["message"]} >= set(uids)
    for path in logs.iterdir():
        assert json_lines(path), path.name
        text = path.read_text()
        assert PATIENT_ID not in text and "Secretperson" not in text, path.name


def test_a_worker_with_concurrency_analyses_studies_side_by_side(sqlite_url, broker_url, tmp_path):
    """``worker.concurrency = 3``: one GPU worker process takes three studies at once (threads sharing its
    model) and analyses each once."""
    port = free_port()
    sessions = make_session_factory(make_engine(sqlite_url))
    files = [rg1_copy(tmp_path, f"s{n}.dcm", StudyInstanceUID=generate_uid()) for n in range(3)]
    env = production_env(tmp_path, sqlite_url, broker_url, port, RADVLM_WORKER__CONCURRENCY="3",
               RADVLM_MODEL__SCRIPTED_DELAY_S="1.0")  # 4 answers: 4 s of "GPU" work per study
    most_running = 0

    def all_done() -> bool:
        nonlocal most_running
        with sessions() as session:
            states = [job.state for job in session.scalars(select(Job))]
        most_running = max(most_running, states.count(JobState.running))
        return len(states) == 3 and all(state is JobState.done for state in states)

    with service("node", ["node"], env, tmp_path / "logs"), service("worker", ["worker"], env, tmp_path / "logs"):
        wait_for(lambda: listening(port), 30)
        assert storescu(port, *files).returncode == 0
        wait_for(all_done, 60)
    assert most_running >= 2  # one at a time would never show two running
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 3
        assert all(job.attempts == 1 for job in session.scalars(select(Job)))

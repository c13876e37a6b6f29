"""The administrator's commands against a running node: resend, reanalyse, config check, health."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pydicom
import pytest
from sqlalchemy import select

from radvlm_pacs import main
from records.settings import Destination
from records.tables import DeliveryState, OutboxItem, Study, StudyState, StudyVersion
from testbed.dcmtk import storescu
from testbed.network import free_port, listening, wait_for
from testbed.node import worker_context
from testbed.orthanc import running_orthanc
from testbed.processes import PrivateRedis
from testbed.radiographs import radiograph

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
RG3_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"


def _orthanc_uids(orthanc) -> set[str]:  # type: ignore[no-untyped-def]
    return {orthanc.request("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc.request("GET", "/instances")}


def test_resend_and_reanalyse_through_the_running_service(sqlite_url, start_node, tmp_path, monkeypatch, capsys):
    from radvlm.backends.scripted import ScriptedBackend
    from results.outbox import Routing
    from worker.dispatch import InProcessRunner
    from worker.model_thread import ModelThread

    monkeypatch.setenv("RADVLM_DATABASE_URL", sqlite_url)
    with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
        pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        holder: dict[str, InProcessRunner] = {}
        node = start_node(sqlite_url, on_ready=lambda s, v: holder["runner"](s, v))
        ctx = worker_context(node, ScriptedBackend(), Routing(destinations=[pacs]), destinations=[pacs])
        with ModelThread() as model_thread:
            runner = holder["runner"] = InProcessRunner(ctx, model_thread)
            runner.start()
            try:
                assert storescu(node.port, radiograph("RG1_UNCI.dcm"), radiograph("RG3_UNCI.dcm")).returncode == 0

                def items(version: int) -> list[OutboxItem]:
                    with node.sessions() as session:
                        return [i for i in session.scalars(select(OutboxItem).order_by(OutboxItem.id))
                                if i.job_id == _job_id(session, version)]

                wait_for(lambda: len(items(1)) == 3 and all(i.state is DeliveryState.sent for i in items(1)), 30)
                first = items(1)
                assert _orthanc_uids(orthanc) == {i.object_uid for i in first}

                # resend: the same objects, due again, confirmed again; the PACS still holds one copy of each
                with node.sessions() as session, session.begin():
                    session.execute(OutboxItem.__table__.update().values(state=DeliveryState.failed.value,
                                                                         last_error="refused for the test"))
                assert main(["resend", RG1_STUDY, "--failed-only"]) == 0
                assert "3 object(s) due now" in capsys.readouterr().out
                wait_for(lambda: all(i.state is DeliveryState.sent for i in items(1)), 30)
                again = items(1)
                assert [(i.object_uid, i.attempts, i.last_error) for i in again] == \
                    [(i.object_uid, 1, None) for i in first]
                assert all(b.sent_at > a.sent_at for a, b in zip(first, again, strict=True))
                assert _orthanc_uids(orthanc) == {i.object_uid for i in first}

                # reanalyse: a second version, analysed by the running service, its SR naming the first
                assert main(["reanalyse", RG1_STUDY, "--reason", "model re-run after a PACS fault"]) == 0
                wait_for(lambda: len(items(2)) == 3 and all(i.state is DeliveryState.sent for i in items(2)), 30)
                with node.sessions() as session:
                    study = session.scalar(select(Study).where(Study.study_instance_uid == RG1_STUDY))
                    versions = session.scalars(select(StudyVersion).where(StudyVersion.study_id == study.id)
                                               .order_by(StudyVersion.version)).all()
                    assert (study.version, study.state) == (2, StudyState.analysed)
                    assert [v.reason for v in versions][1] == "reanalysis requested: model re-run after a PACS fault"
                    assert len({i.sop_instance_uid for i in study.instances}) == 1  # the same image, analysed again
                second = items(2)
                assert _orthanc_uids(orthanc) == {i.object_uid for i in first + second}
                new_sr = pydicom.dcmread(io.BytesIO(next(i.payload for i in second if i.kind == "sr")))
                old_sr_uid = next(i.object_uid for i in first if i.kind == "sr")
                named = {ref.ReferencedSOPInstanceUID for item in new_sr.PredecessorDocumentsSequence
                         for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
                assert old_sr_uid in named

                # what cannot be done says why, and the exit status says so
                capsys.readouterr()
                assert main(["reanalyse", RG3_STUDY, "1.2.3.4"]) == 1
                err = capsys.readouterr().err
                assert f"not reanalysed: {RG3_STUDY}: nothing to analyse: no usable frontal chest image" in err
                assert "not reanalysed: 1.2.3.4: no study 1.2.3.4" in err
                assert main(["resend", RG3_STUDY]) == 1
                assert "the study has not been analysed" in capsys.readouterr().err
            finally:
                runner.close()


def _job_id(session, version: int) -> int | None:  # type: ignore[no-untyped-def]
    from records.tables import Job

    return session.scalar(select(Job.id).where(Job.study_version == version))


def test_studies_list_has_a_header_and_says_when_there_are_none(sqlite_url, start_node, monkeypatch, capsys):
    monkeypatch.setenv("RADVLM_DATABASE_URL", sqlite_url)
    assert main(["studies", "list"]) == 0
    assert capsys.readouterr() == ("", "no studies\n")  # stdout holds the table only: empty
    node = start_node(sqlite_url)
    assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    assert main(["studies", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["study_instance_uid", "version", "state", "instances", "reason"]
    assert row.split()[:2] == [RG1_STUDY, "v1"] and row.index(" v1 ") + 1 == header.index("version")
    assert main(["studies", "list", "--state", "failed"]) == 0
    assert capsys.readouterr() == ("", "no studies in state failed\n")


def test_config_check_echoes_every_destination_and_hides_secrets(sqlite_url, tmp_path, monkeypatch, capsys):
    closed = free_port()
    hl7_port = free_port()
    listener = subprocess.Popen([sys.executable, "-m", "testbed.hl7_listener", str(hl7_port), str(tmp_path / "ris")])
    try:
        with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
            wait_for(lambda: listening(hl7_port), 20)
            monkeypatch.setenv("RADVLM_DATABASE_URL", sqlite_url)
            monkeypatch.setenv("RADVLM_BROKER_URL", f"redis://:hunter2@127.0.0.1:{closed}/0")
            monkeypatch.setenv("RADVLM_HL7", json.dumps({"host": "127.0.0.1", "port": hl7_port}))
            monkeypatch.setenv("RADVLM_DESTINATIONS", json.dumps([
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                {"name": "old-pacs", "ae_title": "GONE", "host": "127.0.0.1", "port": closed}]))
            status = main(["config", "check"])
    finally:
        listener.terminate()
        listener.wait()
    out = capsys.readouterr().out
    assert status == 1
    assert "hunter2" not in out and f"redis://:***@127.0.0.1:{closed}/0" in out
    effective = json.loads(out[:out.index("\n}\n") + 2])
    assert effective["node"]["ae_title"] == "RADVLM" and effective["destinations"][1]["name"] == "old-pacs"
    lines = out[out.index("\n}\n") + 3:].splitlines()
    assert lines[0].startswith("ok    database")
    assert any(line.startswith("ok    destination pacs (ORTHANC@127.0.0.1") and "status 0x0000" in line
               for line in lines)
    assert any(line.startswith("FAIL  destination old-pacs (GONE@127.0.0.1") and "no association: peer down" in line
               for line in lines)
    assert any(line.startswith(f"ok    RIS 127.0.0.1:{hl7_port}") for line in lines)
    assert any(line.startswith("FAIL  broker") and "Connection refused" in line for line in lines)


def test_config_check_shows_a_token_hash_in_part_and_warns_of_what_may_lose_work(sqlite_url, tmp_path, monkeypatch,
                                                                                 capsys):
    import hashlib

    import redis

    digest = hashlib.sha256(b"a token").hexdigest()
    broker = PrivateRedis(tmp_path / "redis", free_port())  # with its append-only file, as production runs it
    broker.start()
    try:
        wait_for(lambda: listening(broker.port), 20)
        monkeypatch.setenv("RADVLM_DATABASE_URL", sqlite_url)
        monkeypatch.setenv("RADVLM_BROKER_URL", broker.url)
        monkeypatch.setenv("RADVLM_API__USERS", json.dumps([{"name": "dr.house", "token_sha256": digest}]))
        assert main(["config", "check"]) == 0
        durable = capsys.readouterr().out
        redis.Redis.from_url(broker.url).config_set("appendonly", "no")
        monkeypatch.setenv("RADVLM_WORKER__VISIBILITY_TIMEOUT_S", "3700")  # just over 4x the 900 s time limit
        assert main(["config", "check"]) == 0  # warnings leave the exit status alone
        volatile = capsys.readouterr().out
    finally:
        broker.kill()
    assert digest not in durable and f'"token_sha256": "{digest[:8]}…"' in durable
    assert "ok    broker: PONG" in durable and "warn" not in durable
    assert [line for line in volatile.splitlines() if line.startswith("warn")] == [
        "warn  worker.visibility_timeout_s (3700 s) is more than 4x worker.task_time_limit_s (900 s): an analysis "
        "whose worker died waits that long before Redis hands it to another worker",
        "warn  broker: Redis runs without appendonly: the queued analyses and deliveries are lost when it restarts "
        "(run it with --appendonly yes)"]


def test_health_of_a_second_worker_asks_its_own_metrics_port(monkeypatch, capsys):
    from prometheus_client import start_http_server

    server, _ = start_http_server(0, addr="127.0.0.1")  # the second worker's `--metrics-port`
    monkeypatch.setenv("RADVLM_BROKER_URL", "redis://127.0.0.1:6379/0")  # a PING, nothing written
    monkeypatch.setenv("RADVLM_WORKER__METRICS_PORT", str(free_port()))  # the first worker's: not running
    try:
        assert main(["health", "worker"]) == 1
        assert "Connection refused" in capsys.readouterr().err
        assert main(["health", "worker", "--metrics-port", str(server.server_port)]) == 0
    finally:
        server.shutdown()


@pytest.mark.parametrize("allowed", [[], ["RADVLM-HEALTH"]])
def test_health_of_the_node_is_a_c_echo(sqlite_url, start_node, monkeypatch, allowed, capsys):
    from records.settings import CallerRule

    node = start_node(sqlite_url, allowed_callers=[CallerRule(ae_title=a, host="127.0.0.1") for a in allowed]
                      or [CallerRule(ae_title="ORTHANC")])
    monkeypatch.setenv("RADVLM_NODE__PORT", str(node.port))
    if allowed:
        assert main(["health", "node"]) == 0
    else:  # a node that does not let the health check in says so
        assert main(["health", "node"]) == 1
        assert "association rejected" in capsys.readouterr().err
    node.node.stop()
    assert main(["health", "node"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: node: ")

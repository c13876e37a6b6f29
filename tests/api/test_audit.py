"""The audit trail: reception, analysis, delivery, views, questions and failed log-ins, in the database
and as DICOM audit messages over syslog."""

from __future__ import annotations

import logging
import socket
import xml.etree.ElementTree as ET

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.main import create_app
from radvlm.backends.scripted import ScriptedBackend
from records.audit import AUDIT_LOGGER, send_to_syslog
from records.db import make_engine, make_session_factory
from records.tables import AuditEvent, Result
from testbed.accounts import HOUSE, auth, settings_for
from testbed.dcmtk import storescu
from testbed.node import worker_context
from testbed.radiographs import RG1_STUDY, RG3_STUDY, radiograph
from worker.askers import LocalAsker
from worker.model_thread import ModelThread


def _events(running) -> list[tuple[str, str, str | None, int]]:  # type: ignore[no-untyped-def]
    with running.sessions() as session:
        return [(e.action, e.user_name, e.study_instance_uid, e.outcome)
                for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_reception_analysis_views_and_failures_are_audited(analysed_node, sqlite_url, start_node):
    running = analysed_node.running
    events = _events(running)
    # one event per study of the association; the tibia was stored too (selection skips it later)
    assert ("receive", "STORESCU", RG1_STUDY, 0) in events and ("receive", "STORESCU", RG3_STUDY, 0) in events
    assert ("analyse", "radvlm-pacs", RG1_STUDY, 0) in events
    with running.sessions() as session:
        received = session.scalar(select(AuditEvent).where(AuditEvent.study_instance_uid == RG1_STUDY,
                                                           AuditEvent.action == "receive"))
        assert received.detail == "1 instance(s) stored, 0 refused" and received.client == "127.0.0.1"

    guarded = start_node(sqlite_url, allowed_callers=[{"ae_title": "PACS"}])
    assert storescu(guarded.port, radiograph("RG1_UNCI.dcm"), calling="INTRUDER").returncode != 0
    assert ("association_refused", "INTRUDER", None, 4) in _events(running)

    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(5)
    handler = send_to_syslog("127.0.0.1", collector.getsockname()[1], "RADVLM")
    try:
        with TestClient(create_app(settings_for(running))) as client:
            assert client.get(f"/studies/{RG1_STUDY}", headers=HOUSE).status_code == 200
            datagram = collector.recv(65536).decode()
            assert client.get("/studies", headers={"Authorization": "Bearer guess"}).status_code == 401
            failed_login = collector.recv(65536).decode()
            log = client.get("/audit", headers=auth("it.admin")).json()
    finally:
        logging.getLogger(AUDIT_LOGGER).removeHandler(handler)
        handler.close()
        collector.close()

    # RFC 5424: <authpriv.info>1 TIMESTAMP HOST APP PROCID MSGID - then the DICOM audit message
    header, xml = datagram.split(" - ", 1)
    assert header.startswith("<86>1 ") and header.split()[3:6][0] == "radvlm-pacs" and "IHE+RFC-3881" in header
    message = ET.fromstring(xml)
    assert message.find("EventIdentification/EventID").get("csd-code") == "110103"
    assert message.find("EventIdentification").get("EventActionCode") == "R"
    assert message.find("ActiveParticipant").get("UserID") == "dr.house"
    assert message.find("ParticipantObjectIdentification").get("ParticipantObjectID") == RG1_STUDY
    assert message.find("AuditSourceIdentification").get("AuditSourceID") == "RADVLM"
    failure = ET.fromstring(failed_login.split(" - ", 1)[1]).find("EventIdentification")
    assert failure.find("EventID").get("csd-code") == "110114" and failure.get("EventOutcomeIndicator") == "4"

    newest = log[0]
    assert (newest["action"], newest["event_id"], newest["user_name"]) == ("read_audit", "110101", "it.admin")
    [login] = [e for e in log if e["action"] == "login_failed"]
    assert login["outcome"] == 4 and login["detail"] == "invalid token: GET /studies"
    by_action = {e["action"]: e for e in log}
    assert by_action["receive"]["event_id"] == "110104" and by_action["receive"]["event_action_code"] == "C"
    assert by_action["analyse"]["event_id"] == "110103"
    assert not any("PatientName" in (e["detail"] or "") for e in log)


def test_a_flood_of_bad_tokens_is_audited_once_a_minute_and_never_holds_back_a_valid_one(sqlite_url, tmp_path):
    from datetime import datetime, timedelta, timezone

    from records.settings import Settings
    from testbed.accounts import users

    now = [datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)]
    settings = Settings(database_url=sqlite_url, storage_dir=tmp_path, api={"users": users(),
                                                                             "failed_logins_per_minute": 3})
    guess = {"Authorization": "Bearer guess"}
    with TestClient(create_app(settings, clock=lambda: now[0])) as client:
        answers = [client.get("/studies", headers=guess) for _ in range(6)]
        assert [a.status_code for a in answers] == [401, 401, 401, 401, 429, 429]
        assert answers[-1].headers["retry-after"] == "60" and answers[-1].json()["title"] == "too many failed log-ins"
        assert client.get("/studies", headers=HOUSE).status_code == 200  # the same address, a valid token
        now[0] += timedelta(seconds=45)
        late = client.get("/studies", headers=guess)
        assert late.status_code == 429 and late.headers["retry-after"] == "15"
        now[0] += timedelta(seconds=15)  # a new minute
        assert client.get("/studies", headers=guess).status_code == 401
    with make_session_factory(make_engine(sqlite_url))() as session:
        failed = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "login_failed")
                                 .order_by(AuditEvent.id)).all()
    assert len(failed) == 5  # three, the burst's start, and the first of the next minute
    assert failed[3] == ("invalid token: GET /studies (over 3 a minute: this address's further failures this "
                         "minute are not recorded)")
    assert failed[4] == "invalid token: GET /studies"


def test_refused_requests_are_audited_as_failures_naming_what_was_asked(analysed_node):
    """EventOutcomeIndicator 4 for a refusal, with the route, its parameters and the problem's title; the one
    request that succeeded stays 0."""
    admin = auth("it.admin")
    sign_off = f"/studies/{RG1_STUDY}/sign-off"
    with TestClient(create_app(settings_for(analysed_node.running))) as client:
        assert client.get("/audit", params={"user_name": "it.admin"}, headers=HOUSE).status_code == 403
        assert client.post(f"/studies/{RG1_STUDY}/conversations", json={}, headers=admin).status_code == 403
        assert client.post(sign_off, json={"report": "x", "findings": []}, headers=admin).status_code == 403
        assert client.post(sign_off, json={"report": "Cardiomegaly.", "findings": ["Cardiomegaly"]},
                           headers=HOUSE).status_code == 201
        assert client.post(sign_off, json={"report": "Again.", "findings": []}, headers=HOUSE).status_code == 409
        assert client.get("/studies/1.2.3", headers=HOUSE).status_code == 404
        assert client.get("/studies", params={"finding": "Tumour"}, headers=HOUSE).status_code == 422
        log = client.get("/audit", headers=admin).json()
    rows = [(e["action"], e["user_name"], e["outcome"], e["detail"]) for e in reversed(log)
            if e["action"] != "read_audit" or e["user_name"] == "dr.house"]
    assert rows[-7:] == [
        ("read_audit", "dr.house", 4, "refused 403 admins only: GET /audit (user_name=it.admin)"),
        ("start_conversation", "it.admin", 4,
         f"refused 403 radiologists only: POST /studies/{RG1_STUDY}/conversations"),
        ("sign_off", "it.admin", 4, f"refused 403 radiologists only: POST {sign_off} (findings: none)"),
        ("sign_off", "dr.house", 0, "findings: Cardiomegaly"),
        ("sign_off", "dr.house", 4, f"refused 409 already signed off: POST {sign_off} (findings: none)"),
        ("read_study", "dr.house", 4, "refused 404 unknown study: GET /studies/1.2.3"),
        ("list_studies", "dr.house", 4, "refused 422 unknown finding: GET /studies (finding=Tumour)"),
    ]
    assert log[0]["action"] == "read_audit" and (log[0]["outcome"], log[0]["detail"]) == (0, None)


class _Failing(ScriptedBackend):
    """The scripted test backend whose model fails on every question."""

    def follow_up(self, turns):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_request_that_fails_is_a_serious_failure_sent_to_syslog_once_with_its_outcome(analysed_node):
    running = analysed_node.running
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(5)
    handler = send_to_syslog("127.0.0.1", collector.getsockname()[1], "RADVLM")
    try:
        with ModelThread() as thread, TestClient(create_app(
                settings_for(running), LocalAsker(worker_context(running, _Failing()), thread)),
                raise_server_exceptions=False) as client:
            cid = client.post(f"/studies/{RG1_STUDY}/conversations", json={}, headers=HOUSE).json()["id"]
            asked = client.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions", json={"text": "Effusion?"},
                                headers=HOUSE)
            with running.sessions() as session, session.begin():  # a stored result this version cannot read
                session.execute(update(Result).values(payload={"images": "?"}))
            broken = client.get(f"/studies/{RG1_STUDY}", headers=HOUSE)
            sent = [ET.fromstring(collector.recv(65536).decode().split(" - ", 1)[1]) for _ in range(3)]
            collector.settimeout(0.5)
            with pytest.raises(TimeoutError):
                collector.recv(65536)  # one message per event: none for the attempt, another for its outcome
    finally:
        logging.getLogger(AUDIT_LOGGER).removeHandler(handler)
        handler.close()
        collector.close()
    assert (asked.status_code, broken.status_code) == (502, 500)
    assert [m.find("EventIdentification").get("EventOutcomeIndicator") for m in sent] == ["0", "8", "8"]
    with running.sessions() as session:
        rows = session.execute(select(AuditEvent.action, AuditEvent.outcome, AuditEvent.detail)
                               .order_by(AuditEvent.id.desc()).limit(2)).all()
    assert [tuple(r) for r in reversed(rows)] == [
        ("ask", 8, f"failed 502 the model could not answer: POST /studies/{RG1_STUDY}/conversations/{cid}/questions "
                   "(Effusion?)"),
        ("read_study", 8, f"failed 500 ValidationError: GET /studies/{RG1_STUDY}")]

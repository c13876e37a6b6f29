"""The audit trail: reception, analysis, delivery, views, questions and failed log-ins, in the database
and as DICOM audit messages over syslog."""

from __future__ import annotations

import logging
import socket
import xml.etree.ElementTree as ET

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from records.audit import AUDIT_LOGGER, send_to_syslog
from records.db import make_engine, make_session_factory
from records.tables import AuditEvent
from tests.conftest import RG1_STUDY, RG3_STUDY, radiograph, storescu
from tests.test_chat import HOUSE, auth, settings_for


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
    from tests.test_chat import users

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

"""Retention: a finished study's received files go after ``node.keep_images_days`` of quiet; its rows,
results and history stay, what needs the pixels says they were removed, and a copy sent again is
stored and analysed again."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from api.main import create_app
from dicom_node.retention import RetentionSweep, remove_old_images
from radvlm.backends.scripted import ScriptedBackend
from reception.catalog import Arrival, record_arrival
from records.clock import utcnow
from records.db import make_engine, make_session_factory
from records.tables import AuditEvent, Instance, Study, StudyState
from testbed.accounts import HOUSE, settings_for
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.node import worker_context
from testbed.radiographs import RG1_STUDY, RG3_STUDY, radiograph
from worker.askers import LocalAsker
from worker.model_thread import ModelThread
from worker.reruns import Refused, reanalyse

KEEP = timedelta(days=30)


def _files(running) -> dict[str, tuple[str, object]]:  # type: ignore[no-untyped-def]
    """Study UID -> (path of its one file, when it was removed)."""
    with running.sessions() as session:
        rows = session.execute(select(Study.study_instance_uid, Instance.path, Instance.removed_at)
                               .join(Instance, Instance.study_id == Study.id)).all()
    return {uid: (path, removed_at) for uid, path, removed_at in rows}


def _set_state(running, uid: str, state: StudyState) -> None:  # type: ignore[no-untyped-def]
    with running.sessions() as session, session.begin():
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(state=state))


def removed_total() -> float:
    return REGISTRY.get_sample_value("radvlm_images_removed_total") or 0.0


def test_finished_studies_lose_their_files_and_keep_their_history(analysed_node):
    running = analysed_node.running
    store, sessions = running.store, running.sessions
    files = _files(running)
    assert all(store.path(path).is_file() for path, _ in files.values())
    counted = removed_total()

    assert remove_old_images(sessions, store, KEEP, utcnow()) == 0  # received minutes ago
    later = utcnow() + KEEP + timedelta(days=1)
    _set_state(running, RG1_STUDY, StudyState.analysing)  # say a reanalysis is running: its pixels are needed
    assert remove_old_images(sessions, store, KEEP, later) == 1  # the tibia (nothing to analyse) only
    tibia = store.path(files[RG3_STUDY][0])
    assert not tibia.exists() and not (store.root / RG3_STUDY).exists()  # its study folder went with it
    assert store.path(files[RG1_STUDY][0]).is_file()
    _set_state(running, RG1_STUDY, StudyState.analysed)
    assert remove_old_images(sessions, store, KEEP, later) == 1
    assert remove_old_images(sessions, store, KEEP, later) == 0  # nothing twice
    assert not store.path(files[RG1_STUDY][0]).exists()
    assert {uid: removed for uid, (_, removed) in _files(running).items()} == {RG1_STUDY: later, RG3_STUDY: later}
    assert removed_total() - counted == 2
    with sessions() as session:  # each deletion is in the audit trail (DICOM Instances Accessed, action D)
        audited = session.execute(select(AuditEvent.study_instance_uid, AuditEvent.detail)
                                  .where(AuditEvent.action == "remove_images").order_by(AuditEvent.id)).all()
    assert [uid for uid, _ in audited] == [RG3_STUDY, RG1_STUDY]
    assert audited[0][1].startswith("1 file(s), ") and audited[0][1].endswith(" MB, removed after 30 quiet days")

    with ModelThread() as thread, TestClient(create_app(settings_for(running), LocalAsker(
            worker_context(running, ScriptedBackend()), thread))) as client:
        detail = client.get(f"/studies/{RG1_STUDY}", headers=HOUSE).json()
        assert detail["state"] == "analysed" and detail["result"]["images"][0]["report"]["text"]  # the draft stays
        assert [i["removed_at"] is not None for i in detail["instances"]] == [True]
        gone = f"removed from this node on {later:%Y-%m-%d} (node.keep_images_days)"
        for answer in (client.get(f"/studies/{RG1_STUDY}/image.png", headers=HOUSE),
                       client.post(f"/studies/{RG1_STUDY}/conversations", json={}, headers=HOUSE),
                       client.post(f"/studies/{RG1_STUDY}/sign-off", json={"report": "Normal.", "findings": []},
                                   headers=HOUSE)):
            assert answer.status_code == 410, answer.text
            assert answer.headers["content-type"] == "application/problem+json" and gone in answer.json()["detail"]
    with sessions() as session, pytest.raises(Refused, match=r"its images were removed from this node on"):
        reanalyse(session, RG1_STUDY, "after the model update", utcnow())


def test_a_removed_image_sent_again_is_stored_and_analysed_again(analysed_node):
    running = analysed_node.running
    later = utcnow() + KEEP + timedelta(days=1)
    assert remove_old_images(running.sessions, running.store, KEEP, later) == 2
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0

    def study() -> tuple[StudyState, int]:
        with running.sessions() as session:
            found = session.scalars(select(Study).where(Study.study_instance_uid == RG1_STUDY)).one()
            return found.state, found.version

    wait_for(lambda: study() == (StudyState.analysed, 2), 30)
    path, removed_at = _files(running)[RG1_STUDY]
    assert removed_at is None and running.store.path(path).is_file()
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0  # a copy kept: a duplicate again
    assert study() == (StudyState.analysed, 2)


def test_the_node_sweeps_at_start_and_then_on_its_interval(analysed_node):
    running = analysed_node.running
    sweep = RetentionSweep(running.sessions, running.store, keep=KEEP, interval=timedelta(seconds=0.2),
                           clock=lambda: utcnow() + KEEP + timedelta(days=1))
    sweep.start()
    try:
        wait_for(lambda: all(removed for _, removed in _files(running).values()), 10)
    finally:
        sweep.stop()
    assert not any(running.store.path(path).exists() for path, _ in _files(running).values())


def test_a_copy_whose_file_was_removed_is_recorded_again_and_reopens_its_study(database_url):
    sessions = make_session_factory(make_engine(database_url))
    arrival = Arrival(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                      path="1.2.3/1.2.3.4/1.2.3.4.5.dcm", size_bytes=100, calling_ae="PACS", calling_host="10.0.0.1")
    now = utcnow()
    for expected in (1, None):  # stored, then a duplicate (rolled back by the caller)
        with sessions() as session:
            assert record_arrival(session, arrival, now) == expected
            session.commit()
    with sessions() as session, session.begin():
        session.execute(update(Study).values(state=StudyState.analysed))
        session.execute(update(Instance).values(selected=True, selection_reason="frontal chest", removed_at=now))
    again = Arrival(**{**arrival.__dict__, "calling_ae": "OTHERPACS", "size_bytes": 120})
    with sessions() as session:
        assert record_arrival(session, again, now + KEEP) == 2
        session.commit()
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        instance = session.scalars(select(Instance)).one()
        assert (study.state, study.version) == (StudyState.receiving, 2)
        assert (instance.removed_at, instance.selected, instance.study_version, instance.calling_ae,
                instance.size_bytes) == (None, None, 2, "OTHERPACS", 120)
        assert instance.received_at == now + KEEP

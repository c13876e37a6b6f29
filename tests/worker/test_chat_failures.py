"""A chat answer the database cannot take: plain text where it can be made so, and at once a 502 that frees the
question where it cannot. On PostgreSQL, which refuses a NUL in a text column (SQLite takes it)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from radvlm.backends import base
from radvlm.backends.scripted import ScriptedBackend
from records.tables import Exchange, ExchangeState, Study, StudyState
from testbed.accounts import HOUSE, settings_for
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.node import worker_context
from testbed.radiographs import RG1_STUDY, radiograph
from worker.askers import LocalAsker
from worker.dispatch import InProcessRunner
from worker.model_thread import ModelThread


class _Garbling(ScriptedBackend):
    """The scripted test backend answering with NUL and bell characters, as random weights do."""

    def follow_up(self, turns):  # type: ignore[no-untyped-def]
        return "\x00Cardio\x07megaly\x00 at [0.33, 0.45, 0.78, 0.79].\nStable.\x00"


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_model_that_emits_nul_is_stored_as_plain_text_and_a_refused_answer_frees_the_question(
        database_url, start_node, monkeypatch):
    holder: dict[str, InProcessRunner] = {}
    running = start_node(database_url, on_ready=lambda s, v: holder["runner"](s, v))
    backend = _Garbling()
    with ModelThread() as thread:
        holder["runner"] = InProcessRunner(worker_context(running, ScriptedBackend()), thread)
        assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0

        def analysed() -> bool:
            with running.sessions() as session:
                return session.scalar(select(Study.state).where(Study.study_instance_uid == RG1_STUDY)) \
                    is StudyState.analysed
        wait_for(analysed, 60)

        asker = LocalAsker(worker_context(running, backend), thread)
        with TestClient(create_app(settings_for(running), asker)) as client:
            created = client.post(f"/studies/{RG1_STUDY}/conversations", json={}, headers=HOUSE)
            assert created.status_code == 201, created.text
            path = f"/studies/{RG1_STUDY}/conversations/{created.json()['id']}/questions"

            # 1. the model's control characters never reach the database, the stream or the client
            answered = client.post(path, json={"text": "Is there cardiomegaly?\x00"}, headers=HOUSE)
            assert answered.status_code == 200, answered.text
            assert answered.json()["answer"] == "Cardiomegaly at [0.33, 0.45, 0.78, 0.79].\nStable."
            with running.sessions() as session:
                stored = session.scalars(select(Exchange).order_by(Exchange.id)).all()
            assert [(e.question, e.answer, e.state) for e in stored] == [
                ("Is there cardiomegaly?", "Cardiomegaly at [0.33, 0.45, 0.78, 0.79].\nStable.",
                 ExchangeState.answered)]

            # 2. an answer the database refuses (as before the text was made plain): 502 at once, not 504 after
            #    chat_timeout_s; the exchange failed with the reason, and the next question is taken
            monkeypatch.setattr(base, "plain_text", lambda text: text)
            started = time.monotonic()
            refused = client.post(path, json={"text": "Where is it?"}, headers=HOUSE)
            waited = time.monotonic() - started
            assert refused.status_code == 502, refused.text
            assert "the answer could not be stored: DataError" in refused.json()["detail"]
            assert "NUL" in refused.json()["detail"] and waited < 10
            with running.sessions() as session:
                failed = session.scalars(select(Exchange).order_by(Exchange.id.desc())).first()
            assert failed.state is ExchangeState.failed and failed.error.startswith("the answer could not be stored")

            monkeypatch.undo()
            again = client.post(path, json={"text": "Where is it?"}, headers=HOUSE)
            assert again.status_code == 200, again.text

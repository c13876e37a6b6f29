"""Chat over a study analysed for real: history in RadVLM's format, SSE streaming, roles, audit, problems.

The model is the scripted test double on ``serve``'s model thread (``LocalAsker``); the Celery
path is tested in test_production_layout.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from radvlm import prompts
from radvlm.backends.base import PromptTooLong
from radvlm.backends.scripted import ScriptedBackend
from radvlm.prompts import Turn
from testbed.accounts import HOUSE, auth, settings_for
from testbed.chat import conversation, sse
from testbed.network import wait_for
from testbed.node import worker_context
from testbed.radiographs import RG1_STUDY, RG3_STUDY
from worker.askers import LocalAsker
from worker.model_thread import ModelThread


def test_where_is_it_is_answered_with_the_history(chat):
    client, backend = chat
    cid = conversation(client)
    first = client.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions",
                        json={"text": "Is there a pleural effusion?"}, headers=HOUSE)
    assert first.status_code == 200, first.text
    assert first.json()["answer"] == "Yes, there is pleural effusion on this Chest X-ray."
    assert first.json()["boxes"] == []
    second = client.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions", json={"text": "Where is it?"},
                         headers=HOUSE).json()
    # the request the model received: the first exchange, then the new question
    assert backend.requests[-1] == [Turn("user", "Is there a pleural effusion?"),
                                    Turn("assistant", first.json()["answer"]), Turn("user", "Where is it?")]
    assert prompts.render(backend.requests[-1]).count("<image>") == 1
    # the scripted model can only know what "it" is from the history
    assert second["answer"].startswith("The pleural effusion is located at the coordinates")
    boxes = second["boxes"]
    assert [(b["x1"], b["y1"], b["x2"], b["y2"]) for b in boxes] == [(0.05, 0.62, 0.31, 0.88), (0.7, 0.64, 0.95, 0.9)]
    assert boxes[0]["px"] == pytest.approx([0.05 * 1841, 0.62 * 1955, 0.31 * 1841, 0.88 * 1955])
    stored = client.get(f"/studies/{RG1_STUDY}/conversations/{cid}", headers=HOUSE).json()
    assert [e["position"] for e in stored["exchanges"]] == [1, 2]
    assert stored["exchanges"][1]["boxes"] == boxes


def test_answers_stream_token_by_token(chat):
    client, _ = chat
    cid = conversation(client)
    with client.stream("POST", f"/studies/{RG1_STUDY}/conversations/{cid}/questions/stream",
                       json={"text": "Where is the cardiomegaly?"}, headers=HOUSE) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.read().decode())
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) > 5
    done = events[-1][1]
    assert "".join(data["text"] for _, data in events[:-1]) == done["answer"]
    assert done["answer"] == "The cardiomegaly is located at the coordinates [0.33, 0.45, 0.78, 0.79] on the image."
    assert done["boxes"][0]["px"] == pytest.approx([0.33 * 1841, 0.45 * 1955, 0.78 * 1841, 0.79 * 1955])


def test_a_conversation_asked_without_a_body_is_about_the_first_analysed_image(chat):
    client, _ = chat
    bare = client.post(f"/studies/{RG1_STUDY}/conversations", headers=HOUSE)
    assert bare.status_code == 201, bare.text
    [first] = client.get(f"/studies/{RG1_STUDY}", headers=HOUSE).json()["result"]["images"]
    assert bare.json()["sop_instance_uid"] == first["sop_instance_uid"]


def test_each_problem_has_its_own_status(chat, analysed_node):
    client, _ = chat
    unknown = client.post("/studies/1.2.3/conversations", json={}, headers=HOUSE)
    assert unknown.status_code == 404 and unknown.json()["title"] == "unknown study"
    tibia = client.post(f"/studies/{RG3_STUDY}/conversations", json={}, headers=HOUSE)
    assert tibia.status_code == 409 and "nothing_to_analyse" in tibia.json()["detail"]
    other_image = client.post(f"/studies/{RG1_STUDY}/conversations", json={"sop_instance_uid": "1.2.3"},
                              headers=HOUSE)
    assert other_image.status_code == 404 and other_image.json()["title"] == "no such image"
    cid = conversation(client)
    empty = client.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions", json={"text": "  "}, headers=HOUSE)
    assert empty.status_code == 422 and empty.headers["content-type"] == "application/problem+json"
    assert client.post(f"/studies/{RG1_STUDY}/conversations/999/questions", json={"text": "Any effusion?"},
                       headers=HOUSE).status_code == 404

    running = analysed_node.running
    with TestClient(create_app(settings_for(running))) as no_model:  # e.g. `radvlm-pacs api` without a broker
        down = no_model.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions", json={"text": "Effusion?"},
                             headers=HOUSE)
    assert down.status_code == 503 and down.json()["title"] == "model unavailable"
    stopped = ModelThread()
    stopped.shutdown()
    with TestClient(create_app(settings_for(running, chat_max_rounds=1),
                               LocalAsker(worker_context(running, ScriptedBackend()), stopped))) as stopping:
        assert "stopped" in stopping.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions",
                                          json={"text": "Effusion?"}, headers=HOUSE).json()["detail"]
    with ModelThread() as thread, TestClient(create_app(
            settings_for(running, chat_max_rounds=1),
            LocalAsker(worker_context(running, ScriptedBackend()), thread))) as short:
        path = f"/studies/{RG1_STUDY}/conversations/{cid}/questions"
        assert short.post(path, json={"text": "Is there cardiomegaly?"}, headers=HOUSE).status_code == 200
        full = short.post(path, json={"text": "Where is it?"}, headers=HOUSE)
    assert full.status_code == 409 and full.json()["title"] == "conversation full"

    class Cramped(ScriptedBackend):  # the scripted model with a decode row too short for any conversation
        def generate(self, image, turns, params, on_text=None):  # type: ignore[no-untyped-def]
            raise PromptTooLong("a question of 10300 prompt tokens and up to 1500 new ones needs 11800 positions")

    with ModelThread() as thread, TestClient(create_app(
            settings_for(running), LocalAsker(worker_context(running, Cramped()), thread))) as cramped:
        long = cramped.post(f"/studies/{RG1_STUDY}/conversations/{conversation(cramped)}/questions",
                            json={"text": "And now?"}, headers=HOUSE)
    assert long.status_code == 422 and "too long for the model, start a new one" in long.json()["detail"]


def test_roles_visibility_and_audit(chat):
    client, _ = chat
    admin, elsewhere = auth("it.admin"), auth("dr.elsewhere")
    assert client.get("/me", headers=HOUSE).json() == {"name": "dr.house", "role": "radiologist",
                                                       "person_name": "House^Gregory"}
    # the admin sees every study but may not ask the model or sign off
    assert client.get("/studies", headers=admin).json()["count"] == 2
    refused = client.post(f"/studies/{RG1_STUDY}/conversations", json={}, headers=admin)
    assert refused.status_code == 403 and refused.json()["title"] == "radiologists only"
    assert client.post(f"/studies/{RG1_STUDY}/sign-off", json={"report": "x", "findings": []},
                       headers=admin).status_code == 403
    # a radiologist of another site sees none of these studies
    assert client.get("/studies", headers=elsewhere).json() == {"data": [], "count": 0}
    assert client.get(f"/studies/{RG1_STUDY}", headers=elsewhere).status_code == 404
    # conversations are their owner's
    cid = conversation(client)
    assert client.get(f"/studies/{RG1_STUDY}/conversations/{cid}", headers=admin).status_code == 404
    client.get(f"/studies/{RG1_STUDY}", headers=HOUSE)
    client.post(f"/studies/{RG1_STUDY}/conversations/{cid}/questions", json={"text": "Any pneumothorax?"},
                headers=HOUSE)
    assert client.get("/audit", headers=HOUSE).status_code == 403
    log = client.get("/audit", params={"user_name": "dr.house"}, headers=admin).json()
    actions = [(e["action"], e["study_instance_uid"], e["detail"]) for e in reversed(log)]
    assert ("read_study", RG1_STUDY, None) in actions
    assert ("ask", RG1_STUDY, "Any pneumothorax?") in actions
    assert all(e["client"] == "testclient" and e["role"] == "radiologist" for e in log)
    assert ("read_study", RG1_STUDY, f"refused 404 unknown study: GET /studies/{RG1_STUDY}", 4) in [
        (e["action"], e["study_instance_uid"], e["detail"], e["outcome"])
        for e in client.get("/audit", params={"user_name": "dr.elsewhere"}, headers=admin).json()]


def test_a_slow_model_times_out_and_its_answer_lands_later(analysed_node):
    running = analysed_node.running
    with ModelThread() as thread, TestClient(create_app(
            settings_for(running, chat_timeout_s=0.3),
            LocalAsker(worker_context(running, ScriptedBackend(delay_s=1.0)), thread))) as client:
        cid = conversation(client)
        path = f"/studies/{RG1_STUDY}/conversations/{cid}/questions"
        late = client.post(path, json={"text": "Is there cardiomegaly?"}, headers=HOUSE)
        assert late.status_code == 504 and late.json()["title"] == "no answer in time"
        with client.stream("POST", path + "/stream", json={"text": "Where is it?"}, headers=HOUSE) as response:
            events = sse(response.read().decode())
        assert events[-1] == ("error", {"status": 504, "detail": events[-1][1]["detail"]})
        assert "still waiting for the model" in events[-1][1]["detail"]

        def answered() -> list[dict]:
            exchanges = client.get(f"{path[:-len('/questions')]}", headers=HOUSE).json()["exchanges"]
            return exchanges if all(e["state"] == "answered" for e in exchanges) else []

        first, second = wait_for(answered, 15)
    assert first["answer"] == "Yes, there is cardiomegaly on this Chest X-ray."
    assert len(second["boxes"]) == 1  # asked after the first was stored: "it" is the cardiomegaly

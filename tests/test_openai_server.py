"""The OpenAI-compatible backend against a real model server: ``transformers serve`` running the tiny
checkpoint on CPU. Its greedy answers equal the in-process backend's, task by task, with the same
prompt token counts; a server that is down makes a study wait, not fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, wait_for
from worker import prompts
from worker.backends.base import GenerationParams, ModelUnavailable
from worker.backends.openai_server import OpenAIServerBackend
from worker.backends.transformers import TransformersBackend
from worker.prompts import Turn

CONVERSATIONS = [
    [Turn("user", prompts.REPORT)],
    [Turn("user", prompts.ABNORMALITIES)],
    [Turn("user", prompts.grounding_question("Pleural effusion"))],
    [Turn("user", "Is there an effusion?"), Turn("assistant", "Yes, on the left."), Turn("user", "Where is it?")],
]


@pytest.fixture(scope="module")
def model_server(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(log.parent / "hub")}
    with log.open("wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", str(tiny_model),
                                   "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 90)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            server.wait(timeout=20)


def test_served_answers_equal_in_process_ones(model_server, tiny_model):
    served = OpenAIServerBackend(model_server, str(tiny_model))
    local = TransformersBackend(str(tiny_model))
    image = np.random.default_rng(7).integers(0, 256, (700, 600), dtype=np.uint8)
    params = GenerationParams(max_new_tokens=12)
    for turns in CONVERSATIONS:
        expected = local.generate(image, turns, params)
        pieces: list[str] = []
        got = served.generate(image, turns, params, on_text=pieces.append)
        assert (got.text, got.prompt_tokens, got.new_tokens) == (expected.text, expected.prompt_tokens,
                                                                  expected.new_tokens), turns[-1].text
        assert "".join(pieces).strip() == got.text and len(pieces) > 1  # streamed in pieces
    assert served.model_revision == f"served:{tiny_model}"[:64]


def test_a_server_that_is_down_is_unavailable_not_failed():
    backend = OpenAIServerBackend(f"http://127.0.0.1:{free_port()}/v1", "radvlm", timeout_s=2, retries=0)
    with pytest.raises(ModelUnavailable, match="model server"):
        backend.generate(np.zeros((64, 64), np.uint8), CONVERSATIONS[0], GenerationParams(max_new_tokens=4))


def test_a_study_waits_for_the_server_however_many_attempts(sqlite_url, start_node):
    from sqlalchemy import select

    from records.tables import Job, JobState, Study, StudyState
    from tests.conftest import radiograph, storescu, worker_context
    from worker.jobs import attempt

    node = start_node(sqlite_url)
    assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: node.ready, 15)
    [(study_id, version)] = node.ready
    down = OpenAIServerBackend(f"http://127.0.0.1:{free_port()}/v1", "radvlm", timeout_s=2, retries=0)
    ctx = worker_context(node, down)
    assert ctx.settings.worker.max_retries == 5
    assert attempt(ctx, study_id, version, retries_done=50) == 300.0  # past max_retries: still waiting
    with node.sessions() as session:
        assert session.get_one(Study, study_id).state is StudyState.analysing
        assert session.scalar(select(Job.state)) is JobState.running

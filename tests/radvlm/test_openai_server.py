"""The OpenAI-compatible backend against a real model server: ``transformers serve`` running the tiny
checkpoint on CPU. Its greedy answers equal the in-process backend's, task by task, with the same
prompt token counts; a server that is down makes a study wait, not fail. Against a recording endpoint:
studies analysed at once each send their own image, never another's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from radvlm import prompts
from radvlm.backends import openai_server
from radvlm.backends.base import GenerationParams, ModelUnavailable
from radvlm.backends.openai_server import OpenAIServerBackend, image_url
from radvlm.backends.transformers import TransformersBackend
from radvlm.prompts import Turn
from records.text import plain_text
from testbed.network import free_port, serving, wait_for

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
        # streamed in pieces, as the model wrote them (random weights write NUL, which the Completion drops)
        assert plain_text("".join(pieces)).strip() == got.text and len(pieces) > 1
    assert served.model_revision == f"served:{tiny_model}"[:64]


def test_a_server_that_is_down_is_unavailable_not_failed():
    backend = OpenAIServerBackend(f"http://127.0.0.1:{free_port()}/v1", "radvlm", timeout_s=2, retries=0)
    with pytest.raises(ModelUnavailable, match="model server"):
        backend.generate(np.zeros((64, 64), np.uint8), CONVERSATIONS[0], GenerationParams(max_new_tokens=4))


def test_a_study_waits_for_the_server_however_many_attempts(sqlite_url, start_node):
    from sqlalchemy import select

    from records.tables import Job, JobState, Study, StudyState
    from testbed.dcmtk import storescu
    from testbed.node import worker_context
    from testbed.radiographs import radiograph
    from worker.attempts import attempt

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


def recording_server(seen: list[tuple[str, str]], on_request: Callable[[str], None] = lambda text: None) -> FastAPI:
    """An OpenAI-compatible chat endpoint that records each request's image data URL and last question,
    then streams the answer "ok": what the model server was really sent, image by question."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> StreamingResponse:
        body = await request.json()
        text = body["messages"][-1]["content"][-1]["text"]
        seen.append((body["messages"][0]["content"][0]["image_url"]["url"], text))
        on_request(text)

        def events() -> Iterator[str]:
            chunk = {"id": "rec", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            answer = {"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            yield "data: " + json.dumps({**chunk, "choices": [answer]}) + "\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            yield "data: " + json.dumps({**chunk, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def question(name: str, n: int = 0) -> list[Turn]:
    return [Turn("user", f"Question {n} about image {name}")]


def wrong_images(seen: list[tuple[str, str]], images: dict[str, np.ndarray]) -> list[str]:
    """The questions the server received with another image than the one they name."""
    names = {image_url(image): name for name, image in images.items()}
    return [f"{text!r} sent with image {names.get(url, '?')}" for url, text in seen
            if names.get(url) != text.rsplit(" ", 1)[-1]]


def test_concurrent_studies_each_send_their_own_image_encoded_once(monkeypatch):
    """Studies analysed at once on the worker's threads: every question goes with its own study's image."""
    rng = np.random.default_rng(3)
    images = {name: rng.integers(0, 256, (48, 40), dtype=np.uint8) for name in "ABCD"}
    params = GenerationParams(max_new_tokens=4)
    encoded: list[str] = []

    def encode(image: np.ndarray) -> str:
        encoded.append(image_url(image))
        return encoded[-1]

    monkeypatch.setattr(openai_server, "image_url", encode)
    seen: list[tuple[str, str]] = []
    with serving(recording_server(seen)) as base:
        backend = OpenAIServerBackend(base + "/v1", "radvlm")

        def study(name: str) -> None:  # as the pipeline asks: a study's questions together
            backend.generate_many(images[name], [question(name, n) for n in range(6)], [params] * 6)

        with ThreadPoolExecutor(max_workers=8) as pool:  # compose runs the worker with 8 threads
            list(pool.map(study, "ABCD" * 4))
    assert len(seen) == 16 * 6
    assert wrong_images(seen, images) == []
    names = {image_url(image): name for name, image in images.items()}
    assert sorted(names[url] for url in encoded) == list("ABCD")  # each image once, however studies interleave


def test_a_study_stalled_in_the_image_cache_still_sends_its_own_image(monkeypatch):
    """Study A stalls while its image key is compared (the GIL handing over at the worst moment, made
    certain) and study B runs meanwhile: A must still send A's image, not the one B left behind."""
    rng = np.random.default_rng(5)
    images = {name: rng.integers(0, 256, (48, 40), dtype=np.uint8) for name in "AB"}
    params = GenerationParams(max_new_tokens=4)
    comparing, b_sent = threading.Event(), threading.Event()

    class StallingKey(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            if threading.current_thread().name.startswith("study-A") and not comparing.is_set():
                comparing.set()
                b_sent.wait(timeout=1)  # B runs meanwhile, unless the cache holds B back until A is done
            return str(self) == str(other)

        def __ne__(self, other: object) -> bool:
            return not self == other

    def received(text: str) -> None:
        if text.endswith("B"):
            b_sent.set()

    seen: list[tuple[str, str]] = []
    with serving(recording_server(seen, received)) as base, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="study-A") as study_a:
        backend = OpenAIServerBackend(base + "/v1", "radvlm")
        backend.generate(images["A"], question("A"), params)  # A's image is cached, as for a study's next question
        monkeypatch.setattr(openai_server, "image_key",
                            lambda image, key=openai_server.image_key: StallingKey(key(image)))
        a_asked = study_a.submit(backend.generate, images["A"], question("A", 1), params)
        assert comparing.wait(timeout=10), "study A never looked its image up"
        backend.generate(images["B"], question("B", 1), params)
        a_asked.result(timeout=10)
    assert len(seen) == 3
    assert wrong_images(seen, images) == []

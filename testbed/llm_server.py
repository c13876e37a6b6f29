"""ScriptedLLM: an OpenAI-compatible chat endpoint for tests, answering by which prompt it gets.

It is the named test double for the LLM that cleans reports, writes conversations and judges;
it records every prompt, so a test sees what the real endpoint would have been asked. With
``api_key`` it answers 401 to any other key, as OpenAI does.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from testbed.network import free_port

CONVERSATION = [
    {"from": "human", "value": "Is the heart enlarged?"},
    {"from": "gpt", "value": "The heart appears enlarged."},
    {"from": "human", "value": "Where is the cardiomegaly located on the image?"},
    {"from": "gpt", "value": "The cardiomegaly is located at the coordinates [0.33, 0.45, 0.78, 0.79] on the image."},
]


@dataclass
class ScriptedLLM:
    prompts: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    api_key: str | None = None  # None: any key will do

    def reply(self, prompt: str) -> str:
        if prompt.rstrip().endswith("Rewritten findings:"):
            report = prompt.split("Report:\n", 1)[1].rsplit("\n\nRewritten findings:", 1)[0]
            kept = [s for s in report.split(". ") if "prior" not in s.lower()]
            return ". ".join(kept).strip() or "None"
        if prompt.rstrip().endswith("Conversation:"):
            return "Here it is:\n" + json.dumps(CONVERSATION) + "\nHope this helps."
        if "Overall score: <score>/10" in prompt:
            return "Round 1: correct. Round 2: the box is close.\nOverall score: 7/10"
        return "I do not know this prompt."

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions", response_model=None)
        async def complete(request: Request) -> dict | JSONResponse:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                               "code": "invalid_api_key"}}, status_code=401)
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            self.prompts.append(prompt)
            return {"id": "scripted", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": self.reply(prompt)}}]}

        return app

    def start(self) -> uvicorn.Server:
        server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted LLM server did not start")
            time.sleep(0.02)
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

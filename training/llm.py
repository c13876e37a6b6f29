"""A chat model behind an OpenAI-compatible endpoint (OpenAI, Azure's v1 API, vLLM, a local
server): what cleans reports, writes conversations and judges answers."""

from __future__ import annotations

from dataclasses import dataclass

from openai import AuthenticationError, NotFoundError, OpenAI, OpenAIError, PermissionDeniedError

from training.errors import Refused


class LLMError(RuntimeError):
    """The endpoint failed or gave nothing; the message says which endpoint and why."""


class LLMRefused(Refused):
    """The endpoint refuses every request alike (401 or 403: the key; 404: the URL or the model name):
    no fallback, the command stops. Not an ``LLMError``, so no caller takes it for one report's failure."""


@dataclass(frozen=True)
class Endpoint:
    """Where the chat model is and how long to wait: ``timeout_s`` per request, retried ``max_retries`` times by the
    OpenAI client before it counts as failed."""

    url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key: str = "unused"
    timeout_s: float = 120.0
    max_retries: int = 3


KEY_ENV = "RADVLM_LLM_API_KEY"  # where the commands read the endpoint's key


class ChatLLM:
    """One question in, one answer out; greedy, so a rebuild asks the same way."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._client = OpenAI(base_url=endpoint.url, api_key=endpoint.api_key, timeout=endpoint.timeout_s,
                              max_retries=endpoint.max_retries)

    def ask(self, prompt: str, max_tokens: int = 2048) -> str:
        try:
            reply = self._client.chat.completions.create(
                model=self.endpoint.model, messages=[{"role": "user", "content": prompt}],
                temperature=0.0, max_tokens=max_tokens)
        except (AuthenticationError, PermissionDeniedError, NotFoundError) as exc:
            raise LLMRefused(f"{self.endpoint.url} ({self.endpoint.model}) refuses the request: {_first_line(exc)}; "
                             f"check the key (${KEY_ENV}), the URL and the model name") from exc
        except OpenAIError as exc:
            raise LLMError(f"{self.endpoint.url} ({self.endpoint.model}): {type(exc).__name__}: {exc}") from exc
        text = (reply.choices[0].message.content or "").strip() if reply.choices else ""
        if not text:
            raise LLMError(f"{self.endpoint.url} ({self.endpoint.model}) answered nothing")
        return text


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__

"""RadVLM behind an OpenAI-compatible model server (vLLM, SGLang, ``transformers serve``).

The worker then holds no weights. Each question is one ``/v1/chat/completions`` call with the same
turns as in-process: the image (8-bit, three identical channels, as the in-process path gives the
processor) as a PNG data URL in the first user turn, no system message, greedy decoding. The
server renders the prompt with its chat template, which must be RadVLM's
(``radvlm/radvlm_chat_template.jinja``). A server that cannot be reached raises
``ModelUnavailable``: the study waits and is retried, it is not failed.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from radvlm.backends.base import Completion, GenerationParams, ModelUnavailable, OnText
from radvlm.backends.prefix_cache import image_key
from radvlm.prompts import Turn
from records.pixels import model_picture

IMAGES_KEPT = 32  # data URLs kept: one per study in flight (compose: worker-vllm runs 32 threads)


def image_url(image: np.ndarray) -> str:
    """The model image as a PNG data URL: RGB with three identical channels, losslessly."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError("image must be 8-bit grayscale (rows, columns)")
    buffer = io.BytesIO()
    model_picture(image).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(turns: list[Turn], url: str) -> list[dict[str, Any]]:
    """RadVLM's turns as chat messages: the image first in the first user turn only."""
    out = []
    for index, turn in enumerate(turns):
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}] if index == 0 else []
        parts.append({"type": "text", "text": turn.text})
        out.append({"role": turn.role, "content": parts})
    return out


class OpenAIServerBackend:
    """A client of the site's model server; ``revision`` names the weights it serves (results are keyed by it)."""

    name = "openai-server"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, revision: str | None = None,
                 timeout_s: float = 300, retries: int = 2) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=retries)
        self.base_url, self.model_id = base_url, model
        self.model_revision = revision or f"served:{model}"[:64]
        self._urls: OrderedDict[str, str] = OrderedDict()  # recent images' data URLs, most recent last
        self._urls_lock = threading.Lock()

    def _url(self, image: np.ndarray) -> str:
        """The data URL of ``image`` itself, encoded once for the many questions of a study. Studies run
        at once on threads (worker concurrency): each call returns its own image's URL, never another
        call's, so a question is never sent with another patient's image."""
        key = image_key(image)
        with self._urls_lock:
            url = self._urls.get(key)
            if url is None:
                url = self._urls[key] = image_url(image)
                if len(self._urls) > IMAGES_KEPT:
                    self._urls.popitem(last=False)  # the least recently used
            else:
                self._urls.move_to_end(key)
        return url

    def generate(self, image: np.ndarray, turns: list[Turn], params: GenerationParams,
                 on_text: OnText | None = None) -> Completion:
        import openai

        start = time.perf_counter()
        request: dict[str, Any] = dict(model=self.model_id, messages=messages(turns, self._url(image)),
                                       max_tokens=params.max_new_tokens, temperature=0.0)
        if params.min_new_tokens:
            request["extra_body"] = {"min_tokens": params.min_new_tokens}  # vLLM and SGLang take it
        pieces: list[str] = []
        usage = None
        try:
            stream = self.client.chat.completions.create(**request, stream=True,
                                                         stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
                        if on_text:
                            on_text(choice.delta.content)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                openai.RateLimitError) as exc:
            raise ModelUnavailable(f"model server {self.base_url}: {type(exc).__name__}: {exc}") from exc
        text = "".join(pieces)
        return Completion(text=text.strip(), prompt_tokens=usage.prompt_tokens if usage else 0,
                          new_tokens=usage.completion_tokens if usage else len(pieces),
                          seconds=time.perf_counter() - start)

    def generate_many(self, image: np.ndarray, conversations: list[list[Turn]],
                      params: list[GenerationParams]) -> list[Completion]:
        """Concurrent requests: the server batches them (and shares the image prefix when it caches prefixes)."""
        from concurrent.futures import ThreadPoolExecutor

        self._url(image)  # encode the image once, before the threads
        with ThreadPoolExecutor(max_workers=max(1, len(conversations))) as pool:
            return list(pool.map(lambda job: self.generate(image, job[0], job[1]), zip(conversations, params,
                                                                                      strict=True)))

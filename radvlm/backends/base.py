"""The seam between the pipeline and a model: an image, RadVLM-formatted turns, greedy params."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from radvlm.prompts import Turn
from records.text import plain_text


@dataclass(frozen=True)
class GenerationParams:
    """Greedy decoding, as RadVLM was evaluated; only the length is a choice."""

    max_new_tokens: int = 1500
    min_new_tokens: int = 0  # benchmarks only: force a length on random weights


@dataclass(frozen=True)
class Completion:
    """A model's answer; its text made plain text (``records.text``) whatever the backend, so that no
    report, chat answer, SR, HL7 or FHIR object carries a NUL or another control character."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", plain_text(self.text))


OnText = Callable[[str], None]


class ModelBackend(Protocol):
    """``image`` is the 8-bit grayscale model image (rows, columns) at the original size.

    ``on_text``, when given, receives the answer in pieces as it is generated (for streaming);
    the returned ``Completion`` holds the whole answer either way.
    """

    name: str
    model_id: str
    model_revision: str

    def generate(self, image: np.ndarray, turns: list[Turn], params: GenerationParams,
                 on_text: OnText | None = None) -> Completion: ...

    def generate_many(self, image: np.ndarray, conversations: list[list[Turn]],
                      params: list[GenerationParams]) -> list[Completion]:
        """Several questions about the same image, answered as ``generate`` would answer each: together
        where the backend can (one decode batch, or concurrent requests to a server)."""
        ...


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do about it."""


class ModelUnavailable(RuntimeError):
    """The model cannot be reached now (a model server down or overloaded): wait and retry, never fail for it."""


class PromptTooLong(ValueError):
    """The conversation and its longest answer do not fit what the model runtime holds for one question."""

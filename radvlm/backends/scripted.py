"""A scripted RadVLM, for deterministic tests only: answers in RadVLM's own formats.

It is named as the test double it is (backend "scripted", revision "scripted"), never loads
weights, and is never the default. The answers follow the formats in RadVLM's paper and
training templates; which findings it reports is set by the test. In a conversation it resolves
"it" from the turns it is given, so an answer shows whether the history reached the model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from radvlm import prompts
from radvlm.backends.base import Completion, GenerationParams, OnText
from radvlm.parsing import box_text, join_words
from radvlm.prompts import Turn


@dataclass
class ScriptedBackend:
    """Answers by question kind; ``boxes`` maps a grounding label (lower case) to its boxes."""

    findings: list[str] = field(default_factory=lambda: ["cardiomegaly", "pleural effusion"])
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=lambda: {
        "cardiomegaly": [(0.33, 0.45, 0.78, 0.79)],
        "pleural effusion": [(0.05, 0.62, 0.31, 0.88), (0.7, 0.64, 0.95, 0.9)],
    })
    delay_s: float = 0.0
    name: str = "scripted"
    model_id: str = "scripted-radvlm"
    model_revision: str = "scripted"
    requests: list[list[Turn]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _named(self, text: str) -> list[str]:
        """The findings or boxed labels named in ``text``, in the order they appear."""
        lowered = text.lower()
        names = {*self.findings, *self.boxes}
        return [name for position, name in sorted((lowered.find(n), n) for n in names) if position >= 0]

    def follow_up(self, turns: list[Turn]) -> str:
        """A free question: about the finding it names, else the last finding named earlier."""
        question = turns[-1].text
        named = self._named(question)
        for turn in reversed(turns[:-1]):
            if named:
                break
            named = self._named(turn.text)
        if not named:
            return "I cannot tell from this image what the question refers to."
        subject = named[-1]
        if question.lower().lstrip().startswith("where"):
            return self.answer(prompts.grounding_question(subject))
        if subject in self.findings:
            return f"Yes, there is {subject} on this Chest X-ray."
        return f"No, there is no {subject} on this Chest X-ray."

    def answer(self, question: str) -> str:
        if question == prompts.REPORT:
            found = ", ".join(self.findings) if self.findings else "no acute cardiopulmonary process"
            return (f"Findings: Frontal view of the chest. {found.capitalize()}. No pneumothorax. "
                    f"Impression: {found.capitalize()}.")
        if question == prompts.ABNORMALITIES:
            if not self.findings:
                return "No abnormalities or lesions are detected on this Chest X-ray."
            if len(self.findings) == 1:
                return f"Yes, there is one abnormality identified: {self.findings[0]}."
            return f"The following abnormalities are identified: {join_words(sorted(self.findings))}."
        for label, boxes in self.boxes.items():
            if question == prompts.grounding_question(label):
                coordinates = join_words([box_text(box) for box in boxes])
                return f"The {label} is located at the coordinates {coordinates} on the image."
        return "I cannot locate it on this image."

    def generate(self, image: np.ndarray, turns: list[Turn], params: GenerationParams,
                 on_text: OnText | None = None) -> Completion:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError("image must be 8-bit grayscale (rows, columns)")
        prompt = prompts.render(turns)  # the same validation every backend applies
        with self._lock:
            self.requests.append(list(turns))
        start = time.perf_counter()
        question = turns[-1].text
        template = prompts.GROUNDING.split("{label}")
        canned = question in (prompts.REPORT, prompts.ABNORMALITIES) or (
            question.startswith(template[0]) and question.endswith(template[1]))
        text = self.answer(question) if canned and len(turns) == 1 else self.follow_up(turns)
        words = text.split(" ")
        for index, word in enumerate(words):  # the delay is spread over the words, as a GPU streams
            if self.delay_s:
                time.sleep(self.delay_s / len(words))
            if on_text:
                on_text(word if index == len(words) - 1 else word + " ")
        return Completion(text=text, prompt_tokens=len(prompt.split()), new_tokens=len(text.split()),
                          seconds=time.perf_counter() - start)

    def generate_many(self, image: np.ndarray, conversations: list[list[Turn]],
                      params: list[GenerationParams]) -> list[Completion]:
        return [self.generate(image, turns, p) for turns, p in zip(conversations, params, strict=True)]

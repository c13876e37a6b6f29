"""A scripted RadVLM, for deterministic tests only: answers in RadVLM's own formats.

It is named as the test double it is (backend "scripted", revision "scripted"), never loads
weights, and is never the default. The answers follow the formats in RadVLM's paper and
training templates; which findings it reports is set by the test.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from worker import prompts
from worker.backends.base import Completion, GenerationParams
from worker.prompts import Turn


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
            return f"The following abnormalities are identified: {_join(sorted(self.findings))}."
        for label, boxes in self.boxes.items():
            if question == prompts.grounding_question(label):
                coordinates = _join([f"[{x1}, {y1}, {x2}, {y2}]" for x1, y1, x2, y2 in boxes])
                return f"The {label} is located at the coordinates {coordinates} on the image."
        return "I cannot locate it on this image."

    def generate(self, image: np.ndarray, turns: list[Turn], params: GenerationParams) -> Completion:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError("image must be 8-bit grayscale (rows, columns)")
        prompt = prompts.render(turns)  # the same validation every backend applies
        with self._lock:
            self.requests.append(list(turns))
        start = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        text = self.answer(turns[-1].text)
        return Completion(text=text, prompt_tokens=len(prompt.split()), new_tokens=len(text.split()),
                          seconds=time.perf_counter() - start)

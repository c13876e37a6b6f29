"""One datapoint of the instruction set, and the LLaVA conversation JSON the fine-tuning reads.

``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": ...}, ...], "task", "source"}``: the image marker opens the first human turn only, as
in RadVLM's data; ``task`` and ``source`` let the evaluation and the counts group datapoints.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TASKS = ("report", "abnormalities", "abnormality-grounding", "detection", "anatomical-grounding",
         "phrase-grounding", "conversation", "grounded-conversation")


class BadInstruction(ValueError):
    """A datapoint the fine-tuning could not read; the message says which and why."""


@dataclass(frozen=True)
class Instruction:
    """One datapoint: an image and its rounds of (question, answer), with its task and source; ``BadInstruction`` when
    the task is unknown, or a turn is empty or holds ``<image>``."""

    id: str
    image: str
    rounds: tuple[tuple[str, str], ...]  # (question, answer) pairs, in order
    task: str
    source: str
    context: str = ""  # what a judge is told about the image (conversations)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BadInstruction(f"{self.id}: unknown task {self.task!r}")
        if not self.rounds:
            raise BadInstruction(f"{self.id}: no question")
        for question, answer in self.rounds:
            if not question.strip() or not answer.strip():
                raise BadInstruction(f"{self.id}: empty question or answer")
            if "<image>" in question or "<image>" in answer:
                raise BadInstruction(f"{self.id}: '<image>' inside a turn's text")

    def llava(self) -> dict:
        turns = []
        for index, (question, answer) in enumerate(self.rounds):
            turns.append({"from": "human", "value": ("<image>\n" + question) if index == 0 else question})
            turns.append({"from": "gpt", "value": answer})
        entry = {"id": self.id, "image": self.image, "conversations": turns, "task": self.task, "source": self.source}
        if self.context:
            entry["context"] = self.context
        return entry

    @classmethod
    def from_llava(cls, entry: dict) -> Instruction:
        """Read one entry back (ours, or any LLaVA JSON with human/gpt pairs)."""
        ident = str(entry.get("id", "?"))
        turns = entry.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
            raise BadInstruction(f"{ident}: conversations must be human/gpt pairs")
        rounds = []
        for index in range(0, len(turns), 2):
            human, gpt = turns[index], turns[index + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise BadInstruction(f"{ident}: turn {index} is not a human turn followed by a gpt turn")
            question = str(human["value"])
            if index == 0:
                question = question.removeprefix("<image>\n").removeprefix("<image>")
            rounds.append((question, str(gpt["value"])))
        if "image" not in entry:
            raise BadInstruction(f"{ident}: no image")
        return cls(id=ident, image=str(entry["image"]), rounds=tuple(rounds),
                   task=str(entry.get("task", "conversation" if len(rounds) > 1 else "report")),
                   source=str(entry.get("source", "unknown")), context=str(entry.get("context", "")))


def write(instructions: Iterable[Instruction], path: Path) -> Counter[tuple[str, str]]:
    """Write the LLaVA JSON list; returns how many datapoints each (source, task) gave. The list goes
    to ``{path}.part`` and takes ``path``'s name once whole: a build that fails leaves no file there."""
    counts: Counter[tuple[str, str]] = Counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with partial.open("w") as out:
            out.write("[")
            for index, item in enumerate(instructions):
                out.write(",\n" if index else "\n")
                json.dump(item.llava(), out, ensure_ascii=False)
                counts[(item.source, item.task)] += 1
            out.write("\n]\n")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return counts


def read(path: Path) -> Iterator[Instruction]:
    """The datapoints of an instruction JSON file (ours, or any LLaVA list), one at a time: a bad entry is
    ``BadInstruction`` when it is reached."""
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise BadInstruction(f"{path}: not a JSON list")
    for entry in entries:
        yield Instruction.from_llava(entry)

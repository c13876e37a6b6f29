"""Conversations: written by a chat model from what is known of an image, and judged by one.

Generation follows the paper: the LLM gets the (cleaned) report, the labels, the view, the
patient's sex and, for grounded conversations, phrases with their boxes, and writes 5 to 10
rounds of questions and cautious answers as a JSON array of ``{"from", "value"}`` turns.
Judging follows it too: the LLM sees the same facts, each question with its expected and its
generated answer, and ends with ``Overall score: <score>/10``. The prompts are ours.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from training.boxes import NormBox, boxes_text
from training.instructions import Instruction
from training.llm import ChatLLM, LLMError

log = logging.getLogger(__name__)

SCORE = re.compile(r"overall\s*score\s*:?\s*\**\s*([\d.]+)\s*/\s*10", re.IGNORECASE)

GENERATION_PROMPT = """You are given what is known about one chest X-ray; the user you will imitate cannot see it.
Write a conversation of {low} to {high} rounds between a user who looks at the image and an AI assistant that
answers from the image alone.
- The user asks general, exploratory or specific questions about the image.
- The assistant answers cautiously and concisely, only from what can be seen, without a definite diagnosis.
- Never mention or imply an earlier study, and never use the word "changes".
- Do not use information beyond what is given.{grounding}
Output strictly a JSON array of turns, alternating {{"from": "human", "value": "..."}} and {{"from": "gpt", "value": "..."}},
starting with the human. No other text.

{facts}
Conversation:"""  # noqa: E501 (the prompt's lines are the prompt's own)

GROUNDING_RULE = """
- Some observations come with boxes [x_min, y_min, x_max, y_max] (fractions of the image width and height):
  let the user ask where they are (for example "Where is the [observation] located on the image?") and let
  the assistant answer with the boxes written exactly in that format."""

JUDGE_PROMPT = """You grade an AI assistant's answers about a chest X-ray.
What is known about the image:
{facts}
For each round you get the user's question, the expected answer and the generated answer. Explain briefly,
round by round, how correct, complete and relevant the generated answer is compared with the expected one,
without being harsh about small differences of wording. Then give one overall integer score from 0 to 10.
The last line must be exactly:
Overall score: <score>/10

{rounds}
Note: write the overall score (/10) this way, so that it can be extracted: Overall score: <score>/10"""


class ConversationError(ValueError):
    """An LLM's conversation that cannot be used; the message says why."""


@dataclass(frozen=True)
class Case:
    """What the LLM is told about one image."""

    id: str
    image: str
    report: str
    labels: tuple[str, ...] = ()
    view: str = "unknown"
    sex: str = "unknown"
    phrases: tuple[tuple[str, tuple[NormBox, ...]], ...] = field(default=())

    def facts(self) -> str:
        lines = [f"Radiology report: {self.report}",
                 f"List of abnormalities: {', '.join(self.labels) if self.labels else 'none'}",
                 f"View: {self.view}", f"Sex: {self.sex}"]
        if self.phrases:
            lines.append("Selected observations with bounding box coordinates:")
            lines += [f"{phrase}: {boxes_text(boxes)}" for phrase, boxes in self.phrases]
        return "\n".join(lines)


def generation_prompt(case: Case, rounds: tuple[int, int] = (5, 10)) -> str:
    """The prompt asking the LLM for a conversation about ``case`` of ``rounds`` (fewest, most) rounds, with the rule on
    boxes when the case has phrases."""
    return GENERATION_PROMPT.format(low=rounds[0], high=rounds[1], facts=case.facts(),
                                    grounding=GROUNDING_RULE if case.phrases else "")


def parse_conversation(text: str) -> tuple[tuple[str, str], ...]:
    """The (question, answer) rounds of the JSON array in an LLM's answer."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ConversationError("no JSON array in the answer")
    try:
        turns = json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        raise ConversationError(f"not JSON: {exc}") from exc
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise ConversationError("the turns are not human/gpt pairs")
    rounds = []
    for index in range(0, len(turns), 2):
        human, gpt = turns[index], turns[index + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)
                and human.get("from") == "human" and gpt.get("from") == "gpt"):
            raise ConversationError(f"turn {index} is not a human turn followed by a gpt turn")
        question, answer = str(human.get("value", "")).strip(), str(gpt.get("value", "")).strip()
        if not question or not answer:
            raise ConversationError(f"round {index // 2 + 1} is empty")
        rounds.append((question.replace("<image>", "").strip(), answer))
    return tuple(rounds)


def generate(cases: Iterable[Case], llm: ChatLLM, cache: Path, source: str) -> Iterator[Instruction]:
    """A conversation per case; answers kept under ``cache`` (``{id}.json``) so a build resumes."""
    cache.mkdir(parents=True, exist_ok=True)
    for case in cases:
        stored = cache / f"{case.id}.json"
        if stored.exists():
            text = stored.read_text()
        else:
            try:
                text = llm.ask(generation_prompt(case))
            except LLMError as exc:
                log.warning("conversation %s: %s; skipped", case.id, exc)
                continue
            stored.write_text(text)
        try:
            rounds = parse_conversation(text)
        except ConversationError as exc:
            log.warning("conversation %s: %s; skipped", case.id, exc)
            continue
        yield Instruction(id=f"{source}-conversation-{case.id}", image=case.image, rounds=rounds,
                          task="grounded-conversation" if case.phrases else "conversation", source=source,
                          context=case.facts())


def judge_prompt(case_facts: str, rounds: Sequence[tuple[str, str]], generated: Sequence[str]) -> str:
    """The prompt asking the judge to score a conversation: the image's facts, then each round's question with its
    expected and its generated answer, paired in order (an unpaired one is left out)."""
    parts = [f"User: {question}\nExpected answer: {expected}\nGenerated answer: {answer}"
             for (question, expected), answer in zip(rounds, generated)]
    return JUDGE_PROMPT.format(facts=case_facts, rounds="\n\n".join(parts))


def parse_score(text: str) -> float | None:
    """The last "Overall score: X/10" of a judge's answer (None when there is none, or over 10)."""
    found = [float(v) for v in SCORE.findall(text) if v.replace(".", "", 1).isdigit()]
    found = [v for v in found if 0 <= v <= 10]
    return found[-1] if found else None

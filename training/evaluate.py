"""Evaluate a model the way the paper does: ask every instruction's questions, then score per task.

The model is the service's own backend (``records.settings.ModelSettings``: transformers, a
model server, or the scripted test double), prompted as in production. In conversations each
round is asked with the expected answers of the earlier rounds as history, so a round is judged
on its own. Predictions are written to ``predictions.jsonl`` and the scores to ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from radvlm.backends.base import GenerationParams, ModelBackend
from radvlm.prompts import Turn
from training import metrics
from training.conversations import judge_prompt, parse_score
from training.images import gray_pixels
from training.instructions import Instruction
from training.llm import ChatLLM, LLMError

log = logging.getLogger(__name__)

GROUNDING_TASKS = ("abnormality-grounding", "anatomical-grounding", "phrase-grounding", "detection")
CONVERSATION_TASKS = ("conversation", "grounded-conversation")


@dataclass(frozen=True)
class Prediction:
    """One instruction's questions, expected answers and the model's answers: a line of predictions.jsonl; ``context``
    is what the judge is told about the image."""

    id: str
    task: str
    source: str
    questions: list[str]
    references: list[str]
    answers: list[str]
    context: str = ""


def predict(items: Iterable[Instruction], backend: ModelBackend, image_folder: Path | None = None,
            params: GenerationParams = GenerationParams()) -> Iterable[Prediction]:
    """Ask ``backend`` every round of each instruction, with the expected answers of the earlier rounds as history;
    lazily, as the caller iterates. Relative image paths start at ``image_folder``."""
    for item in items:
        path = Path(item.image)
        pixels = gray_pixels(path if path.is_absolute() or image_folder is None else image_folder / path)
        answers = []
        for index, (question, _) in enumerate(item.rounds):
            turns = []
            for earlier, expected in item.rounds[:index]:
                turns += [Turn("user", earlier), Turn("assistant", expected)]
            answers.append(backend.generate(pixels, turns + [Turn("user", question)], params).text)
        yield Prediction(item.id, item.task, item.source, [q for q, _ in item.rounds], [a for _, a in item.rounds],
                         answers, item.context)


@dataclass(frozen=True)
class Scoring:
    """What the scores need besides the predictions: a BERTScore model, a judge."""

    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    judge: ChatLLM | None = None


def judge_score(prediction: Prediction, judge: ChatLLM) -> float | None:
    """The judge's score (0 to 10) of one conversation's answers; None, logged, when the endpoint fails or its reply
    holds no score (an endpoint that refuses the request stops the run)."""
    prompt = judge_prompt(prediction.context or "(not given)", list(zip(prediction.questions, prediction.references)),
                          prediction.answers)
    try:
        return parse_score(judge.ask(prompt))
    except LLMError as exc:
        log.warning("judge on %s: %s", prediction.id, exc)
        return None


def score(predictions: Sequence[Prediction], scoring: Scoring) -> dict[str, Any]:
    """Scores per task; a task whose metric cannot be computed says why instead of a number."""
    by_task: dict[str, list[Prediction]] = defaultdict(list)
    for prediction in predictions:
        by_task[prediction.task].append(prediction)
    out: dict[str, Any] = {}
    for task, group in sorted(by_task.items()):
        answers = [p.answers[0] for p in group]
        references = [p.references[0] for p in group]
        entry: dict[str, Any] = {"n": len(group)}
        if task == "abnormalities":
            labels = metrics.label_scores(answers, references)
            entry.update(macro=labels.macro, micro=labels.micro, per_label=labels.per_label)
        elif task in GROUNDING_TASKS:
            entry["map50"] = metrics.mean_average_precision(list(zip(answers, references)))
        elif task == "report":
            entry["rouge_l"] = metrics.rouge_l(answers, references)
            if scoring.bertscore_model:
                entry["bertscore_f1"] = metrics.bert_score_f1(answers, references, scoring.bertscore_model,
                                                              scoring.bertscore_layers)
            else:
                entry["bertscore_f1"] = "not computed: no --bertscore-model"
        elif task in CONVERSATION_TASKS:
            if scoring.judge is None:
                entry["judge_score"] = "not computed: no judge endpoint"
            else:
                scores = [s for s in (judge_score(p, scoring.judge) for p in group) if s is not None]
                entry["judge_score"] = sum(scores) / len(scores) if scores else "no score could be read"
                entry["judged"] = len(scores)
        out[task] = entry
    return out


def write_predictions(predictions: Iterable[Prediction], path: Path) -> list[Prediction]:
    """Write each prediction to ``path`` as a JSON line as it comes (a failure keeps those asked so far) and return them
    all."""
    kept = []
    with path.open("w") as handle:
        for prediction in predictions:
            handle.write(json.dumps(asdict(prediction), ensure_ascii=False) + "\n")
            kept.append(prediction)
    return kept


def read_predictions(path: Path) -> list[Prediction]:
    """The predictions of a predictions.jsonl (blank lines skipped), to score again without asking the model."""
    return [Prediction(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

"""One frontal image in, RadVLM's draft out: report, labels, and a box for each localisable finding."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from radvlm import prompts
from radvlm.backends.base import GenerationParams, ModelBackend
from radvlm.parsing import boxes_from_answer, labels_from_answer
from radvlm.prompts import Turn
from records.metrics import observe_generation
from records.pixels import DEFAULT_MAX_MEGAPIXELS, ModelImage
from records.schema import Answer, Grounding, ImageResult


@dataclass(frozen=True)
class AnalysisOptions:
    """How an analysis asks the model: the answer's token limit, the anatomical regions grounded on every image, and the
    image size the node let through."""
    max_new_tokens: int = 1500
    regions: tuple[str, ...] = ()
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS  # the node's limit: an image it let through is decoded here too


def ask(backend: ModelBackend, image: ModelImage, questions: list[tuple[str, str]],
        params: GenerationParams) -> list[Answer]:
    """Single-turn questions (task, text) about one image, asked together; boxes are mapped to pixels."""
    start = time.perf_counter()
    completions = backend.generate_many(image.pixels, [[Turn("user", question)] for _, question in questions],
                                        [params] * len(questions))
    observe_generation("analysis", sum(c.new_tokens for c in completions), time.perf_counter() - start)
    answers = []
    for (task, question), completion in zip(questions, completions, strict=True):
        parsed = boxes_from_answer(completion.text, image.columns, image.rows)
        answers.append(Answer(task=task, question=question, text=completion.text, boxes=parsed.boxes,
                              malformed=parsed.malformed, seconds=completion.seconds,
                              new_tokens=completion.new_tokens))
    return answers


def analyse_image(backend: ModelBackend, image: ModelImage, sop_instance_uid: str, series_instance_uid: str,
                  options: AnalysisOptions) -> ImageResult:
    """The report asked on a thread of its own; beside it, the abnormalities and the anatomical
    regions together, then, as soon as the abnormalities are answered (a few words, while the report
    is still being written), a grounding question for each finding they named. On a backend that
    decodes questions together, the groundings share the report's decode steps instead of waiting
    for it."""
    params = GenerationParams(max_new_tokens=options.max_new_tokens)
    first = [("abnormalities", prompts.ABNORMALITIES)]
    first += [("anatomical grounding", prompts.grounding_question(region)) for region in options.regions]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="report") as report_thread:
        written = report_thread.submit(ask, backend, image, [("report", prompts.REPORT)], params)
        abnormalities, *regions = ask(backend, image, first, params)
        labels = labels_from_answer(abnormalities.text)
        found = [label for label in prompts.GROUNDABLE if labels[label]]
        groundable = [("abnormality grounding", prompts.grounding_question(prompts.GROUNDABLE[label]))
                      for label in found]
        located = ask(backend, image, groundable, params) if found else []
        [report] = written.result()
    if not abnormalities.text.strip():
        abnormalities = abnormalities.model_copy(update={"malformed": "empty answer"})
    groundings = []
    for label, answer in zip(found, located, strict=True):
        if not answer.boxes and answer.malformed is None:
            answer = answer.model_copy(update={"malformed": "no box in the answer"})
        groundings.append(Grounding(label=label, kind="abnormality", answer=answer))
    groundings += [Grounding(label=region, kind="anatomy", answer=answer)
                   for region, answer in zip(options.regions, regions, strict=True)]
    return ImageResult(
        sop_instance_uid=sop_instance_uid, series_instance_uid=series_instance_uid, rows=image.rows,
        columns=image.columns, pixel_steps=image.steps, report=report, abnormalities=abnormalities,
        labels=labels, groundings=groundings,
    )

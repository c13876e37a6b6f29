"""One frontal image in, RadVLM's draft out: report, labels, and a box for each localisable finding."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.pixels import ModelImage
from records.schema import Answer, Grounding, ImageResult
from worker import prompts
from worker.backends.base import GenerationParams, ModelBackend
from worker.parsing import boxes_from_answer, labels_from_answer
from worker.prompts import Turn


@dataclass(frozen=True)
class AnalysisOptions:
    max_new_tokens: int = 1500
    regions: tuple[str, ...] = ()


def ask(backend: ModelBackend, image: ModelImage, task: str, question: str, params: GenerationParams) -> Answer:
    """One single-turn question; boxes in the answer are parsed and mapped to pixels."""
    completion = backend.generate(image.pixels, [Turn("user", question)], params)
    parsed = boxes_from_answer(completion.text, image.columns, image.rows)
    return Answer(task=task, question=question, text=completion.text, boxes=parsed.boxes,
                  malformed=parsed.malformed, seconds=completion.seconds, new_tokens=completion.new_tokens)


def analyse_image(backend: ModelBackend, image: ModelImage, sop_instance_uid: str, series_instance_uid: str,
                  options: AnalysisOptions) -> ImageResult:
    params = GenerationParams(max_new_tokens=options.max_new_tokens)
    report = ask(backend, image, "report", prompts.REPORT, params)
    abnormalities = ask(backend, image, "abnormalities", prompts.ABNORMALITIES, params)
    labels = labels_from_answer(abnormalities.text)
    if not abnormalities.text.strip():
        abnormalities = abnormalities.model_copy(update={"malformed": "empty answer"})
    groundings = []
    for label, grounding_label in prompts.GROUNDABLE.items():
        if labels[label]:
            answer = ask(backend, image, "abnormality grounding", prompts.grounding_question(grounding_label), params)
            if not answer.boxes and answer.malformed is None:
                answer = answer.model_copy(update={"malformed": "no box in the answer"})
            groundings.append(Grounding(label=label, kind="abnormality", answer=answer))
    for region in options.regions:
        answer = ask(backend, image, "anatomical grounding", prompts.grounding_question(region), params)
        groundings.append(Grounding(label=region, kind="anatomy", answer=answer))
    return ImageResult(
        sop_instance_uid=sop_instance_uid, series_instance_uid=series_instance_uid, rows=image.rows,
        columns=image.columns, pixel_steps=image.steps, report=report, abnormalities=abnormalities,
        labels=labels, groundings=groundings,
    )

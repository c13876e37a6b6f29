"""Questions and answers in the shapes RadVLM was trained on, one function per task.

Each question list starts with the canonical question the service asks (``radvlm.prompts``);
the variants after it are ours, in the same spirit as RadVLM's templates (the paper drew one at
random per datapoint). The answer shapes are RadVLM's, because the service parses them
(``radvlm.parsing``): sorted lower-case labels joined "a, b and c", boxes ``[x1, y1, x2, y2]``
at two decimals joined the same way, findings separated by "; ".

Every choice comes from the ``random.Random`` passed in, so a build with the same seed writes
the same file.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from radvlm import prompts
from radvlm.parsing import join_words
from training.boxes import NormBox, boxes_text

REPORT_QUESTIONS = (
    prompts.REPORT,
    "Please write a radiology report for this chest X-ray.",
    "Describe the findings of this chest radiograph as a report.",
    "Draft the report for this Chest X-ray.",
    "What would the radiology report of this image say?",
    "Write the findings section for this chest X-ray.",
)
ABNORMALITY_QUESTIONS = (
    prompts.ABNORMALITIES,
    "Which abnormalities do you see on this Chest X-ray?",
    "List the abnormalities on this image, if there are any.",
    "Is anything abnormal on this chest radiograph?",
    "Please identify the abnormalities on this Chest X-ray.",
)
LOCATION_QUESTIONS = (
    prompts.GROUNDING,
    "Where on this image is the {label}?",
    "Show me where the {label} is on this Chest X-ray.",
    "Can you locate the {label} on this image?",
    "Please give the position of the {label} in this Chest X-ray.",
)
DETECTION_QUESTIONS = (
    prompts.DETECTION,
    "Are there abnormalities on this Chest X-ray, and where are they?",
    "Please find and locate every abnormality on this image.",
    "Detect the lesions on this Chest X-ray and give their positions.",
)
PHRASE_QUESTIONS = (
    prompts.PHRASE,
    "Find the region that matches this sentence: {phrase}",
    "Where on the image is the following observation: {phrase}",
    "Give the bounding box for: {phrase}",
)

NO_ABNORMALITY = (
    "No abnormalities or lesions are detected on this Chest X-ray.",
    "There are no abnormalities on this Chest X-ray.",
    "This Chest X-ray shows no abnormality.",
)
ONE_ABNORMALITY = (
    "Yes, there is one abnormality identified: {labels}.",
    "One abnormality is seen: {labels}.",
)
SEVERAL_ABNORMALITIES = (
    "The following abnormalities are identified: {labels}.",
    "Several abnormalities are seen: {labels}.",
)
LOCATION_ANSWERS = (
    "The {label} is located at the coordinates {boxes} on the image.",
    "The {label} is at {boxes} on the image.",
    "On this image the {label} lies at the coordinates {boxes}.",
)
DETECTION_OPENINGS = (
    "Sure! I can find",
    "The image shows",
    "On this Chest X-ray there is",
)
NO_LESION = (
    "I can't find any lesion on the image.",
    "No lesion is visible on this Chest X-ray.",
)
PHRASE_ANSWERS = (
    "The bounding box for this observation is {boxes}.",
    "This observation is located at {boxes}.",
    "It is found at the coordinates {boxes}.",
)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def report(rng: random.Random, text: str) -> tuple[str, str]:
    """Report generation: a question drawn from the list, and the (cleaned) report, unchanged, as the answer."""
    return rng.choice(REPORT_QUESTIONS), text


def abnormalities(rng: random.Random, labels: Sequence[str]) -> tuple[str, str]:
    """Labels present (any case); none means "No Finding"."""
    names = sorted({label.lower() for label in labels})
    question = rng.choice(ABNORMALITY_QUESTIONS)
    if not names:
        return question, rng.choice(NO_ABNORMALITY)
    shapes = ONE_ABNORMALITY if len(names) == 1 else SEVERAL_ABNORMALITIES
    return question, rng.choice(shapes).format(labels=join_words(names))


def location(rng: random.Random, label: str, boxes: Sequence[NormBox]) -> tuple[str, str]:
    """Abnormality or anatomical grounding of one label (all its boxes)."""
    name = prompts.label_in_question(label)
    return (rng.choice(LOCATION_QUESTIONS).format(label=name),
            rng.choice(LOCATION_ANSWERS).format(label=name, boxes=boxes_text(boxes)))


def detection(rng: random.Random, findings: Mapping[str, Sequence[NormBox]]) -> tuple[str, str]:
    """Every abnormality of an image with its boxes, labels in sorted order."""
    question = rng.choice(DETECTION_QUESTIONS)
    if not findings:
        return question, rng.choice(NO_LESION)
    parts = []
    for label in sorted(findings, key=str.lower):
        name = label.lower()
        parts.append(f"{_article(name)} {name} located at the coordinates {boxes_text(findings[label])}")
    return question, f"{rng.choice(DETECTION_OPENINGS)} {'; '.join(parts)}."


def phrase(rng: random.Random, sentence: str, boxes: Sequence[NormBox]) -> tuple[str, str]:
    """Phrase grounding: the sentence (stripped) in the question, its boxes in the answer, as RadVLM writes them."""
    return (rng.choice(PHRASE_QUESTIONS).format(phrase=sentence.strip()),
            rng.choice(PHRASE_ANSWERS).format(boxes=boxes_text(boxes)))

"""RSNA Pneumonia Detection: lung opacity grounding (``stage_2_train_labels.csv``).

Columns ``patientId, x, y, width, height, Target``; a patient with several opacities has
several rows; boxes are in pixels of ``stage_2_train_images/{patientId}.dcm``. The challenge's
class is "Lung Opacity", one of the CheXpert labels the service localises.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import from_xywh
from training.instructions import Instruction
from training.sources.files import ImageSize, Layout, Table, UnusableImage, find, header_size, number, rows

SOURCE = "rsna-pneumonia"
LABEL = "Lung Opacity"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
LAYOUT = Layout((Table(("stage_2_train_labels.csv", "stage_2_train_labels.csv.zip"), COLUMNS),),
                "stage_2_train_images/{patientId}.dcm")


def opacity_grounding(root: Path, rng: random.Random, size: ImageSize = header_size) -> Iterator[Instruction]:
    table = find(root, "stage_2_train_labels.csv", "stage_2_train_labels.csv.zip")
    boxes: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for row in rows(table, COLUMNS):
        if row["Target"] == "1":
            boxes[row["patientId"]].append(tuple(number(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
    for patient, pixel_boxes in boxes.items():
        image = root / "stage_2_train_images" / f"{patient}.dcm"
        try:
            width, height = size(image)
        except UnusableImage:  # a build that checks images counts it
            continue
        question, answer = answers.location(rng, LABEL, [from_xywh(*b, width, height) for b in pixel_boxes])
        yield Instruction(id=f"{SOURCE}-{patient}", image=str(image), rounds=((question, answer),),
                          task="abnormality-grounding", source=SOURCE)

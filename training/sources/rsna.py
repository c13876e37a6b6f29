"""RSNA Pneumonia Detection: lung opacity grounding (``stage_2_train_labels.csv``).

Columns ``patientId, x, y, width, height, Target``; a patient with several opacities has
several rows; boxes are in pixels of ``stage_2_train_images/{patientId}.dcm``. The challenge's
class is "Lung Opacity", one of the CheXpert labels the service localises. A patient with a box
that cannot be placed on the image (outside it: a downsampled copy) is left out, noted in ``boxes``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import Placement
from training.instructions import Instruction
from training.sources.files import ImageSize, Layout, Table, UnusableImage, find, header_size, number, rows

SOURCE = "rsna-pneumonia"
LABEL = "Lung Opacity"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
LAYOUT = Layout((Table(("stage_2_train_labels.csv", "stage_2_train_labels.csv.zip"), COLUMNS),),
                "stage_2_train_images/{patientId}.dcm")


def opacity_grounding(root: Path, rng: random.Random, size: ImageSize = header_size,
                      boxes: Placement | None = None) -> Iterator[Instruction]:
    """One "Lung Opacity" grounding datapoint per patient with an opacity (Target 1), with all its boxes; a patient
    whose image cannot be read, or whose boxes do not all fit it, is left out."""
    placement = boxes if boxes is not None else Placement()
    table = find(root, "stage_2_train_labels.csv", "stage_2_train_labels.csv.zip")
    by_patient: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for row in rows(table, COLUMNS):
        if row["Target"] == "1":
            by_patient[row["patientId"]].append(tuple(number(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
    for patient, pixel_boxes in by_patient.items():
        image = root / "stage_2_train_images" / f"{patient}.dcm"
        try:
            width, height = size(image)
        except UnusableImage:  # a build that checks images counts it
            continue
        normalised = [placement.normalise(patient, b, width, height, spill=False, xywh=True) for b in pixel_boxes]
        if None in normalised:
            continue
        question, answer = answers.location(rng, LABEL, normalised)  # type: ignore[arg-type]
        yield Instruction(id=f"{SOURCE}-{patient}", image=str(image), rounds=((question, answer),),
                          task="abnormality-grounding", source=SOURCE)

"""NIH ChestX-ray14's boxes (``BBox_List_2017.csv``): abnormality grounding.

Not one of RadVLM's sources, but 984 expert boxes of eight findings that a hospital retraining
the model can add. Columns by position (the header cannot name them): image, label, then x, y,
w, h in pixels of the 1024 x 1024 PNG; images are found by name anywhere under the folder
(``images_001/images/...``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import NormBox, from_xywh
from training.instructions import Instruction
from training.sources.files import ImageSize, Layout, Table, UnusableImage, find, header_size, raw_rows

SOURCE = "nih-chestxray14"
LAYOUT = Layout((Table(("BBox_List_2017.csv[.gz]",), ("Image Index", "Finding Label", "Bbox [x,y,w,h]: by position")),),
                "*.png anywhere under the folder (images_001/images/...), found by name")

#: NIH's names as the finding is usually written in a report
NAMES = {"Effusion": "Pleural effusion", "Infiltrate": "Infiltration"}


def abnormality_grounding(root: Path, rng: random.Random, size: ImageSize = header_size) -> Iterator[Instruction]:
    table = find(root, "BBox_List_2017.csv", "BBox_List_2017.csv.gz")
    boxes: dict[tuple[str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
    for row in raw_rows(table):
        if len(row) < 6 or not row[0]:
            continue
        label = NAMES.get(row[1], row[1])
        boxes[(row[0], label)].append(tuple(float(v) for v in row[2:6]))  # type: ignore[arg-type]
    files = {path.name: path for path in root.rglob("*.png")}
    for (name, label), pixel_boxes in boxes.items():
        path = files.get(name, root / name)  # not found: named where it was looked for
        try:
            width, height = size(path)
        except UnusableImage:  # a build that checks images counts it
            continue
        normalised: list[NormBox] = [from_xywh(*b, width, height) for b in pixel_boxes]
        question, answer = answers.location(rng, label, normalised)
        yield Instruction(id=f"{SOURCE}-{name}-{label}", image=str(path), rounds=((question, answer),),
                          task="abnormality-grounding", source=SOURCE)

"""NIH ChestX-ray14's boxes (``BBox_List_2017.csv``): abnormality grounding.

Not one of RadVLM's sources, but 984 expert boxes of eight findings that a hospital retraining
the model can add. Columns by position (the header cannot name them): image, label, then x, y,
w, h in pixels of the 1024 x 1024 PNG; images are found by name anywhere under the folder
(``images_001/images/...``). An image with a box that cannot be placed on it (outside it: a
downsampled copy, such as the 256-pixel re-exports) is left out, noted in ``boxes``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import Placement
from training.instructions import Instruction
from training.sources.files import ImageSize, Layout, Table, UnusableImage, find, header_size, raw_rows

SOURCE = "nih-chestxray14"
LAYOUT = Layout((Table(("BBox_List_2017.csv[.gz]",), ("Image Index", "Finding Label", "Bbox [x,y,w,h]: by position")),),
                "*.png anywhere under the folder (images_001/images/...), found by name")

#: NIH's names as the finding is usually written in a report
NAMES = {"Effusion": "Pleural effusion", "Infiltrate": "Infiltration"}


def abnormality_grounding(root: Path, rng: random.Random, size: ImageSize = header_size,
                          boxes: Placement | None = None) -> Iterator[Instruction]:
    """One datapoint per (image, finding) with all that finding's boxes; an image that cannot be read is skipped, and
    one with any box that does not fit it left out, noted in ``boxes``."""
    placement = boxes if boxes is not None else Placement()
    table = find(root, "BBox_List_2017.csv", "BBox_List_2017.csv.gz")
    by_label: dict[tuple[str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
    for row in raw_rows(table):
        if len(row) < 6 or not row[0]:
            continue
        label = NAMES.get(row[1], row[1])
        by_label[(row[0], label)].append(tuple(float(v) for v in row[2:6]))  # type: ignore[arg-type]
    files = {path.name: path for path in root.rglob("*.png")}
    placed = []
    for (name, label), pixel_boxes in by_label.items():
        path = files.get(name, root / name)  # not found: named where it was looked for
        try:
            width, height = size(path)
        except UnusableImage:  # a build that checks images counts it
            continue
        placed.append((name, label, path, [placement.normalise(name, b, width, height, spill=False, xywh=True)
                                           for b in pixel_boxes]))
    left_out = placement.images  # a box of the image, for this label or another, is not on it
    for name, label, path, normalised in placed:
        if name in left_out:
            continue
        question, answer = answers.location(rng, label, normalised)  # type: ignore[arg-type]
        yield Instruction(id=f"{SOURCE}-{name}-{label}", image=str(path), rounds=((question, answer),),
                          task="abnormality-grounding", source=SOURCE)

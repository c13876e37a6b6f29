"""VinDr-CXR: abnormality grounding (one label per datapoint) and detection (all of an image).

Layouts read: PhysioNet 1.0.0 (``annotations/annotations_{split}.csv`` with ``image_id, rad_id,
class_name, x_min, y_min, x_max, y_max``; images ``{split}/{image_id}.dicom``) and Kaggle's
VinBigData (``train.csv``, the same columns plus ``class_id``). Neither ships image sizes: they
come from the DICOM headers. Each training image was read by three radiologists; their boxes
are fused per label by weighted box fusion with RadVLM's settings (IoU 0.1, no score cut). The
test set is a consensus with no ``rad_id`` and is taken as one reader. An image with a box that
cannot be placed on it (no area, or outside it: a downsampled copy) is left out, noted in ``boxes``:
its detection datapoint would otherwise list less than its readers saw, or call it normal.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training import answers
from training.boxes import NormBox, Placement, fuse_readers
from training.instructions import Instruction
from training.sources.files import ImageSize, Layout, Table, UnusableImage, find, header_size, number, rows

SOURCE = "vindr-cxr"
COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
LAYOUT = Layout((Table(("annotations/annotations_{split}.csv[.gz]", "annotations_{split}.csv[.gz]",
                        "train.csv[.gz] (Kaggle's VinBigData)"),
                       COLUMNS, optional=("rad_id",)),), "{split}/{image_id}.dicom")
NO_FINDING = "No finding"
IOU_THR = 0.1
SKIP_BOX_THR = 0.0


@dataclass(frozen=True)
class VinDrImage:
    """An annotated VinDr-CXR image with its readers' boxes fused per label, normalised; no findings: its readers drew
    none."""

    image_id: str
    path: Path
    findings: dict[str, list[NormBox]]  # label -> fused boxes; empty: no finding


def annotation_file(root: Path, split: str) -> Path:
    """The split's annotation table: PhysioNet's layout first, then Kaggle's ``train.csv`` for training, each perhaps
    gzipped; ``MissingData`` when none is there."""
    names = [f"annotations/annotations_{split}.csv", f"annotations_{split}.csv"]
    if split == "train":
        names.append("train.csv")
    return find(root, *names, *(name + ".gz" for name in names))


def images(root: Path, split: str = "train", size: ImageSize = header_size, table: Path | None = None,
           boxes: Placement | None = None) -> Iterator[VinDrImage]:
    """Every annotated image whose boxes all fit it, with its readers' boxes fused, in the table's order of
    first mention; the boxes placed and dropped are noted in ``boxes``."""
    placement = boxes if boxes is not None else Placement()
    by_image: dict[str, dict[str, list[tuple[tuple[float, ...], str]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows(table or annotation_file(root, split), COLUMNS):
        readers = by_image[row["image_id"]]
        reader = readers[row.get("rad_id") or "consensus"]
        if row["class_name"] == NO_FINDING:
            continue
        corners = tuple(number(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        if None in corners:
            raise ValueError(f"{row['image_id']}: {row['class_name']} without a box")
        reader.append((corners, row["class_name"]))  # type: ignore[arg-type]
    for image_id, readers in by_image.items():
        path = root / split / f"{image_id}.dicom"
        try:
            width, height = size(path)
        except UnusableImage:  # a build that checks images counts it
            continue
        normalised = [[(placement.normalise(image_id, corners, width, height, spill=False), label)
                       for corners, label in reader] for reader in readers.values()]
        if any(box is None for reader in normalised for box, _ in reader):
            continue
        yield VinDrImage(image_id, path, fuse_readers([reader for reader in normalised if reader],  # type: ignore[misc]
                                                      iou_thr=IOU_THR, skip_box_thr=SKIP_BOX_THR))


def abnormality_grounding(root: Path, rng: random.Random, split: str = "train", size: ImageSize = header_size,
                          boxes: Placement | None = None) -> Iterator[Instruction]:
    """One datapoint per (image, label present), with all that label's fused boxes."""
    for image in images(root, split, size, boxes=boxes):
        for label in sorted(image.findings):
            question, answer = answers.location(rng, label, image.findings[label])
            yield Instruction(id=f"{SOURCE}-{split}-{image.image_id}-{label}", image=str(image.path),
                              rounds=((question, answer),), task="abnormality-grounding", source=SOURCE)


def detection(root: Path, rng: random.Random, split: str = "train", size: ImageSize = header_size,
              boxes: Placement | None = None) -> Iterator[Instruction]:
    """One datapoint per image: every label with its boxes, or that there is no lesion (its readers drew none)."""
    for image in images(root, split, size, boxes=boxes):
        question, answer = answers.detection(rng, image.findings)
        yield Instruction(id=f"{SOURCE}-{split}-{image.image_id}", image=str(image.path),
                          rounds=((question, answer),), task="detection", source=SOURCE)

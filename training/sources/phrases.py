"""Phrase grounding: MS-CXR and PadChest-GR, one datapoint per (image, sentence) with its boxes.

MS-CXR: ``MS_CXR_Local_Alignment_v1.1.0.csv`` (or v1.0.0) with ``dicom_id, label_text, path,
x, y, w, h, image_width, image_height[, split]``; boxes are a top-left corner and a size in
pixels; images are MIMIC-CXR-JPG's at ``path`` (``.jpg``). PadChest-GR:
``grounded_reports_*.json``, a list of studies with ``ImageID`` and ``findings`` (``sentence_en``,
``boxes`` as ``[x1, y1, x2, y2]`` already in [0, 1]); ``master_table.csv`` gives the ``split``;
images under ``images_grounding/`` (or ``PadChest_GR/``). Both give their boxes' frame themselves
(sizes, or fractions), so a box outside it is the table's slip, not a downsampled image: the image
is left out, with all its sentences, and noted in ``boxes``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import BadBox, NormBox, Placement
from training.conversations import Case
from training.instructions import Instruction
from training.sources.files import Layout, MissingData, Table, find, rows

# what each data set's split column calls the rows of a build's split (recipe.SPLITS)
MS_CXR_SPLITS = {"train": ("train", "val", "valid", "validation"), "test": ("test",)}
PADCHEST_SPLITS = {"train": ("train", "validation"), "test": ("test",)}
MS_CXR_COLUMNS = ("dicom_id", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
MS_CXR_LAYOUT = Layout((Table(("MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.0.0.csv"),
                              MS_CXR_COLUMNS, optional=("split",)),),
                       "MIMIC-CXR-JPG's, at path with .jpg (--data mimic-cxr)")
PADCHEST_COLUMNS = ("ImageID", "split")
PADCHEST_LAYOUT = Layout((Table(("grounded_reports_*.json (the last by name)",),
                                ("ImageID", "findings: sentence_en, boxes [x1, y1, x2, y2] in [0, 1]")),
                          Table(("master_table.csv", "master_table.csv.zip"), PADCHEST_COLUMNS,
                                optional=("PatientSex_DICOM",))),
                         "images_grounding/{ImageID} (or PadChest_GR/)")


def ms_cxr_groups(root: Path, split: str = "train", boxes: Placement | None = None
                  ) -> dict[str, tuple[str, list[tuple[str, tuple[NormBox, ...]]]]]:
    """dicom_id -> (image path under MIMIC-CXR-JPG, [(sentence, its boxes)]) for the split (v1.0.0 has no
    split column: all of it is training data), without the images that have a box outside their size."""
    placement = boxes if boxes is not None else Placement()
    splits = MS_CXR_SPLITS[split]
    table = find(root, "MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.0.0.csv")
    grouped: dict[tuple[str, str], list[NormBox]] = defaultdict(list)
    paths: dict[str, str] = {}
    for row in rows(table, MS_CXR_COLUMNS):
        if row.get("split", "train") not in splits:
            continue
        box = placement.normalise(row["dicom_id"], [float(row[k]) for k in ("x", "y", "w", "h")],
                                  float(row["image_width"]), float(row["image_height"]), spill=True, on_image=False,
                                  xywh=True)
        if box is None:
            continue
        grouped[(row["dicom_id"], row["label_text"].strip())].append(box)
        paths[row["dicom_id"]] = str(Path(row["path"]).with_suffix(".jpg"))
    left_out = placement.images
    out: dict[str, tuple[str, list[tuple[str, tuple[NormBox, ...]]]]] = {}
    for (dicom_id, sentence), placed in grouped.items():
        if dicom_id not in left_out:
            out.setdefault(dicom_id, (paths[dicom_id], []))[1].append((sentence, tuple(placed)))
    return out


def ms_cxr(root: Path, mimic_root: Path, rng: random.Random, split: str = "train",
           boxes: Placement | None = None) -> Iterator[Instruction]:
    """One phrase-grounding datapoint per (image, sentence) of MS-CXR's split; the images lie under ``mimic_root``
    (MIMIC-CXR-JPG)."""
    for dicom_id, (path, sentences) in ms_cxr_groups(root, split, boxes).items():
        for index, (sentence, boxes) in enumerate(sentences, start=1):
            question, answer = answers.phrase(rng, sentence, boxes)
            yield Instruction(id=f"ms-cxr-{dicom_id}-{index}", image=str(mimic_root / path),
                              rounds=((question, answer),), task="phrase-grounding", source="ms-cxr")


def padchest_table(root: Path) -> dict[str, dict[str, str]]:
    """ImageID -> its first master-table row (split, PatientSex_DICOM, ...)."""
    table: dict[str, dict[str, str]] = {}
    for row in rows(find(root, "master_table.csv", "master_table.csv.zip"), PADCHEST_COLUMNS):
        table.setdefault(row["ImageID"], row)
    return table


def padchest_groups(root: Path, split: str = "train", boxes: Placement | None = None
                    ) -> Iterator[tuple[str, Path, list[tuple[str, tuple[NormBox, ...]]], dict[str, str]]]:
    """(ImageID, image path, [(sentence, boxes)], master-table row) per image of the split whose boxes
    all fit it."""
    placement = boxes if boxes is not None else Placement()
    splits = PADCHEST_SPLITS[split]
    reports = sorted(root.glob("grounded_reports_*.json"))
    if not reports:
        raise MissingData(f"{root} holds no grounded_reports_*.json")
    table = padchest_table(root)
    folder = next((root / name for name in ("images_grounding", "PadChest_GR") if (root / name).is_dir()), root)
    for study in json.loads(reports[-1].read_text()):
        if "ImageID" not in study:
            raise MissingData(f"{reports[-1]}: a study without 'ImageID'")
        image_id = study["ImageID"]
        row = table.get(image_id)
        if row is None or row["split"] not in splits:
            continue
        sentences, dropped = [], False
        for finding in study.get("findings") or []:
            placed = []
            for raw in finding.get("boxes") or []:
                try:
                    corners = [float(v) for v in raw]
                except (TypeError, ValueError):
                    corners = []
                if len(corners) != 4:
                    placement.drop(image_id, BadBox(f"box {raw!r} is not four numbers"), on_image=False)
                    dropped = True
                    continue
                box = placement.normalise(image_id, corners, 1.0, 1.0, spill=True, on_image=False)
                dropped = dropped or box is None
                placed.append(box)
            sentence = (finding.get("sentence_en") or "").strip()
            if placed and sentence:
                sentences.append((sentence, tuple(placed)))
        if not dropped:
            yield image_id, folder / image_id, sentences, row  # type: ignore[misc]


def padchest_gr(root: Path, rng: random.Random, split: str = "train",
                boxes: Placement | None = None) -> Iterator[Instruction]:
    """One phrase-grounding datapoint per (image, sentence) of PadChest-GR's split, for the images whose boxes all fit
    them."""
    for image_id, path, sentences, _ in padchest_groups(root, split, boxes):
        for index, (sentence, boxes) in enumerate(sentences):
            question, answer = answers.phrase(rng, sentence, boxes)
            yield Instruction(id=f"padchest-gr-{image_id}-{index}", image=str(path),
                              rounds=((question, answer),), task="phrase-grounding", source="padchest-gr")


def padchest_cases(root: Path, split: str = "train", boxes: Placement | None = None) -> Iterator[Case]:
    """Grounded-conversation cases: the image's sentences as its report, with their boxes."""
    sexes = {"F": "female", "M": "male"}
    for image_id, path, sentences, row in padchest_groups(root, split, boxes):
        if sentences:
            yield Case(id=Path(image_id).stem, image=str(path), report=" ".join(s for s, _ in sentences),
                       view="frontal", sex=sexes.get(row.get("PatientSex_DICOM", ""), "unknown"),
                       phrases=tuple(sentences))


def ms_cxr_phrases(root: Path, split: str = "train",
                   boxes: Placement | None = None) -> dict[str, list[tuple[str, tuple[NormBox, ...]]]]:
    """MS-CXR's sentences with their boxes, by dicom_id: the ``phrases`` of grounded conversations about MIMIC-CXR
    images (``mimic.conversation_cases``)."""
    return {dicom_id: sentences for dicom_id, (_, sentences) in ms_cxr_groups(root, split, boxes).items()}

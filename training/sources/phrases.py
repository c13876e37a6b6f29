"""Phrase grounding: MS-CXR and PadChest-GR, one datapoint per (image, sentence) with its boxes.

MS-CXR: ``MS_CXR_Local_Alignment_v1.1.0.csv`` (or v1.0.0) with ``dicom_id, label_text, path,
x, y, w, h, image_width, image_height[, split]``; boxes are a top-left corner and a size in
pixels; images are MIMIC-CXR-JPG's at ``path`` (``.jpg``). PadChest-GR:
``grounded_reports_*.json``, a list of studies with ``ImageID`` and ``findings`` (``sentence_en``,
``boxes`` as ``[x1, y1, x2, y2]`` already in [0, 1]); ``master_table.csv`` gives the ``split``;
images under ``images_grounding/`` (or ``PadChest_GR/``).
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import BadBox, NormBox, from_xywh, normalise
from training.instructions import Instruction
from training.sources.files import MissingData, find, rows

log = logging.getLogger(__name__)


def ms_cxr(root: Path, mimic_root: Path, rng: random.Random, splits: tuple[str, ...] = ("train", "val", "valid", "validation")
           ) -> Iterator[Instruction]:
    """MS-CXR pairs of the given splits (v1.0.0 has no split column: all of it)."""
    table = find(root, "MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.0.0.csv")
    grouped: dict[tuple[str, str], list[NormBox]] = defaultdict(list)
    paths: dict[str, str] = {}
    for row in rows(table):
        if "split" in row and row["split"] not in splits:
            continue
        try:
            box = from_xywh(*(float(row[k]) for k in ("x", "y", "w", "h")),
                            float(row["image_width"]), float(row["image_height"]))
        except BadBox as exc:
            log.warning("MS-CXR %s: box skipped: %s", row["dicom_id"], exc)
            continue
        grouped[(row["dicom_id"], row["label_text"].strip())].append(box)
        paths[row["dicom_id"]] = row["path"]
    per_image: dict[str, int] = defaultdict(int)
    for (dicom_id, sentence), boxes in grouped.items():
        per_image[dicom_id] += 1
        question, answer = answers.phrase(rng, sentence, boxes)
        yield Instruction(id=f"ms-cxr-{dicom_id}-{per_image[dicom_id]}",
                          image=str(mimic_root / Path(paths[dicom_id]).with_suffix(".jpg")),
                          rounds=((question, answer),), task="phrase-grounding", source="ms-cxr")


def padchest_splits(root: Path) -> dict[str, str]:
    return {row["ImageID"]: row["split"] for row in rows(find(root, "master_table.csv", "master_table.csv.zip"))}


def padchest_gr(root: Path, rng: random.Random, splits: tuple[str, ...] = ("train", "validation")
                ) -> Iterator[Instruction]:
    reports = sorted(root.glob("grounded_reports_*.json"))
    if not reports:
        raise MissingData(f"{root} holds no grounded_reports_*.json")
    split_of = padchest_splits(root)
    folder = next((root / name for name in ("images_grounding", "PadChest_GR") if (root / name).is_dir()), root)
    for study in json.loads(reports[-1].read_text()):
        image_id = study["ImageID"]
        if split_of.get(image_id) not in splits:
            continue
        for index, finding in enumerate(study.get("findings") or []):
            boxes = []
            for raw in finding.get("boxes") or []:
                try:
                    boxes.append(normalise(*(float(v) for v in raw), 1.0, 1.0))
                except (BadBox, TypeError, ValueError) as exc:
                    log.warning("PadChest-GR %s: box %s skipped: %s", image_id, raw, exc)
            sentence = (finding.get("sentence_en") or "").strip()
            if not boxes or not sentence:
                continue
            question, answer = answers.phrase(rng, sentence, boxes)
            yield Instruction(id=f"padchest-gr-{image_id}-{index}", image=str(folder / image_id),
                              rounds=((question, answer),), task="phrase-grounding", source="padchest-gr")

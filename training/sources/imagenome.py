"""Chest ImaGenome (silver): anatomical grounding, one region per image per datapoint.

Layout: ``silver_dataset/splits/{split}.csv`` (``dicom_id, subject_id, study_id, path,
ViewPosition``) and ``silver_dataset/scene_graph/{dicom_id}_SceneGraph.json``, whose ``objects``
carry ``bbox_name`` and ``original_x1 .. original_y2`` in pixels of the full-size MIMIC-CXR
image (they can spill outside it and are clipped; a region wholly outside it means the image is
not the full-size one, and the image is left out, noted in ``boxes``). Images are MIMIC-CXR-JPG's, at ``path`` with
``.jpg`` for ``.dcm`` under the MIMIC-CXR-JPG folder.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.boxes import Placement
from training.instructions import Instruction
from training.sources.files import ImageSize, Layout, MissingData, Table, UnusableImage, find, header_size, rows

SOURCE = "chest-imagenome"
FRONTAL = ("PA", "AP")
COLUMNS = ("dicom_id", "path", "ViewPosition")
CORNERS = tuple(f"original_{k}" for k in ("x1", "y1", "x2", "y2"))
LAYOUT = Layout((Table(("silver_dataset/splits/{split}.csv",), COLUMNS),
                 Table(("silver_dataset/scene_graph/{dicom_id}_SceneGraph.json",), ("objects: bbox_name", *CORNERS))),
                "MIMIC-CXR-JPG's, at path with .jpg (--data mimic-cxr)")

log = logging.getLogger(__name__)


def _scene_graph(root: Path, dicom_id: str) -> Path | None:
    for folder in ("silver_dataset/scene_graph", "silver_dataset/scene_graph/scene_graph"):
        path = root / folder / f"{dicom_id}_SceneGraph.json"
        if path.exists():
            return path
    return None


def anatomical_grounding(root: Path, mimic_root: Path, rng: random.Random, split: str = "train",
                         size: ImageSize = header_size, boxes: Placement | None = None) -> Iterator[Instruction]:
    """One datapoint per frontal image of the split: one of its regions, drawn by ``rng``, with its box. An image
    without a scene graph or that cannot be read is skipped; one with a region wholly outside it is left out, noted in
    ``boxes``."""
    placement = boxes if boxes is not None else Placement()
    table = find(root, f"silver_dataset/splits/{split}.csv")
    for row in rows(table, COLUMNS):
        if row["ViewPosition"] not in FRONTAL:
            continue
        graph_path = _scene_graph(root, row["dicom_id"])
        if graph_path is None:
            log.warning("Chest ImaGenome %s: no scene graph, skipped", row["dicom_id"])
            continue
        image = mimic_root / Path(row["path"]).with_suffix(".jpg")
        try:
            width, height = size(image)
        except UnusableImage:  # a build that checks images counts it
            continue
        regions, outside = [], False
        for item in json.loads(graph_path.read_text()).get("objects", []):
            if "bbox_name" not in item:
                raise MissingData(f"{graph_path}: an object without 'bbox_name'")
            try:
                x1, y1, x2, y2 = corners = tuple(float(item[k]) for k in CORNERS)
            except (KeyError, TypeError, ValueError):
                continue
            if x1 == x2 or y1 == y2:  # a region without area: the scene graph's, not the image's
                continue
            box = placement.normalise(row["dicom_id"], corners, width, height, spill=True)
            outside = outside or box is None
            regions.append((item["bbox_name"], box))
        if not regions or outside:
            continue
        name, box = rng.choice(regions)
        question, answer = answers.location(rng, name, [box])
        yield Instruction(id=f"{SOURCE}-{split}-{row['dicom_id']}", image=str(image),
                          rounds=((question, answer),), task="anatomical-grounding", source=SOURCE)


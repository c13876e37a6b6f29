"""CheXpert (abnormality classification) and CheXpert-Plus (report generation).

CheXpert: ``train.csv`` / ``valid.csv`` with ``Path`` (starting ``CheXpert-v1.0[-small]/``,
relative to the folder above the one holding the tables), ``Frontal/Lateral``, ``AP/PA`` and the
14 label columns; frontal images only. The test set's radiologist labels (``test_labels.csv``,
released with CheXlocalize; the paper's 518 frontal images) may lack ``Frontal/Lateral``: the
image's name (``view1_frontal.jpg``) says it then. CheXpert-Plus: ``df_chexpert_plus_240401.csv`` with
``path_to_image``, ``frontal_lateral``, ``section_findings``, ``section_impression`` and
``split``; images under ``PNG/`` with ``.png`` for ``.jpg``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.instructions import Instruction
from training.reports import Cleaner, report_text
from training.sources.files import Layout, Table, find, rows
from training.sources.labels import present

TABLES = {"train": "train.csv", "valid": "valid.csv", "test": "test_labels.csv"}
LAYOUT = Layout((Table(("train.csv[.gz] (--split train)", "test_labels.csv[.gz] (--split test)"), ("Path",),
                       optional=("Frontal/Lateral", "the 14 label columns: No Finding, Atelectasis, ...")),),
                "Path without its first folder (CheXpert-v1.0[-small]/), under the folder holding the tables")
PLUS_TABLE = "df_chexpert_plus_240401.csv"
PLUS_COLUMNS = ("path_to_image", "frontal_lateral", "split")
PLUS_LAYOUT = Layout((Table((PLUS_TABLE,), PLUS_COLUMNS, optional=("section_findings", "section_impression")),),
                     "PNG/{path_to_image with .png}")


def image_path(root: Path, path: str) -> Path:
    """``Path`` without its top folder, under ``root`` (the folder that holds train.csv)."""
    parts = Path(path).parts
    if parts and parts[0].startswith("CheXpert-v1.0"):
        parts = parts[1:]
    return root.joinpath(*parts)


def classification(root: Path, rng: random.Random, split: str = "train",
                   uncertain: str = "absent") -> Iterator[Instruction]:
    """One datapoint per frontal image: the labels present, or that there is no abnormality."""
    if split not in TABLES:
        raise ValueError(f"CheXpert split must be one of {sorted(TABLES)}")
    for row in rows(find(root, TABLES[split], TABLES[split] + ".gz"), ("Path",)):
        if not _frontal(row):
            continue
        question, answer = answers.abnormalities(rng, present(row, uncertain))
        yield Instruction(id=f"chexpert-{split}-{row['Path']}", image=str(image_path(root, row["Path"])),
                          rounds=((question, answer),), task="abnormalities", source="chexpert")


def _frontal(row: dict[str, str]) -> bool:
    if "Frontal/Lateral" in row:
        return row["Frontal/Lateral"] == "Frontal"
    return "frontal" in Path(row["Path"]).name.lower()


def plus_reports(root: Path, rng: random.Random, cleaner: Cleaner, split: str = "train") -> Iterator[Instruction]:
    """One datapoint per frontal image with a report that still says something once cleaned."""
    for row in rows(find(root, PLUS_TABLE), PLUS_COLUMNS):
        if row["split"] != split or row["frontal_lateral"] != "Frontal":
            continue
        text = report_text(row.get("section_findings"), row.get("section_impression"))
        study = "_".join(row["path_to_image"].split("/")[:3])
        cleaned = cleaner.clean(study, text) if text else None
        if not cleaned:
            continue
        question, answer = answers.report(rng, cleaned)
        image = root / "PNG" / Path(row["path_to_image"]).with_suffix(".png")
        yield Instruction(id=f"chexpert-plus-{row['path_to_image']}", image=str(image),
                          rounds=((question, answer),), task="report", source="chexpert-plus")

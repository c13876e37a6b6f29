"""MIMIC-CXR: report generation and abnormality classification, one datapoint per frontal image.

Layout: MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (``dicom_id, subject_id,
study_id, ViewPosition, ...``), ``mimic-cxr-2.0.0-split.csv[.gz]`` (``split``: train / validate
/ test) and ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (one row per study); images
``files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg``; reports from MIMIC-CXR's
``mimic-cxr-reports.zip`` unpacked into the same folder (``files/p../p{subject}/s{study}.txt``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from training import answers
from training.boxes import NormBox
from training.conversations import Case
from training.instructions import Instruction
from training.reports import Cleaner, report_text, sections
from training.sources.files import Layout, Table, find, rows
from training.sources.labels import present

FRONTAL = ("PA", "AP")
SOURCE = "mimic-cxr"
METADATA = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT = ("dicom_id", "split")
LABELS = ("study_id",)
LAYOUT = Layout((Table(("mimic-cxr-2.0.0-metadata.csv[.gz]",), METADATA),
                 Table(("mimic-cxr-2.0.0-split.csv[.gz]",), SPLIT),
                 Table(("mimic-cxr-2.0.0-chexpert.csv[.gz]",), LABELS, optional=("the 14 label columns",)),
                 Table(("files/p{subject[:2]}/p{subject}/s{study}.txt (reports: FINDINGS, else IMPRESSION)",), ())),
                "files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg (MIMIC-CXR-JPG)")


@dataclass(frozen=True)
class MimicImage:
    """A MIMIC-CXR image as the metadata table lists it; its JPEG and its study's report lie under the data set's folder
    by subject and study."""

    dicom_id: str
    subject_id: str
    study_id: str
    view: str

    def folder(self, root: Path) -> Path:
        return root / "files" / f"p{self.subject_id[:2]}" / f"p{self.subject_id}"

    def path(self, root: Path) -> Path:
        return self.folder(root) / f"s{self.study_id}" / f"{self.dicom_id}.jpg"

    def report_path(self, root: Path) -> Path:
        return self.folder(root) / f"s{self.study_id}.txt"


def _table(root: Path, name: str) -> Path:
    return find(root, name, name + ".gz")


def frontal_images(root: Path, split: str) -> Iterator[MimicImage]:
    """Frontal (PA/AP) images of ``split`` (train, validate or test), in metadata order."""
    splits = {row["dicom_id"]: row["split"] for row in rows(_table(root, "mimic-cxr-2.0.0-split.csv"), SPLIT)}
    for row in rows(_table(root, "mimic-cxr-2.0.0-metadata.csv"), METADATA):
        if row["ViewPosition"] in FRONTAL and splits.get(row["dicom_id"]) == split:
            yield MimicImage(row["dicom_id"], row["subject_id"], row["study_id"], row["ViewPosition"])


def study_report(root: Path, image: MimicImage) -> str:
    """The FINDINGS section of the study's report, else its IMPRESSION ("" when neither)."""
    path = image.report_path(root)
    if not path.exists():
        return ""
    parts = sections(path.read_text())
    return report_text(parts.get("FINDINGS"), parts.get("IMPRESSION"))


def reports(root: Path, rng: random.Random, cleaner: Cleaner, split: str = "train") -> Iterator[Instruction]:
    """One report-generation datapoint per frontal image of the split whose study's report has text left after
    cleaning."""
    for image in frontal_images(root, split):
        text = study_report(root, image)
        cleaned = cleaner.clean(image.study_id, text) if text else None
        if not cleaned:
            continue
        question, answer = answers.report(rng, cleaned)
        yield Instruction(id=f"{SOURCE}-report-{image.dicom_id}", image=str(image.path(root)),
                          rounds=((question, answer),), task="report", source=SOURCE)


def study_labels(root: Path, uncertain: str = "absent") -> dict[str, list[str]]:
    """Labels present per study id, from the CheXpert labeler's table."""
    table = _table(root, "mimic-cxr-2.0.0-chexpert.csv")
    return {row["study_id"]: present(row, uncertain) for row in rows(table, LABELS)}


def classification(root: Path, rng: random.Random, split: str = "train",
                   uncertain: str = "absent") -> Iterator[Instruction]:
    """One abnormalities datapoint per frontal image of the split whose study the CheXpert table labels; ``uncertain``
    says how an uncertain label counts."""
    labels = study_labels(root, uncertain)
    for image in frontal_images(root, split):
        if image.study_id not in labels:
            continue
        question, answer = answers.abnormalities(rng, labels[image.study_id])
        yield Instruction(id=f"{SOURCE}-labels-{image.dicom_id}", image=str(image.path(root)),
                          rounds=((question, answer),), task="abnormalities", source=SOURCE)


def conversation_cases(root: Path, cleaner: Cleaner, split: str = "train", uncertain: str = "absent",
                       phrases: Mapping[str, Sequence[tuple[str, tuple[NormBox, ...]]]] | None = None
                       ) -> Iterator[Case]:
    """What the conversation writer is told per frontal image; with ``phrases`` (MS-CXR, by
    dicom_id) only the images that have some, for grounded conversations."""
    labels = study_labels(root, uncertain)
    for image in frontal_images(root, split):
        grounded = tuple(phrases.get(image.dicom_id, ())) if phrases is not None else ()
        if phrases is not None and not grounded:
            continue
        text = study_report(root, image)
        cleaned = cleaner.clean(image.study_id, text) if text else None
        if not cleaned:
            continue
        yield Case(id=image.dicom_id, image=str(image.path(root)), report=cleaned,
                   labels=tuple(labels.get(image.study_id, ())), view=image.view, phrases=grounded)

"""IU X-ray (Open-i, ``NLMCXR_reports.tgz``): report generation from a hospital's own reports.

Each ``ecgen-radiology/*.xml`` holds ``AbstractText`` elements labelled FINDINGS and IMPRESSION
and one ``parentImage`` per image (``id`` + ``.png`` under ``NLMCXR_png/``). The reports do not
say which image is frontal, so a view table is required: a CSV with ``imageid`` and a view
column; PA and AP count. torchxrayvision's ``nlmcxr_tsne_pa.csv.gz`` (``tsne-view``: PA or L,
from the images themselves) names images as the reports do; the DICOM metadata's ``View
Position`` is often wrong (laterals marked PA) and drops part of the ids, so it comes second.
"""

from __future__ import annotations

import random
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from training import answers
from training.instructions import Instruction
from training.reports import Cleaner, report_text
from training.sources.files import Layout, MissingData, Table, rows

SOURCE = "iu-xray"
FRONTAL = ("PA", "AP")
VIEW_COLUMNS = ("tsne-view", "View Position")
#: view tables looked for in the folder (torchxrayvision ships both)
VIEW_TABLES = ("nlmcxr_tsne_pa.csv.gz", "nlmcxr_dicom_metadata.csv.gz", "nlmcxr_dicom_metadata.csv")
LAYOUT = Layout((Table(("ecgen-radiology/*.xml", "NLMCXR_reports.tgz"), ("AbstractText FINDINGS, IMPRESSION",
                                                                          "parentImage id")),
                 Table(VIEW_TABLES, ("imageid", " or ".join(VIEW_COLUMNS)))), "NLMCXR_png/{parentImage id}.png")


def frontal_ids(views: Path) -> set[str]:
    """The image ids the view table calls PA or AP (by its first view column that has a value)."""
    found = set()
    for row in rows(views, ("imageid",), one_of=VIEW_COLUMNS):
        view = next((row[c] for c in VIEW_COLUMNS if row.get(c)), "")
        if view.strip().upper() in FRONTAL:
            found.add(row["imageid"])
    return found


def _documents(root: Path) -> Iterator[tuple[str, bytes]]:
    folder = root / "ecgen-radiology"
    if folder.is_dir():
        for path in sorted(folder.glob("*.xml"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
            yield path.name, path.read_bytes()
        return
    archive = root / "NLMCXR_reports.tgz"
    if not archive.exists():
        raise MissingData(f"{root} holds neither ecgen-radiology/ nor NLMCXR_reports.tgz")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".xml"):
                yield Path(member.name).name, tar.extractfile(member).read()  # type: ignore[union-attr]


def reports(root: Path, views: Path, rng: random.Random, cleaner: Cleaner) -> Iterator[Instruction]:
    """One datapoint per report with a frontal image (its first) and text left after cleaning."""
    frontal = frontal_ids(views)
    for name, document in _documents(root):
        tree = ET.fromstring(document)
        texts = {node.get("Label"): (node.text or "") for node in tree.iter("AbstractText")}
        images = [node.get("id") for node in tree.iter("parentImage") if node.get("id") in frontal]
        text = report_text(texts.get("FINDINGS"), texts.get("IMPRESSION"))
        if not images or not text:
            continue
        cleaned = cleaner.clean(f"iu-{Path(name).stem}", text)
        if not cleaned:
            continue
        question, answer = answers.report(rng, cleaned)
        yield Instruction(id=f"{SOURCE}-{Path(name).stem}", image=str(root / "NLMCXR_png" / f"{images[0]}.png"),
                          rounds=((question, answer),), task="report", source=SOURCE)

"""This installation's own verified data: each study a radiologist signed off here, its image and the
report and findings as they were signed, so that RadVLM can be fine-tuned on the hospital's studies
(``radvlm-pacs train export-site``, then ``train dataset --data site=FOLDER``).

Layout written and read: ``signoffs.csv`` (one row per sign-off: ``image``, ``study_instance_uid``,
``sop_instance_uid``, ``signed_at``, ``edited``, ``findings``, the CheXpert labels signed present
separated by ``|``, and ``report``) and the study's first analysed image under ``images/``, the DICOM
file as received. The export copies the files, so the set outlives the node's retention
(``node.keep_images_days``): run it more often than that. Only what a radiologist verified goes in:
the draft's boxes are the model's own and are left out.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.storage import InstanceStore
from records.tables import Instance, Job, SignOff, Study
from training import answers
from training.instructions import Instruction
from training.reports import Cleaner
from training.sources.files import rows

SOURCE = "site"
TABLE = "signoffs.csv"
COLUMNS = ("image", "study_instance_uid", "sop_instance_uid", "signed_at", "edited", "findings", "report")


def export(sessions: sessionmaker[Session], store: InstanceStore, out: Path) -> tuple[int, int]:
    """Add every sign-off not exported yet to ``out``: (sign-offs written in all, those whose image this
    node has already removed and which are therefore left out)."""
    table = out / TABLE
    kept = {row["sop_instance_uid"]: row for row in rows(table)} if table.exists() else {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    gone = 0
    with sessions() as session:
        signed = session.execute(select(SignOff, Job, Study.study_instance_uid)
                                 .join(Job, SignOff.job_id == Job.id).join(Study, SignOff.study_id == Study.id)
                                 .order_by(SignOff.id)).all()
        for sign_off, job, study_uid in signed:
            sop = job.result.payload["images"][0]["sop_instance_uid"]
            if sop in kept:
                continue
            instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
            if instance.removed_at is not None:
                gone += 1
                continue
            image = f"images/{sop}.dcm"
            partial = out / f"{image}.part"
            shutil.copyfile(store.path(instance.path), partial)
            os.replace(partial, out / image)
            kept[sop] = {"image": image, "study_instance_uid": study_uid, "sop_instance_uid": sop,
                         "signed_at": sign_off.signed_at.isoformat(), "edited": str(sign_off.edited).lower(),
                         "findings": "|".join(sorted(sign_off.findings)), "report": sign_off.report}
    partial = out / f"{TABLE}.part"
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(kept.values())
    os.replace(partial, table)
    return len(kept), gone


def reports(root: Path, rng: random.Random, cleaner: Cleaner) -> Iterator[Instruction]:
    """One datapoint per sign-off: the report as signed, without what it says of other studies."""
    for row in rows(root / TABLE):
        cleaned = cleaner.clean(f"{SOURCE}-{row['study_instance_uid']}", row["report"])
        if not cleaned:
            continue
        question, answer = answers.report(rng, cleaned)
        yield Instruction(id=f"{SOURCE}-{row['sop_instance_uid']}-report", image=str(root / row["image"]),
                          rounds=((question, answer),), task="report", source=SOURCE)


def classification(root: Path, rng: random.Random) -> Iterator[Instruction]:
    """One datapoint per sign-off: the findings as signed (none: no finding)."""
    for row in rows(root / TABLE):
        question, answer = answers.abnormalities(rng, [label for label in row["findings"].split("|") if label])
        yield Instruction(id=f"{SOURCE}-{row['sop_instance_uid']}-abnormalities", image=str(root / row["image"]),
                          rounds=((question, answer),), task="abnormalities", source=SOURCE)

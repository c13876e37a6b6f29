"""This installation's own verified data, de-identified: each study a radiologist signed off here, its
image and the report and findings as they were signed, so that RadVLM can be fine-tuned on the
hospital's studies (``radvlm-pacs train export-site``, then ``train dataset --data site=FOLDER``).

Layout written and read: ``signoffs.csv`` (one row per analysed image: ``image``, ``study``,
``edited``, ``findings`` (the CheXpert labels signed present, separated by ``|``) and ``report``) and
the study's first analysed image under ``images/`` as the 8-bit PNG the model is shown (the node's own
pixel conversion, so training sees what inference will). What leaves and what does not is
``training.deidentify``'s: no header, no UID, no date; ``study`` and the image's name are the node
database's row numbers, so only this node can tell which study a row was. The export copies the
pixels, so the set outlives the node's retention (``node.keep_images_days``): run it more often than
that. Only what a radiologist verified goes in: the draft's boxes are the model's own and stay out.
One study in ten, chosen by a hash of its number (the same ones in every build), is held out of
training for ``train dataset --split test``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from PIL import Image
from sqlalchemy import create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from records.audit import process_host, record
from records.clock import Clock
from records.db import alembic_config, error_summary
from records.pixels import model_image, read_dataset
from records.storage import InstanceStore
from records.tables import Instance, Job, SignOff, Study
from training import answers
from training.deidentify import Identifiers, burned_in, scrub
from training.errors import Refused
from training.instructions import Instruction
from training.reports import Cleaner
from training.sources.files import Layout, Table, find, rows

SOURCE = "site"
TABLE = "signoffs.csv"
COLUMNS = ("image", "study", "edited", "findings", "report")
HELD_OUT = 10  # one study in this many is test data
LAYOUT = Layout((Table((TABLE,), COLUMNS),), "images/{n}.png (train export-site writes both)")


def in_split(study: str, split: str) -> bool:
    """Whether the study (its number in the table) belongs to ``split``: train, or test (held out)."""
    held_out = int(hashlib.sha256(f"{SOURCE}-{study}".encode()).hexdigest(), 16) % HELD_OUT == 0
    return held_out == (split == "test")


class FolderError(Refused, ValueError):
    """The folder holds a table this export did not write, which it must not add to."""


class NotMigrated(Refused):
    """The node's database is absent, or not at the schema this code reads: the export creates and
    changes nothing then."""


def check_database(url: str) -> None:
    """Refuse a database that does not exist (SQLite) or is not at the migrations' head, before anything
    connects with the node's engine (which would create an empty SQLite file)."""
    shown = url.split("@")[-1]
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if not database or database == ":memory:" or not Path(database).is_file():
            raise NotMigrated(f"no database at {shown}: export-site reads the node's own (RADVLM_DATABASE_URL, or "
                              "data_dir); run the node (radvlm-pacs serve, or db upgrade) and sign studies off first")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise NotMigrated(f"cannot read the database at {shown}: {error_summary(exc)}") from exc
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current != head:
        raise NotMigrated(f"the database at {shown} is at revision {current or 'none (never migrated)'}, not "
                          f"{head}: run radvlm-pacs db upgrade first")


@dataclass(frozen=True)
class Exported:
    """What one export left in the folder, and what it could not take and why."""

    rows: int  # in the folder now, this run's and earlier runs'
    added: int
    removed: int  # the node had already deleted the image (node.keep_images_days)
    burned_in: int  # the header says the pixels carry text


def export(sessions: sessionmaker[Session], store: InstanceStore, out: Path, *, user: str,
           clock: Clock) -> Exported:
    """Add every sign-off whose image is not in ``out`` yet, de-identified; audit each study exported
    (Export, by ``user``) once its row is in the folder."""
    table = out / TABLE
    if table.exists():
        with table.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != COLUMNS:
            raise FolderError(f"{table} has the columns {', '.join(header)}, not {', '.join(COLUMNS)}: an earlier "
                              "export (which kept UIDs and DICOM headers) or another table; export to a new folder")
    kept = {row["image"]: row for row in rows(table)} if table.exists() else {}
    removed = burned = 0
    with sessions() as session:
        signed = session.execute(select(SignOff, Job, Study.study_instance_uid)
                                 .join(Job, SignOff.job_id == Job.id).join(Study, SignOff.study_id == Study.id)
                                 .order_by(SignOff.id)).all()
        exported: list[str] = []
        for sign_off, job, study_uid in signed:
            sop = job.result.payload["images"][0]["sop_instance_uid"]
            instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
            image = f"images/{instance.id}.png"
            if image in kept:
                continue
            if instance.removed_at is not None:
                removed += 1
                continue
            ds = read_dataset(store.path(instance.path))
            if burned_in(ds):
                burned += 1
                continue
            partial = out / f"{image}.part"
            partial.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(model_image(ds).pixels, mode="L").save(partial, format="PNG")
            os.replace(partial, out / image)
            identifiers = Identifiers.of(ds, sign_off.observer_name)
            kept[image] = {"image": image, "study": str(sign_off.study_id), "edited": str(sign_off.edited).lower(),
                           "findings": "|".join(sorted(sign_off.findings)),
                           "report": scrub(sign_off.report, identifiers)}
            exported.append(study_uid)
        partial = out / f"{TABLE}.part"
        out.mkdir(parents=True, exist_ok=True)
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(kept.values())
        os.replace(partial, table)
        now = clock()
        for study_uid in exported:
            record(session, "export_training", at=now, user=user, role="command line", client=process_host(),
                   study_uid=study_uid, detail=f"de-identified image, report and findings to {out}")
        session.commit()
    return Exported(len(kept), len(exported), removed, burned)


def reports(root: Path, rng: random.Random, cleaner: Cleaner, split: str = "train") -> Iterator[Instruction]:
    """One datapoint per sign-off: the report as signed, without what it says of other studies."""
    for row in _split(root, split):
        cleaned = cleaner.clean(f"{SOURCE}-{Path(row['image']).stem}", row["report"])
        if not cleaned:
            continue
        question, answer = answers.report(rng, cleaned)
        yield Instruction(id=f"{SOURCE}-{Path(row['image']).stem}-report", image=str(root / row["image"]),
                          rounds=((question, answer),), task="report", source=SOURCE)


def classification(root: Path, rng: random.Random, split: str = "train") -> Iterator[Instruction]:
    """One datapoint per sign-off: the findings as signed (none: no finding)."""
    for row in _split(root, split):
        question, answer = answers.abnormalities(rng, [label for label in row["findings"].split("|") if label])
        yield Instruction(id=f"{SOURCE}-{Path(row['image']).stem}-abnormalities", image=str(root / row["image"]),
                          rounds=((question, answer),), task="abnormalities", source=SOURCE)


def _split(root: Path, split: str) -> Iterator[dict[str, str]]:
    return (row for row in rows(find(root, TABLE), COLUMNS) if in_split(row["study"], split))

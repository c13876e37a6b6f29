"""The database side of reception: a study row per study, an instance row per stored file.

Functions take an open session and never commit: the caller decides the transaction. Reception's
statements are few and written as SQL's own upserts: each round trip to the database is time in which
the sender waits for its C-STORE response (see benchmarks/ingest.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache

from sqlalchemy import Insert, String, case, cast, func, literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from records.tables import Instance, Study, StudyState


@dataclass(frozen=True)
class Arrival:
    """What the node knows of one received instance, before it is recorded."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    calling_ae: str
    calling_host: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None


STUDY_FIELDS = ("patient_id", "patient_name", "accession_number", "study_date")
RECEIVED = ("study_id", "study_version", "sop_class_uid", "series_instance_uid", "transfer_syntax_uid", "path",
            "size_bytes", "calling_ae", "calling_host", "received_at")  # an instance row's values from its copy


@cache
def _statements(dialect: str) -> tuple[Insert, Insert]:
    """The study upsert and the instance insert, built once per kind of database (PostgreSQL and
    SQLite spell ``ON CONFLICT`` alike); each instance then only binds its values. Every SET
    expression reads the row as it was before the update."""
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    studies, instances = Study.__table__, Instance.__table__
    study = insert(studies)
    completed = studies.c.state != StudyState.receiving
    reopened = case((completed, studies.c.version + 1), else_=studies.c.version)
    reason = literal("reopened as version ") + cast(reopened, String) + literal(": new instance after completion")
    study = study.on_conflict_do_update(
        index_elements=[studies.c.study_instance_uid],
        set_={
            "last_received_at": study.excluded.last_received_at,
            "state": study.excluded.state,
            "version": reopened,
            "state_reason": case((completed, reason), else_=studies.c.state_reason),
            **{field: func.coalesce(studies.c[field], study.excluded[field]) for field in STUDY_FIELDS},
        },
    ).returning(studies.c.id, studies.c.version)
    instance = insert(instances)
    instance = instance.on_conflict_do_update(  # a copy whose file retention removed is stored again
        index_elements=[instances.c.sop_instance_uid],
        set_={**{column: instance.excluded[column] for column in RECEIVED},
              **{column: None for column in ("removed_at", "selected", "selection_reason", "pixel_error")}},
        where=instances.c.removed_at.is_not(None),
    )
    return study, instance.returning(instances.c.id)


def record_arrival(session: Session, arrival: Arrival, now: datetime) -> int | None:
    """Record ``arrival`` in the session's transaction: the study version it joined, or None when its SOP
    Instance UID is already recorded (the first copy is kept; the caller rolls back).

    Two statements, whatever the study's state: the study row is inserted or updated in one upsert,
    which locks it until the transaction ends (as SELECT ... FOR UPDATE would), and the instance row is
    inserted unless its UID is taken, or taken by a copy whose file was removed (``node.keep_images_days``),
    which this one replaces. An instance arriving for a study that had completed reopens it as the next
    version; the first non-empty patient and study attributes received are kept.
    """
    study, instance = _statements(session.get_bind().dialect.name)
    study_id, version = session.execute(study, {
        "study_instance_uid": arrival.study_instance_uid,
        **{field: getattr(arrival, field) for field in STUDY_FIELDS},
        "state": StudyState.receiving, "version": 1, "first_received_at": now, "last_received_at": now,
    }).one()
    inserted = session.execute(instance, {
        "study_id": study_id, "study_version": version, "sop_instance_uid": arrival.sop_instance_uid,
        "sop_class_uid": arrival.sop_class_uid, "series_instance_uid": arrival.series_instance_uid,
        "transfer_syntax_uid": arrival.transfer_syntax_uid, "path": arrival.path,
        "size_bytes": arrival.size_bytes, "calling_ae": arrival.calling_ae,
        "calling_host": arrival.calling_host, "received_at": now,
    }).first()
    return version if inserted is not None else None

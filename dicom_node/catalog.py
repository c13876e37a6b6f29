"""The database side of reception: a study row per study, an instance row per stored file.

Functions take an open session and never commit: the caller decides the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
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


def is_stored(session: Session, sop_instance_uid: str) -> bool:
    return session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is not None


def _locked_study(session: Session, arrival: Arrival, now: datetime) -> Study:
    """The study row for ``arrival``, created if new, locked for this transaction."""
    query = select(Study).where(Study.study_instance_uid == arrival.study_instance_uid).with_for_update()
    study = session.scalar(query)
    if study is not None:
        return study
    try:
        with session.begin_nested():
            session.add(Study(
                study_instance_uid=arrival.study_instance_uid,
                patient_id=arrival.patient_id,
                patient_name=arrival.patient_name,
                accession_number=arrival.accession_number,
                study_date=arrival.study_date,
                state=StudyState.receiving,
                version=1,
                first_received_at=now,
                last_received_at=now,
            ))
    except IntegrityError:  # another association created it first
        pass
    return session.scalars(query).one()


def record_arrival(session: Session, arrival: Arrival, now: datetime) -> tuple[Study, bool]:
    """Record ``arrival``; return its study and whether the instance was new.

    An instance arriving for a study that had completed reopens it as the next version.
    A SOP Instance UID already recorded is left as it was (the first copy is kept).
    """
    study = _locked_study(session, arrival, now)
    if is_stored(session, arrival.sop_instance_uid):
        return study, False
    if study.state is not StudyState.receiving:
        study.version += 1
        study.state = StudyState.receiving
        study.state_reason = f"reopened as version {study.version}: new instance after completion"
    study.last_received_at = now
    for field in ("patient_id", "patient_name", "accession_number", "study_date"):
        if getattr(study, field) is None and getattr(arrival, field) is not None:
            setattr(study, field, getattr(arrival, field))
    session.add(Instance(
        study_id=study.id,
        study_version=study.version,
        sop_instance_uid=arrival.sop_instance_uid,
        sop_class_uid=arrival.sop_class_uid,
        series_instance_uid=arrival.series_instance_uid,
        transfer_syntax_uid=arrival.transfer_syntax_uid,
        path=arrival.path,
        size_bytes=arrival.size_bytes,
        calling_ae=arrival.calling_ae,
        calling_host=arrival.calling_host,
        received_at=now,
    ))
    session.flush()
    return study, True

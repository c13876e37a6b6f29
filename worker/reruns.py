"""What an administrator asks of stored studies: analyse one again, send its results again.

Both only change the database; whatever runs the queues (the node's ready events, the outbox
sweep, or the io workers) does the work, so an operation is safe to repeat and survives restarts.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from records.storage import removed
from records.tables import DeliveryState, Job, OutboxItem, Study, StudyState, StudyVersion


class Refused(Exception):
    """The operation does not apply to this study now; the message says why."""


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid).with_for_update())
    if study is None:
        raise Refused(f"no study {study_uid}")
    return study


def reanalyse(session: Session, study_uid: str, reason: str, now: datetime) -> int:
    """Record a new version of the study with the images it has, ready for analysis; return its number.

    A new version rather than a second result for the same one: results stay unique per (study,
    version, model revision), and the new objects name the earlier ones as predecessors.
    """
    study = _study(session, study_uid)
    if study.state is StudyState.receiving:
        raise Refused("still receiving: it is analysed once complete")
    if study.state in (StudyState.ready, StudyState.analysing):
        raise Refused(f"already {study.state.value}")
    if study.state is StudyState.signed_off:
        raise Refused("signed off by a radiologist: a new draft would not replace the verified report")
    usable = [i for i in study.instances if i.usable]
    if not usable:
        gone = max((i.removed_at for i in study.instances if i.removed_at), default=None)
        raise Refused(removed(gone) if gone else f"nothing to analyse: {study.state_reason}")
    study.version += 1
    study.state, study.state_reason = StudyState.ready, f"reanalysis requested: {reason}"
    session.add(StudyVersion(study_id=study.id, version=study.version, completed_at=now, outcome=StudyState.ready,
                             reason=study.state_reason, instance_count=len(study.instances),
                             selected_count=len(usable)))
    return study.version


def resend(session: Session, study_uid: str, now: datetime, deliver_for: timedelta, *,
           destination: str | None = None, failed_only: bool = False) -> list[int]:
    """Put the latest analysis's objects back in the outbox, due now; return their ids.

    The same bytes and UIDs go again, so a destination that kept the first copy sees the same instance.
    """
    study = _study(session, study_uid)
    query = (select(OutboxItem).join(Job, OutboxItem.job_id == Job.id).where(OutboxItem.study_id == study.id)
             .order_by(Job.study_version.desc(), Job.id.desc(), OutboxItem.id))
    items = session.scalars(query).all()
    if not items:
        raise Refused("no results to send: the study has not been analysed")
    latest_job = items[0].job_id
    chosen = [i for i in items if i.job_id == latest_job and (destination is None or i.destination == destination)
              and (not failed_only or i.state is DeliveryState.failed)]
    if destination is not None and not any(i.destination == destination for i in items):
        raise Refused(f"nothing was addressed to {destination!r}")
    for item in chosen:
        item.state, item.attempts, item.last_error, item.sent_at = DeliveryState.pending, 0, None, None
        item.next_attempt_at, item.deliver_by = now, now + deliver_for
    return [item.id for item in chosen]

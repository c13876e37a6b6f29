"""The result a study shows: its newest finished analysis.

The worklist, the study page and chat show the newest finished analysis of any version, so that a study whose
new images are being analysed keeps its last result on screen. A sign-off may only take the current version's
draft: the radiologist signs what the images now are.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from records.schema import StudyResult
from records.tables import Job, JobState, Study


def latest_job(session: Session, study: Study, *, current_version: bool = False, lock: bool = False) -> Job | None:
    """The newest finished analysis of the study (of its current version only, if asked; locked, if asked)."""
    query = select(Job).where(Job.study_id == study.id, Job.state == JobState.done)
    if current_version:
        query = query.where(Job.study_version == study.version)
    query = query.order_by(Job.study_version.desc(), Job.id.desc())
    return session.scalar(query.with_for_update() if lock else query)


def result_of(job: Job | None) -> StudyResult | None:
    """A finished analysis's result, or None when there is no analysis or it stored none."""
    return StudyResult.model_validate(job.result.payload) if job is not None and job.result else None


def latest_result(session: Session, study: Study) -> StudyResult | None:
    """The result of the newest finished analysis of the study."""
    return result_of(latest_job(session, study))

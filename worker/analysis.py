"""The database side of an analysis: claim the job, read the images, store one result.

A job is keyed by (study, study version, model revision). Whoever runs it (a Celery worker, a
redelivered task, a second worker, or the in-process runner of ``serve``) claims it in a
transaction, and the result row is unique per job: a repeat finds the job done and stops, and a
race between two runners leaves one result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from radvlm.backends.base import ModelBackend
from radvlm.prompts import PROMPT_VERSION
from records.audit import PROCESS_USER, Outcome, process_host, record
from records.clock import Clock
from records.metrics import ANALYSIS_DURATION, ANALYSIS_LATENCY
from records.pixels import PixelError, model_image, read_dataset
from records.schema import StudyResult
from records.storage import InstanceStore
from records.tables import Instance, Job, JobState, Result, Study, StudyState, StudyVersion
from records.text import one_line
from results.authorship import Device
from results.outbox import (
    SOFTWARE_VERSION,
    BuiltObject,
    Routing,
    build_objects,
    enqueue,
    fhir_result,
    hl7_result,
    keep,
    previous_reports,
)
from worker.pipeline import AnalysisOptions, analyse_image

log = logging.getLogger(__name__)

class PermanentFailure(Exception):
    """An analysis that no retry can fix (no decodable image, study gone)."""


def _job(session: Session, study_id: int, version: int, backend: ModelBackend, now: datetime) -> Job:
    query = select(Job).where(Job.study_id == study_id, Job.study_version == version,
                              Job.model_revision == backend.model_revision).with_for_update()
    job = session.scalar(query)
    if job is None:
        try:
            with session.begin_nested():
                session.add(Job(study_id=study_id, study_version=version, model_id=backend.model_id,
                                model_revision=backend.model_revision, state=JobState.queued, attempts=0,
                                created_at=now))
        except IntegrityError:
            pass
        job = session.scalars(query).one()
    return job


def claim(sessions: sessionmaker[Session], study_id: int, version: int, backend: ModelBackend,
          now: datetime, worker: str | None = None) -> int | None:
    """Mark the job running (by ``worker``, the GPU worker's announced name) and return its id; None when
    there is nothing (left) to do."""
    with sessions() as session, session.begin():
        study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
        if study is None:
            raise PermanentFailure(f"study {study_id} does not exist")
        job = _job(session, study_id, version, backend, now)
        if job.state in (JobState.done, JobState.superseded, JobState.failed):
            log.info("study %d version %d: job %d already %s", study_id, version, job.id, job.state.value)
            return None
        if study.version != version:
            job.state, job.error, job.finished_at = JobState.superseded, f"study is at version {study.version}", now
            return None
        job.state, job.attempts, job.started_at, job.worker = JobState.running, job.attempts + 1, now, worker
        study.state, study.state_reason = StudyState.analysing, f"analysing with {backend.model_id}"
        return job.id


def usable_instances(session: Session, study_id: int) -> list[Instance]:
    """The study's images to analyse: selected at completion, decodable then, and not yet removed."""
    query = select(Instance).where(Instance.study_id == study_id, Instance.selected.is_(True),
                                   Instance.pixel_error.is_(None), Instance.removed_at.is_(None)).order_by(Instance.id)
    return list(session.scalars(query))


def finish(sessions: sessionmaker[Session], job_id: int, result: StudyResult, objects: Sequence[BuiltObject],
           outputs: Routing, now: datetime, problems: Sequence[str] = ()) -> list[int] | None:
    """Store the result and its outbox items; None if another runner stored one for this job first.

    ``problems``: the objects that could not be built, one line each; the job keeps them (one per line) and
    the study is "analysed with problems" rather than failed: what was built is delivered.
    """
    try:
        with sessions() as session, session.begin():
            job = session.get_one(Job, job_id, with_for_update=True)
            if job.result is not None:
                return None
            session.add(Result(job_id=job_id, study_id=job.study_id, schema_version=result.schema_version,
                               payload=result.model_dump(mode="json"), created_at=now))
            items = enqueue(session, job, objects, outputs.destinations, outputs.policy, now)
            keep(session, job, objects, outputs.kept, now)
            job.state, job.finished_at, job.error = JobState.done, now, "\n".join(problems) or None
            study = session.get_one(Study, job.study_id)
            record(session, "analyse", at=now, user=PROCESS_USER, role="worker", client=process_host(),
                   study_uid=study.study_instance_uid,
                   detail=f"version {job.study_version}: {len(result.images)} image(s) by {result.model_id}")
            if study.version == job.study_version:
                findings = sorted({label for image in result.images for label, present in image.labels.items()
                                   if present})
                reason = f"analysed: {', '.join(findings)}"
                if problems:
                    reason += f"; with problems: {len(problems)} object(s) not built ({problems[0]})"
                study.state, study.state_reason = StudyState.analysed, one_line(reason)
                study.findings = result.findings()
            return [item.id for item in items]
    except IntegrityError:
        return None


def fail(sessions: sessionmaker[Session], study_id: int, version: int, model_revision: str, reason: str,
         now: datetime) -> None:
    """Leave the job and the study in a visible failed state with the reason (one bounded line)."""
    reason = one_line(reason)
    with sessions() as session, session.begin():
        job = session.scalar(select(Job).where(Job.study_id == study_id, Job.study_version == version,
                                               Job.model_revision == model_revision))
        if job is not None and job.state is not JobState.done:
            job.state, job.error, job.finished_at = JobState.failed, reason, now
        study = session.get(Study, study_id)
        if study is not None and study.version == version and study.state is not StudyState.analysed:
            study.state, study.state_reason = StudyState.failed, reason
        if study is not None and (job is None or job.state is JobState.failed):
            record(session, "analyse", at=now, user=PROCESS_USER, role="worker", client=process_host(),
                   study_uid=study.study_instance_uid, detail=f"version {version} failed: {reason}",
                   outcome=Outcome.serious_failure)


def run_analysis(study_id: int, version: int, *, sessions: sessionmaker[Session], store: InstanceStore,
                 backend: ModelBackend, options: AnalysisOptions, clock: Clock,
                 outputs: Routing | None = None, worker: str | None = None) -> list[int]:
    """Analyse one study version end to end; idempotent. Returns the new outbox items to deliver."""
    outputs = outputs or Routing()
    job_id = claim(sessions, study_id, version, backend, clock(), worker)
    if job_id is None:
        return []
    start = time.perf_counter()
    with sessions() as session:
        study_uid = session.get_one(Study, study_id).study_instance_uid
        completed_at = session.scalars(select(StudyVersion.completed_at).where(
            StudyVersion.study_id == study_id, StudyVersion.version == version)).one()
        instances = [(i.sop_instance_uid, i.series_instance_uid, i.path) for i in usable_instances(session, study_id)]
        previous = previous_reports(session, study_id, version)
    images, headers, model_images = [], {}, {}
    errors = []
    for sop_uid, series_uid, path in instances:
        try:
            ds = read_dataset(store.path(path))
            image = model_image(ds, options.max_megapixels)
        except PixelError as exc:
            errors.append(f"{sop_uid}: {exc}")
            continue
        del ds.PixelData  # the header is all the result objects need; the file is read once
        images.append(analyse_image(backend, image, sop_uid, series_uid, options))
        headers[sop_uid], model_images[sop_uid] = ds, image
    if not images:
        raise PermanentFailure("no decodable frontal image: " + ("; ".join(errors) or "none selected"))
    result = StudyResult(
        study_instance_uid=study_uid, study_version=version, model_id=backend.model_id,
        model_revision=backend.model_revision, prompt_version=PROMPT_VERSION, backend=backend.name,
        images=images, seconds=round(time.perf_counter() - start, 3),
    )
    now = clock()
    device = Device(model_id=backend.model_id, model_revision=backend.model_revision,
                    software_version=SOFTWARE_VERSION, station_name=outputs.station_name)
    built = build_objects(result, headers, model_images, outputs.kinds(), device, now, previous)
    first = headers[result.images[0].sop_instance_uid]
    urgent = outputs.policy.urgent_findings
    if outputs.hl7 is not None:
        built.attempt("hl7", "HL7 result", hl7_result, result, first, outputs.hl7, urgent, now)
    if outputs.fhir is not None:
        built.attempt("fhir", "FHIR result", fhir_result, result, first, outputs.fhir, urgent, now)
    items = finish(sessions, job_id, result, built.objects, outputs, now, built.problems)
    log.info("study %s version %d analysed in %.1f s%s%s", study_uid, version, result.seconds,
             "" if items is not None else " (a result was already stored)",
             f", {len(built.problems)} object(s) not built" if built.problems else "", extra={"study_uid": study_uid})
    if items is not None:
        ANALYSIS_DURATION.observe(result.seconds)
        ANALYSIS_LATENCY.observe(max(0.0, (now - completed_at).total_seconds()))
    return items or []

"""Studies: list with filters, detail with the stored result, and the analysed image as PNG."""

from __future__ import annotations

import io
from collections.abc import Collection
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import ColumnElement, String, case, cast, func, or_, select

from api import qido
from api.access import find_study, visible
from api.deps import AuditDep, CurrentUser, Offset, SessionDep, SettingsDep, StoreDep
from api.problems import Problem
from api.schemas import DeliveryPublic, InstancePublic, SignOffPublic, StudiesPublic, StudyDetail, StudyPublic
from records.findings import FINDINGS
from records.latest import latest_job, latest_result, result_of
from records.pixels import PixelError, read_model_image
from records.storage import removed
from records.tables import OutboxItem, SignOff, Study, StudyState
from results.capture import draw_boxes

router = APIRouter(prefix="/studies", tags=["studies"])


def _public(study: Study, urgent: Collection[str]) -> StudyPublic:
    return StudyPublic(study_instance_uid=study.study_instance_uid, state=study.state.value,
                       reason=study.state_reason, version=study.version, priority=study.priority,
                       accession_number=study.accession_number, patient_id=study.patient_id,
                       patient_name=study.patient_name, study_date=study.study_date,
                       last_received_at=study.last_received_at, findings=study.findings,
                       urgent=[label for label in study.findings or () if label in urgent])


def _names(label: str) -> ColumnElement[bool]:
    """The study's findings name ``label`` (the JSON list's text holds it quoted: portable, and labels have
    no quotes or LIKE wildcards)."""
    return cast(Study.findings, String).like(f'%"{label}"%')


@router.get("", response_model=StudiesPublic)
def list_studies(
    session: SessionDep, user: CurrentUser, audit: AuditDep, settings: SettingsDep,
    state: StudyState | None = None, accession: str | None = None, patient_id: str | None = None,
    patient_name: Annotated[str | None, Query(
        description="words of the name in order, any case, * and ? as wildcards: 'smith jo' finds SMITH^JOHN")] = None,
    date_from: Annotated[str | None, Query(pattern=r"^\d{8}$", description="YYYYMMDD")] = None,
    date_to: Annotated[str | None, Query(pattern=r"^\d{8}$", description="YYYYMMDD")] = None,
    finding: Annotated[str | None, Query(description="only studies whose draft (or sign-off) names this CheXpert "
                                                     "finding, e.g. Pneumothorax")] = None,
    urgent_first: Annotated[bool, Query(description="studies naming a finding the site counts as urgent "
                                                    "(delivery.urgent_findings) first, then the newest")] = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Offset = 0,
) -> StudiesPublic:
    """The studies you may see, newest first: the worklist, with each study's findings and those of them the
    site counts as urgent."""
    audit("list_studies", detail="; ".join(f"{k}={v}" for k, v in dict(
        state=state and state.value, accession=accession, patient_id=patient_id, patient_name=patient_name,
        date_from=date_from, date_to=date_to, finding=finding, urgent_first=urgent_first).items() if v) or None)
    query = visible(select(Study), user)
    if finding is not None:
        if finding not in FINDINGS:
            raise Problem(422, "unknown finding", f"not a CheXpert finding label: {finding}")
        query = query.where(_names(finding))
    if state is not None:
        query = query.where(Study.state == state)
    if accession:
        query = query.where(Study.accession_number == accession)
    if patient_id:
        query = query.where(Study.patient_id == patient_id)
    if patient_name:
        query = query.where(qido.wildcard(Study.patient_name, qido.words(patient_name), any_case=True))
    if date_from:
        query = query.where(Study.study_date >= date_from)
    if date_to:
        query = query.where(Study.study_date <= date_to)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    urgent = settings.delivery.urgent_findings
    order = [Study.last_received_at.desc(), Study.id.desc()]
    if urgent_first and urgent:
        order.insert(0, case((or_(*(_names(label) for label in urgent)), 0), else_=1))
    rows = session.scalars(query.order_by(*order).limit(limit).offset(offset))
    return StudiesPublic(data=[_public(s, urgent) for s in rows], count=count)


@router.get("/{uid}", response_model=StudyDetail)
def get_study(uid: str, session: SessionDep, user: CurrentUser, audit: AuditDep,
              settings: SettingsDep) -> StudyDetail:
    """The study with its images (and why each was or was not analysed), the result of its newest finished analysis with
    the objects that could not be built from it, each delivery, and the sign-off, if any."""
    audit("read_study", uid)  # attempts too: a denied or unknown study is logged as asked
    study = find_study(session, user, uid)
    job = latest_job(session, study)
    result = result_of(job)
    signed = session.scalar(select(SignOff).where(SignOff.study_id == study.id).order_by(SignOff.id.desc()))
    deliveries = session.scalars(select(OutboxItem).where(OutboxItem.study_id == study.id).order_by(OutboxItem.id))
    return StudyDetail(
        **_public(study, settings.delivery.urgent_findings).model_dump(),
        instances=[InstancePublic(sop_instance_uid=i.sop_instance_uid, series_instance_uid=i.series_instance_uid,
                                  version=i.study_version, selected=i.selected, reason=i.selection_reason,
                                  pixel_error=i.pixel_error, removed_at=i.removed_at) for i in study.instances],
        result=result.model_dump(mode="json") if result else None,
        problems=job.error.splitlines() if job is not None and job.error else [],
        deliveries=[DeliveryPublic(kind=d.kind, destination=d.destination, object_uid=d.object_uid,
                                   state=d.state.value, attempts=d.attempts, last_error=d.last_error,
                                   sent_at=d.sent_at) for d in deliveries],
        sign_off=SignOffPublic.of(signed) if signed else None,
    )


@router.get("/{uid}/image.png", responses={200: {"content": {"image/png": {}}}}, response_class=Response)
def study_image(uid: str, session: SessionDep, store: StoreDep, user: CurrentUser, audit: AuditDep,
                sop: str | None = None, boxes: bool = True) -> Response:
    """The analysed image as the model saw it (windowed, 8-bit), with the model's boxes unless ``boxes=false``."""
    audit("read_image", uid, sop)
    study = find_study(session, user, uid)
    result = latest_result(session, study)
    if boxes and result is None:
        raise Problem(409, "no result yet", f"study {uid} is {study.state.value}: no boxes to draw yet")
    candidates = [i for i in study.instances if i.selected and not i.pixel_error]
    instance = next((i for i in candidates if sop in (None, i.sop_instance_uid)), None)
    if instance is None:
        which = f"image {sop}" if sop else "frontal image"
        raise Problem(404, "no such image", f"no analysable {which} in study {uid}")
    if instance.removed_at is not None:
        raise Problem(410, "image removed", f"study {uid}: {removed(instance.removed_at)}")
    try:
        model_image = read_model_image(store.path(instance.path))
    except PixelError as exc:
        raise Problem(422, "image cannot be decoded", str(exc)) from exc
    images = result.images if result else []
    image_result = next((r for r in images if r.sop_instance_uid == instance.sop_instance_uid), None)
    picture = draw_boxes(model_image, image_result if boxes else None)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")

"""DICOMweb: STOW-RS into the same reception as C-STORE (a sender's token in place of a calling AE title),
and QIDO-RS / WADO-RS for the result objects the node keeps."""

from __future__ import annotations

import hashlib
import io
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import qido
from api.access import find_study, visible
from api.deps import AuditDep, CurrentSender, CurrentUser, Offset, SessionDep
from api.problems import Problem
from api.stow_in import boundary_of, response, store_stream
from reception.receiver import Caller, Receiver, Transfers
from records.settings import ApiUser
from records.tables import KeptObject, Study

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"
STOW_RESPONSES = {code: {"content": {DICOM_JSON: {}}, "description": text} for code, text in (
    (200, "every instance stored"), (202, "some instances stored, the others in FailedSOPSequence"),
    (409, "no instance stored: each in FailedSOPSequence with its reason"))}


async def _stow(request: Request, sender, study_uid: str | None) -> JSONResponse:  # type: ignore[no-untyped-def]
    boundary = boundary_of(request.headers.get("content-type", ""))
    receiver: Receiver = request.app.state.receiver
    caller = Caller(sender.ae_title, request.client.host if request.client else "unknown")
    results = await store_stream(request.stream(), boundary, receiver, caller, study_uid,
                                 receiver.store.root / ".stow")
    transfers = Transfers()
    for result in results:
        transfers.note(request, result.verdict.study_uid, result.verdict.stored)
    events = transfers.events(request, by=f"STOW-RS by {sender.name}: ")
    if events:
        await run_in_threadpool(receiver.audit, "receive", caller.ae_title, caller.address, events)
    status, ds = response(results)
    return JSONResponse(ds.to_json_dict(), status_code=status, media_type=DICOM_JSON)


@router.post("/studies", responses=STOW_RESPONSES, response_class=JSONResponse)
async def store_instances(request: Request, sender: CurrentSender) -> JSONResponse:
    """STOW-RS: ``multipart/related; type="application/dicom"``, one Part 10 file per part. Each instance
    is checked and stored as a C-STORE would be (same storage, study completion and selection)."""
    return await _stow(request, sender, None)


@router.post("/studies/{study}", responses=STOW_RESPONSES, response_class=JSONResponse)
async def store_study_instances(study: str, request: Request, sender: CurrentSender) -> JSONResponse:
    """STOW-RS to one study: an instance of another study is refused (A900)."""
    return await _stow(request, sender, study)


# QIDO-RS and WADO-RS: the objects the node produced and keeps (settings: dicomweb.results), for readers.


def _kept(session: Session, user: ApiUser, study: str, series: str | None = None,
          sop: str | None = None) -> tuple[Study, list[KeptObject]]:
    """The study's kept objects, narrowed to a series or an instance; 404 for what the user cannot see."""
    found = find_study(session, user, study)
    query = select(KeptObject).where(KeptObject.study_id == found.id).order_by(KeptObject.id)
    if series is not None:
        query = query.where(KeptObject.series_instance_uid == series)
    if sop is not None:
        query = query.where(KeptObject.sop_instance_uid == sop)
    objects = list(session.scalars(query))
    if (series or sop) and not objects:
        raise Problem(404, "unknown object", f"no result object {sop or series} in study {study}")
    return found, objects


def _header(obj: KeptObject) -> Dataset:
    return dcmread(io.BytesIO(obj.payload), stop_before_pixels=True)


def _json(datasets: list[Dataset]) -> JSONResponse:
    return JSONResponse([ds.to_json_dict() for ds in datasets], media_type=DICOM_JSON)


def _pick(ds: Dataset, keywords: tuple[str, ...]) -> Dataset:
    picked = Dataset()
    for keyword in keywords:
        if keyword in ds:
            picked[keyword] = ds[keyword]
    return picked


STUDY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "ReferringPhysicianName", "StudyDescription")
SERIES_KEYS = ("Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "ContentDate", "ContentTime")


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + router.prefix


@router.get("/studies", response_class=JSONResponse, responses={200: {"content": {DICOM_JSON: {}}}})
def search_studies(request: Request, session: SessionDep, user: CurrentUser, audit: AuditDep,
                   StudyInstanceUID: str | None = None, PatientID: str | None = None,
                   PatientName: str | None = None, AccessionNumber: str | None = None,
                   StudyDate: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                   offset: Offset = 0) -> JSONResponse:
    """QIDO-RS: studies with result objects the user may see, matched as PS3.4 says (``api.qido``): a
    list of Study Instance UIDs, wildcards in PatientID, PatientName (any case) and AccessionNumber,
    a StudyDate or a range of them."""
    audit("list_studies", StudyInstanceUID, f"QIDO-RS PatientID={PatientID} AccessionNumber={AccessionNumber}")
    query = visible(select(Study).where(Study.id.in_(select(KeptObject.study_id))), user).order_by(Study.id)
    conditions = []
    if StudyInstanceUID is not None:
        conditions.append(qido.uid_list(Study.study_instance_uid, StudyInstanceUID))
    for column, value in ((Study.patient_id, PatientID), (Study.accession_number, AccessionNumber)):
        if value is not None:
            conditions.append(qido.wildcard(column, value))
    if PatientName is not None:
        conditions.append(qido.wildcard(Study.patient_name, PatientName, any_case=True))
    if StudyDate is not None:
        try:
            conditions.append(qido.date_range(Study.study_date, StudyDate))
        except ValueError as exc:
            raise Problem(400, "invalid query", f"StudyDate: {exc}") from exc
    query = query.where(*conditions)
    found = []
    for study in session.scalars(query.offset(offset).limit(limit)):
        objects = list(session.scalars(select(KeptObject).where(KeptObject.study_id == study.id)))
        headers = [_header(o) for o in objects]
        ds = _pick(headers[-1], STUDY_KEYS)
        ds.ModalitiesInStudy = sorted({str(h.Modality) for h in headers})
        ds.NumberOfStudyRelatedSeries = len({o.series_instance_uid for o in objects})
        ds.NumberOfStudyRelatedInstances = len(objects)
        ds.RetrieveURL = f"{_base(request)}/studies/{study.study_instance_uid}"
        found.append(ds)
    return _json(found)


@router.get("/studies/{study}/series", response_class=JSONResponse, responses={200: {"content": {DICOM_JSON: {}}}})
def search_series(study: str, request: Request, session: SessionDep, user: CurrentUser,
                  audit: AuditDep) -> JSONResponse:
    """QIDO-RS: the result series of one study (SR, narrative SR, presentation states)."""
    audit("list_studies", study, "QIDO-RS series")
    _, objects = _kept(session, user, study)
    series: dict[str, list[KeptObject]] = {}
    for obj in objects:
        series.setdefault(obj.series_instance_uid, []).append(obj)
    found = []
    for uid, members in series.items():
        ds = _pick(_header(members[0]), SERIES_KEYS + ("StudyInstanceUID",))
        ds.NumberOfSeriesRelatedInstances = len(members)
        ds.RetrieveURL = f"{_base(request)}/studies/{study}/series/{uid}"
        found.append(ds)
    return _json(found)


@router.get("/studies/{study}/instances", response_class=JSONResponse, responses={200: {"content": {DICOM_JSON: {}}}})
@router.get("/studies/{study}/series/{series}/instances", response_class=JSONResponse,
            responses={200: {"content": {DICOM_JSON: {}}}})
def search_instances(study: str, request: Request, session: SessionDep, user: CurrentUser, audit: AuditDep,
                     series: str | None = None) -> JSONResponse:
    """QIDO-RS: the result instances of a study or of one of its series."""
    audit("list_studies", study, f"QIDO-RS instances of series {series}")
    _, objects = _kept(session, user, study, series)
    found = []
    for obj in objects:
        ds = _pick(_header(obj), INSTANCE_KEYS + SERIES_KEYS + ("StudyInstanceUID",))
        ds.RetrieveURL = f"{_base(request)}/studies/{study}/series/{obj.series_instance_uid}/instances/" \
                         f"{obj.sop_instance_uid}"
        found.append(ds)
    return _json(found)


def _multipart(objects: list[KeptObject]) -> Response:
    """WADO-RS: ``multipart/related; type="application/dicom"``, one Part 10 file per part, as sent."""
    boundary = "radvlm-" + hashlib.sha256(b"".join(o.sop_instance_uid.encode() for o in objects)).hexdigest()[:32]
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + o.payload + b"\r\n"
                    for o in objects) + f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


WADO_RESPONSES = {200: {"content": {"multipart/related": {}}}}


@router.get("/studies/{study}", response_class=Response, responses=WADO_RESPONSES)
@router.get("/studies/{study}/series/{series}", response_class=Response, responses=WADO_RESPONSES)
@router.get("/studies/{study}/series/{series}/instances/{instance}", response_class=Response, responses=WADO_RESPONSES)
def retrieve(study: str, session: SessionDep, user: CurrentUser, audit: AuditDep, series: str | None = None,
             instance: str | None = None) -> Response:
    """WADO-RS: the result objects of a study, a series or one instance, byte for byte as produced."""
    audit("read_study", study, f"WADO-RS {instance or series or 'study'}")
    _, objects = _kept(session, user, study, series, instance)
    if not objects:
        raise Problem(404, "no result objects", f"study {study} has no result objects (yet)")
    return _multipart(objects)


@router.get("/studies/{study}/metadata", response_class=JSONResponse, responses={200: {"content": {DICOM_JSON: {}}}})
@router.get("/studies/{study}/series/{series}/metadata", response_class=JSONResponse,
            responses={200: {"content": {DICOM_JSON: {}}}})
@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata", response_class=JSONResponse,
            responses={200: {"content": {DICOM_JSON: {}}}})
def retrieve_metadata(study: str, session: SessionDep, user: CurrentUser, audit: AuditDep,
                      series: str | None = None, instance: str | None = None) -> JSONResponse:
    """WADO-RS metadata: each object's attributes as DICOM JSON (pixel data of a capture left out)."""
    audit("read_study", study, f"WADO-RS metadata {instance or series or 'study'}")
    _, objects = _kept(session, user, study, series, instance)
    return _json([_header(o) for o in objects])

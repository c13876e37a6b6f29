"""DICOMweb: STOW-RS into the same reception as C-STORE (a sender's token in place of a calling AE title)."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentSender
from api.stow import boundary_of, response, store_stream
from dicom_node.reception import Caller, Receiver
from dicom_node.storage import valid_uid
from records.audit import Outcome

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
    counts: Counter[tuple[str | None, bool]] = Counter(
        (r.verdict.study_uid if r.verdict.study_uid and valid_uid(r.verdict.study_uid) else None, r.verdict.stored)
        for r in results)
    events = []
    for study in dict.fromkeys(s for s, _ in counts):
        stored, refused = counts[(study, True)], counts[(study, False)]
        outcome = Outcome.success if not refused else Outcome.minor_failure if stored else Outcome.serious_failure
        events.append((study, f"STOW-RS by {sender.name}: {stored} instance(s) stored, {refused} refused", outcome))
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

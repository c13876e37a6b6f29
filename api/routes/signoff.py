"""Sign-off: a radiologist accepts or edits the draft; a verified SR goes out as a new version."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from api.access import find_study, require_radiologist
from api.deps import AuditDep, CurrentUser, DeliverDep, SessionDep, SettingsDep, StoreDep
from api.problems import Problem
from api.schemas import SignOffIn, SignOffPublic, SignOffResult
from records.clock import utcnow
from records.tables import SignOff
from results.authorship import Verifier
from results.outbox import Routing
from results.signoff import Signed, SignOffRefused, sign_off

router = APIRouter(prefix="/studies/{uid}/sign-off", tags=["sign-off"])


@router.post("", status_code=201, response_model=SignOffResult)
def sign(request: Request, uid: str, body: SignOffIn, session: SessionDep, store: StoreDep, user: CurrentUser,
         audit: AuditDep, settings: SettingsDep, deliver: DeliverDep) -> SignOffResult:
    """Verify the newest draft as given here; the SR names you as verifying observer and the draft as
    its predecessor, and goes to every destination that takes SRs (and a final ORU to the RIS)."""
    audit("sign_off", uid, f"findings: {', '.join(sorted(body.findings)) or 'none'}")
    require_radiologist(user, "sign off a report")
    study = find_study(session, user, uid)
    session.rollback()  # end this read: sign_off writes in a transaction of its own, read back below
    try:
        items = sign_off(request.app.state.sessions, store, uid, user.name,
                         Verifier(user.observer_name, settings.api.organization),
                         Signed(body.report.strip(), frozenset(body.findings)), Routing.of(settings), utcnow)
    except SignOffRefused as exc:
        raise Problem(exc.status, exc.title, exc.detail) from exc
    if items:
        deliver(items)  # after the commit: the outbox rows exist whatever happens to the messages
    row = session.scalars(select(SignOff).where(SignOff.study_id == study.id).order_by(SignOff.id.desc())).first()
    return SignOffResult(**SignOffPublic.of(row).model_dump(), deliveries=len(items))

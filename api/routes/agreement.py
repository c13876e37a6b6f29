"""How the drafts fare at sign-off, for the radiologists who sign them and the admins who run the model."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from sqlalchemy import select

from api.access import visible
from api.deps import AuditDep, CurrentUser, SessionDep
from api.problems import Problem
from api.schemas import AgreementPublic
from records.clock import as_utc
from records.tables import Study
from results.agreement import agreement

router = APIRouter()


@router.get("/agreement", response_model=list[AgreementPublic], tags=["agreement"])
def drafts_at_sign_off(session: SessionDep, user: CurrentUser, audit: AuditDep, since: datetime | None = None,
                       until: datetime | None = None) -> list[AgreementPublic]:
    """Per model revision, over the sign-offs from ``since`` until before ``until`` (ISO 8601) of the studies
    you may see: how many drafts were edited, and for each CheXpert finding how often the radiologist kept,
    removed or added it, with the draft's PPV, sensitivity and F1 against the signed findings."""
    audit("read_agreement", None, f"since={since} until={until}")
    since, until = (None if when is None else as_utc(when) for when in (since, until))
    if since is not None and until is not None and until <= since:
        raise Problem(422, "empty period", f"until ({until.isoformat()}) is not after since ({since.isoformat()})")
    found = agreement(session, visible(select(Study.id), user), since, until)
    return [AgreementPublic.model_validate(entry.as_dict()) for entry in found]

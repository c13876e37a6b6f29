"""Who am I, and the audit log (admins only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import AuditDep, CurrentUser, SessionDep
from api.problems import Problem
from api.schemas import AuditEventPublic, UserPublic
from records.tables import AuditEvent

router = APIRouter()


@router.get("/me", response_model=UserPublic, tags=["users"])
def me(user: CurrentUser) -> UserPublic:
    """The user the token belongs to (the web page's log-in check)."""
    return UserPublic(name=user.name, role=user.role, person_name=user.observer_name)


@router.get("/audit", response_model=list[AuditEventPublic], tags=["audit"])
def audit_log(session: SessionDep, user: CurrentUser, audit: AuditDep, user_name: str | None = None,
              study: str | None = None, action: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditEventPublic]:
    """The newest audit events first: who received, analysed, sent, read or asked what about which study, when,
    and how it ended (this read included)."""
    filters = {"user_name": user_name, "action": action}
    audit("read_audit", study, "; ".join(f"{k}={v}" for k, v in filters.items() if v) or None)
    if user.role != "admin":
        raise Problem(403, "admins only", f"only an admin may read the audit log; {user.name} is {user.role}")
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if action:
        query = query.where(AuditEvent.action == action)
    if user_name:
        query = query.where(AuditEvent.user_name == user_name)
    if study:
        query = query.where(AuditEvent.study_instance_uid == study)
    return [AuditEventPublic.of(row) for row in session.scalars(query)]

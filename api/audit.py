"""The audit log: every read of a study and every question, committed before the answer is sent."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from records.clock import utcnow
from records.settings import ApiUser
from records.tables import AuditEvent


@dataclass(frozen=True)
class Audit:
    """Bound to one request: its session, who is asking and from where.

    The event commits the request's session (on SQLite a second session would wait for the
    request's own lock), so call it before the request writes anything it may still undo.
    """

    session: Session
    user: ApiUser
    client: str | None

    def __call__(self, action: str, study_uid: str | None = None, detail: str | None = None) -> None:
        self.session.add(AuditEvent(at=utcnow(), user_name=self.user.name, role=self.user.role, action=action,
                                    study_instance_uid=study_uid, detail=detail, client=self.client))
        self.session.commit()

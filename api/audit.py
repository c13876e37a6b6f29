"""The API's audit events: every read of a study and every question, committed before the answer is sent."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from records.audit import record
from records.clock import utcnow
from records.settings import ApiUser


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
        record(self.session, action, at=utcnow(), user=self.user.name, role=self.user.role, client=self.client,
               study_uid=study_uid, detail=detail)
        self.session.commit()

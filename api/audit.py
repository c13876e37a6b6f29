"""The API's audit events: every read of a study and every question, committed before the answer is sent."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from records.audit import Outcome, record, send_event
from records.clock import utcnow
from records.settings import ApiUser
from records.tables import AuditEvent


@dataclass(frozen=True)
class Audit:
    """Bound to one request: its session, who is asking, from where, and what (``asked``: method and path).

    The event commits the request's session (on SQLite a second session would wait for the
    request's own lock), so call it before the request writes anything it may still undo: an
    attempt is on record even if the request never ends. Its outcome is known only once the route
    has ended (``end``, called by ``api.deps.get_audit``), and only then does it go to syslog.
    """

    session: Session
    user: ApiUser
    client: str | None
    asked: str
    events: list[AuditEvent] = field(default_factory=list)

    def __call__(self, action: str, study_uid: str | None = None, detail: str | None = None) -> None:
        self.events.append(record(self.session, action, at=utcnow(), user=self.user.name, role=self.user.role,
                                  client=self.client, study_uid=study_uid, detail=detail, send=False))
        self.session.commit()

    def end(self, status: int, title: str = "") -> None:
        """Record how the request ended: an answer of 400 and above is a refusal (4) or, from 500, a failure (8),
        the event's detail then saying which, why (the problem's title) and what was asked."""
        if status >= 400 and self.events:
            self.session.rollback()  # whatever the route left undone; the events themselves are committed
            outcome = Outcome.minor_failure if status < 500 else Outcome.serious_failure
            verb = "refused" if status < 500 else "failed"
            for event in self.events:
                event.outcome = int(outcome)
                named = f" ({event.detail})" if event.detail else ""
                event.detail = f"{verb} {status} {title}: {self.asked}{named}"
            self.session.commit()
        for event in self.events:
            send_event(event)

"""What a route asks for by type: a database session, the storage, the authenticated user."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.askers import Asker
from api.audit import Audit
from api.logins import FailedLogins
from api.problems import Problem
from records.audit import Outcome, record
from records.settings import ApiUser, Settings
from records.storage import InstanceStore
from results.outbox import Deliver

bearer = HTTPBearer(auto_error=False, description="a token whose SHA-256 is configured in api.users")


def get_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app``): a changed settings file takes a restart."""
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for the request, closed when it ends; nothing is committed unless the route commits."""
    with request.app.state.sessions() as session:
        yield session


def get_store(request: Request) -> InstanceStore:
    """The instance files, in the storage folder the DICOM node writes to: images are read from it and STOW-RS stores
    into it."""
    return request.app.state.store


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def authenticated(request: Request, settings: Annotated[Settings, Depends(get_settings)],
                  session: Annotated[Session, Depends(get_session)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiUser:
    """The token's user; a wrong or expired token is an audited failed log-in (a missing one is not)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise Problem(401, "authentication required", "send Authorization: Bearer <token>", challenge)
    digest = hashlib.sha256(credentials.credentials.encode()).hexdigest()
    now = request.app.state.clock()
    user = next((u for u in settings.api.users if hmac.compare_digest(digest, u.token_sha256)), None)
    if user is not None and (user.expires is None or now < user.expires):
        return user
    if user is not None and user.expires is not None:
        title, detail = "token expired", f"this token expired at {user.expires.isoformat()}; ask the administrator " \
                                         "for a new one"
    else:
        title, detail = "invalid token", "the bearer token is not known here"
    client = _client(request)
    limits: FailedLogins = request.app.state.failed_logins
    failures, left_s = limits.count(client or "unknown", now)
    if failures > limits.limit + 1:  # the burst's first was audited: the rest of its minute is not
        raise Problem(429, "too many failed log-ins", f"{failures} failed log-ins from {client} this minute; try "
                      f"again in {left_s:.0f} s", {**challenge, "Retry-After": str(max(1, round(left_s)))})
    burst = failures == limits.limit + 1
    record(session, "login_failed", at=now, user=user.name if user else "unknown", role=user.role if user else "",
           client=client, outcome=Outcome.minor_failure,
           detail=f"{title}: {request.method} {request.url.path}" + (
               f" (over {limits.limit} a minute: this address's further failures this minute are not recorded)"
               if burst else ""))
    session.commit()
    raise Problem(401, title, detail, challenge)


def current_user(user: Annotated[ApiUser, Depends(authenticated)]) -> ApiUser:
    """A user who reads (radiologist or admin): a sender's token stores studies and nothing else."""
    if user.role == "sender":
        raise Problem(403, "senders only store", f"{user.name} may store studies by STOW-RS, not read them")
    return user


def current_sender(user: Annotated[ApiUser, Depends(authenticated)]) -> ApiUser:
    """The user of a sender's token, which may only store studies (STOW-RS); any other role is 403."""
    if user.role != "sender":
        raise Problem(403, "senders only", f"storing studies needs a sender's token; {user.name} is {user.role}")
    return user


def get_audit(request: Request, session: Annotated[Session, Depends(get_session)],
              user: Annotated[ApiUser, Depends(current_user)]) -> Iterator[Audit]:
    """The request's audit events, given their outcome once the route has ended: 0, 4 when it was refused
    (a 4xx problem), 8 when it failed (5xx, or an error the route did not expect). In the function
    scope (``AuditDep``), so that happens before the answer is sent."""
    audit = Audit(session, user, _client(request), f"{request.method} {request.url.path}")
    try:
        yield audit
    except Problem as exc:
        audit.end(exc.status, exc.title)
        raise
    except Exception as exc:
        audit.end(500, type(exc).__name__)
        raise
    audit.end(200)


def get_asker(request: Request) -> Asker:
    """The model, or 503 with the reason it cannot answer now."""
    asker: Asker | None = request.app.state.asker
    if asker is None:
        raise Problem(503, "model unavailable", "no model here: set broker_url to reach the GPU workers, "
                                                "or run radvlm-pacs serve, which holds the model itself")
    reason = asker.down()
    if reason:
        raise Problem(503, "model unavailable", reason)
    return asker


def get_deliver(request: Request) -> Deliver:
    """Hands new outbox item ids to whatever sends them now; without a sender given to the app they wait for the outbox
    sweep."""
    return request.app.state.deliver


SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[InstanceStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CurrentUser = Annotated[ApiUser, Depends(current_user)]
CurrentSender = Annotated[ApiUser, Depends(current_sender)]
AuditDep = Annotated[Audit, Depends(get_audit, scope="function")]
AskerDep = Annotated[Asker, Depends(get_asker)]
DeliverDep = Annotated[Deliver, Depends(get_deliver)]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="rows to skip (a database integer)")]

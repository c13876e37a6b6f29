"""Who may see what: the studies a user's deployment allows, and what each role may do."""

from __future__ import annotations

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from api.problems import Problem
from records.settings import ApiUser
from records.tables import Instance, Study


def visible(query: Select, user: ApiUser) -> Select:
    """``query`` over studies, narrowed to those sent by the user's sources (admins see all)."""
    if user.role == "admin" or not user.sources:
        return query
    return query.where(Study.id.in_(select(Instance.study_id).where(Instance.calling_ae.in_(user.sources))))


def find_study(session: Session, user: ApiUser, uid: str) -> Study:
    """The study, or 404: a study the user may not see is answered as one that does not exist."""
    study = session.scalar(visible(select(Study).where(Study.study_instance_uid == uid), user))
    if study is None:
        raise Problem(404, "unknown study", f"no study {uid} has been received")
    return study


def require_radiologist(user: ApiUser, what: str) -> None:
    """403 for anyone but a radiologist (an admin reads, but neither asks the model nor signs off); ``what`` is the act
    refused, as the problem's detail names it."""
    if user.role != "radiologist":
        raise Problem(403, "radiologists only", f"only a radiologist may {what}; {user.name} is {user.role}")

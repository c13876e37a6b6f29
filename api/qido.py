"""QIDO-RS matching (PS3.18 8.3.4, with the matching types of PS3.4 C.2.2.2) as SQL conditions.

A viewer's study list sends what a user types: ``PatientName=SMITH*``, ``StudyDate=20260101-20261130``,
a list of Study Instance UIDs. Each query key gets the matching its VR allows: UID list matching,
wildcard matching (``*`` any run, ``?`` one character; case-sensitive, except Person Names, which
PS3.4 lets match regardless of case) and range matching of dates. A value that is no valid date or
date range raises ``ValueError`` with the reason, for a 400 answer. An empty value matches every
study (universal matching).
"""

from __future__ import annotations

import re

from sqlalchemy import ColumnElement, and_, true
from sqlalchemy.orm import InstrumentedAttribute

DATE = re.compile(r"\d{8}")


def uid_list(column: InstrumentedAttribute[str | None], value: str) -> ColumnElement[bool]:
    """UID list matching: any of the UIDs given, separated by commas or backslashes."""
    uids = [uid.strip() for uid in re.split(r"[,\\]", value) if uid.strip()]
    return column.in_(uids) if uids else true()


def wildcard(column: InstrumentedAttribute[str | None], value: str, *, any_case: bool = False) -> ColumnElement[bool]:
    """Single value matching, or wildcard matching when ``value`` holds ``*`` or ``?``; ``*`` alone
    matches every row, also those without the attribute. Wildcards become a regular expression, which
    SQLAlchemy gives PostgreSQL and SQLite alike, case-sensitive unless ``any_case``."""
    if not value.strip("*"):
        return true()
    if not any_case and "*" not in value and "?" not in value:
        return column == value
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    # flags inline: PostgreSQL's expressions and Python's (SQLite's REGEXP) both read a leading (?i)
    return column.regexp_match(f"{'(?i)' if any_case else ''}^{pattern}$")


def words(value: str) -> str:
    """A search box's words as a wildcard value: the words in order, anything before, between and
    after them, so ``smith jo`` finds ``SMITH^JOHN`` (the radiologist's study list, not QIDO-RS)."""
    return "*" + "*".join(value.split()) + "*"


def date_range(column: InstrumentedAttribute[str | None], value: str) -> ColumnElement[bool]:
    """A date (YYYYMMDD) or a range of them: ``A-B``, ``A-`` (from A on), ``-B`` (up to B), both ends
    included."""
    if not value:
        return true()
    low, dash, high = value.partition("-")
    for end in (low, high):
        if end and not DATE.fullmatch(end):
            raise ValueError(f"{value!r} is no date (YYYYMMDD) or date range (YYYYMMDD-YYYYMMDD)")
    if not dash:
        return column == low
    if not low and not high:
        raise ValueError("'-' is no date range: give at least one end")
    conditions = [column >= low] if low else []
    if high:
        conditions.append(column <= high)
    return and_(*conditions)

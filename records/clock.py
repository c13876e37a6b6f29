"""The one clock the service passes around (tests pass their own)."""

from collections.abc import Callable
from datetime import datetime, timezone

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Now, as an aware UTC datetime: what the tables store (they refuse a naive one)."""
    return datetime.now(timezone.utc)


def as_utc(when: datetime) -> datetime:
    """A time someone typed (a command-line date, a query parameter): UTC unless it says otherwise."""
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)

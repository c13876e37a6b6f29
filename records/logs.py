"""Log set-up for every process: plain text for a terminal, one JSON object per line for a collector.

Each line carries the identifiers of the work it belongs to (study UID, study and job ids, Celery
task id), bound with ``log_context`` where the work starts. Patient names and IDs are never bound
and never logged: log lines name studies by UID only.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

DETAIL = re.compile(r"DETAIL:[^\n]*")  # to the line's end, also in a repr (Celery logs a failed task's)
DETAIL_LEFT_OUT = "DETAIL: (left out: it may quote a patient's data)"
_fields: ContextVar[dict[str, str]] = ContextVar("radvlm_log_fields", default={})  # noqa: B039 (never mutated)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add ``fields`` (None values are left out) to every log record made inside the block, in this thread."""
    token = _fields.set({**_fields.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


class DatabaseDetailFilter(logging.Filter):
    """Leaves PostgreSQL's DETAIL lines out of messages and tracebacks: for a refused row they quote
    all its values ("Failing row contains ..."), a patient's name and ID among them. (SQLAlchemy's own
    listing of a statement's values is off, see records.db.) A record whose traceback held one carries
    the cleaned traceback in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the formatter fails on it too, and logging reports it
            return True
        if record.exc_info:
            trace = "".join(traceback.format_exception(*record.exc_info))
            if DETAIL.search(trace):
                message = f"{message}\n{trace.rstrip()}"
                record.exc_info, record.exc_text = None, None
        if DETAIL.search(message):
            record.msg, record.args = DETAIL.sub(DETAIL_LEFT_OUT, message), None
        return True


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record; JSON lines show them as keys, text lines at the end."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _fields.get()
        for key, value in fields.items():
            setattr(record, key, value)
        record.context = "".join(f" {k}={v}" for k, v in fields.items())
        return True


def make_handler(fmt: LogFormat = "text", stream: TextIO | None = None) -> logging.Handler:
    """The handler every process logs through: to ``stream`` (stderr), bound fields added, database
    details left out, as text or one JSON object per line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(DatabaseDetailFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=[*JsonFormatter().reserved_attrs, "context"], timestamp="time"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"))
    return handler


# Libraries that log routine steps at INFO: kept at WARNING unless the service logs at DEBUG
CHATTY_LIBRARIES = ("pynetdicom", "highdicom", "httpx", "urllib3", "multipart", "PIL")


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """One handler on the root logger, to stderr; libraries' loggers propagate to it."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt))
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # library warnings become records too, so a JSON log stays JSON
    for name in CHATTY_LIBRARIES:  # their INFO lines would bury the service's own (highdicom: eight per object)
        logging.getLogger(name).setLevel(logging.NOTSET if level.upper() == "DEBUG" else logging.WARNING)

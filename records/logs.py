"""Log set-up for every process: plain text for a terminal, one JSON object per line for a collector.

Each line carries the identifiers of the work it belongs to (study UID, study and job ids, Celery
task id), bound with ``log_context`` where the work starts. Patient names and IDs are never bound
and never logged: log lines name studies by UID only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

_fields: ContextVar[dict[str, str]] = ContextVar("radvlm_log_fields", default={})  # noqa: B039 (never mutated)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add ``fields`` (None values are left out) to every log record made inside the block, in this thread."""
    token = _fields.set({**_fields.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record; JSON lines show them as keys, text lines at the end."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _fields.get()
        for key, value in fields.items():
            setattr(record, key, value)
        record.context = "".join(f" {k}={v}" for k, v in fields.items())
        return True


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """One handler on the root logger, to stderr; libraries' loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=[*JsonFormatter().reserved_attrs, "context"], timestamp="time"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # library warnings become records too, so a JSON log stays JSON
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

"""What the log says when the database refuses a row: the error, never the row's values."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from records.db import make_engine, make_session_factory
from records.logs import make_handler
from records.tables import Study


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_refused_row_is_logged_without_its_values(database_url, fmt):
    """PostgreSQL's error for a refused row quotes the whole row, and SQLAlchemy's the statement's values:
    a traceback logged by any process, and a message that repeats the error (as Celery's for a failed
    task does), keep the error and the traceback and leave the patient's name and ID out."""
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE studies ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"))
    stream = io.StringIO()
    log = logging.getLogger("tests.refused_row")
    log.addHandler(make_handler(fmt, stream))
    log.propagate = False
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    try:
        with make_session_factory(engine)() as session, session.begin():
            session.add(Study(study_instance_uid="1.2.3", patient_id="PID-4711", patient_name="Doe^Jane",
                              first_received_at=now, last_received_at=now))
    except IntegrityError as exc:
        assert "Doe^Jane" in str(exc.orig)  # what would reach the log unfiltered
        log.exception("the study could not be recorded")
        log.error("Task %(name)s raised unexpected: %(exc)r", {"name": "analyse", "exc": exc.orig})
    else:
        pytest.fail("the constraint let the row in")
    finally:
        log.handlers.clear()
        engine.dispose()
    out = stream.getvalue()
    assert "Doe^Jane" not in out and "PID-4711" not in out
    records = ([json.loads(line)["message"] for line in out.splitlines()] if fmt == "json"
               else out.split(" ERROR tests.refused_row: ")[1:])
    assert len(records) == 2 and all("DETAIL: (left out" in record for record in records)
    assert "Traceback (most recent call last)" in records[0] and 'check constraint "refuse_all"' in records[0]


def test_libraries_routine_lines_stay_out_at_info_but_not_at_debug(capsys):
    """highdicom logs a line per module it copies (eight per object): at INFO only the service's own lines show."""
    from records.logs import CHATTY_LIBRARIES, setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in CHATTY_LIBRARIES}
    try:
        setup_logging("INFO")
        logging.getLogger("highdicom.sr.sop").info("copying module patient")
        logging.getLogger("highdicom.pr").warning("a real warning")
        logging.getLogger("worker.analysis").info("study analysed")
        info = capsys.readouterr().err
        setup_logging("DEBUG")
        logging.getLogger("highdicom.sr.sop").info("copying module study")
        debug = capsys.readouterr().err
    finally:  # the session's logging as it was: this test's handler writes to a capture that is about to close
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)
    assert "study analysed" in info and "a real warning" in info and "copying module patient" not in info
    assert "copying module study" in debug

"""What every command shares: its settings, and the one way the command line opens the database."""

from __future__ import annotations

import argparse


def settings_of(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The settings of ``--config`` (else RADVLM_CONFIG_FILE, else the embedded default), read when a command
    runs: ``--help`` and a mistyped command need none."""
    from records.settings import load_settings

    return load_settings(args.config)


def upgrade_database(settings) -> None:  # type: ignore[no-untyped-def]
    """The schema at the newest migration (``db upgrade``, and each long-running process on start), so that
    no process reads or writes tables older than its code."""
    from records.db import upgrade

    upgrade(settings.effective_database_url)


def open_sessions(settings, *, pre_ping: bool = True):  # type: ignore[no-untyped-def]
    """Sessions on the configured database, on an engine of their own; ``pre_ping=False`` for the DICOM node,
    which would otherwise pay a round trip per instance received (see ``records.db.make_engine``)."""
    from records.db import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.effective_database_url, pre_ping=pre_ping))


def close_sessions(sessions) -> None:  # type: ignore[no-untyped-def]
    """Close the pooled connections of sessions from ``open_sessions``, for a process that goes on (or a
    check that must not leave a connection behind at the server)."""
    sessions.kw["bind"].dispose()

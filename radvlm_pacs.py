"""The ``radvlm-pacs`` command: the composition root that wires settings, database, node and jobs."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("radvlm_pacs")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from records.settings import load_settings

    return load_settings(args.config)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from records.db import upgrade

    settings = _settings(args)
    upgrade(settings.effective_database_url)
    print(f"database at revision head: {settings.effective_database_url.split('@')[-1]}")
    return 0


def log_ready(study_id: int, version: int) -> None:
    """The ready consumer until analysis is wired in: the event stays recorded in study_versions."""
    log.info("study %d version %d ready for analysis", study_id, version)


def cmd_serve(args: argparse.Namespace) -> int:
    """The whole service in one process on the embedded default (SQLite, jobs in-process)."""
    return run_node(args, on_ready=log_ready)


def cmd_node(args: argparse.Namespace) -> int:
    """The DICOM node alone (production layout: workers run elsewhere)."""
    return run_node(args, on_ready=log_ready)


def run_node(args: argparse.Namespace, on_ready: Callable[[int, int], None]) -> int:
    """Run the DICOM node until SIGINT/SIGTERM."""
    from dicom_node.server import Node
    from dicom_node.storage import InstanceStore
    from records.db import make_engine, make_session_factory, upgrade

    settings = _settings(args)
    _setup_logging(settings.log_level)
    url = settings.effective_database_url
    upgrade(url)
    engine = make_engine(url)
    node = Node(
        settings.node, make_session_factory(engine),
        InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync),
        on_ready=on_ready, clock=utcnow,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    print(f"radvlm-pacs node {settings.node.ae_title} on port {node.port}", flush=True)
    stop.wait()
    node.stop()
    engine.dispose()
    return 0


def cmd_studies_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from records.db import make_engine, make_session_factory
    from records.tables import Study

    settings = _settings(args)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    with sessions() as session:
        for study in session.scalars(select(Study).order_by(Study.id)):
            print(f"{study.study_instance_uid}  v{study.version}  {study.state.value:20s} "
                  f"{len(study.instances):3d} inst  {study.state_reason or ''}")
    return 0


def cmd_studies_show(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from records.db import make_engine, make_session_factory
    from records.tables import Study

    settings = _settings(args)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    with sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == args.uid))
        if study is None:
            print(f"no study {args.uid}", file=sys.stderr)
            return 1
        print(json.dumps({
            "study_instance_uid": study.study_instance_uid,
            "state": study.state.value,
            "reason": study.state_reason,
            "version": study.version,
            "versions": [{"version": v.version, "outcome": v.outcome.value, "reason": v.reason,
                          "completed_at": v.completed_at.isoformat(),
                          "dispatched_at": v.dispatched_at.isoformat() if v.dispatched_at else None}
                         for v in study.versions],
            "instances": [{"sop_instance_uid": i.sop_instance_uid, "version": i.study_version,
                           "selected": i.selected, "reason": i.selection_reason, "pixel_error": i.pixel_error,
                           "transfer_syntax": i.transfer_syntax_uid, "calling_ae": i.calling_ae}
                          for i in study.instances],
        }, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radvlm-pacs", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (else RADVLM_CONFIG_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the whole service in one process (embedded default)").set_defaults(
        func=cmd_serve)
    sub.add_parser("node", help="run the DICOM node alone").set_defaults(func=cmd_node)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)
    studies = sub.add_parser("studies", help="received studies").add_subparsers(dest="studies_command", required=True)
    studies.add_parser("list").set_defaults(func=cmd_studies_list)
    show = studies.add_parser("show")
    show.add_argument("uid", help="Study Instance UID")
    show.set_defaults(func=cmd_studies_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

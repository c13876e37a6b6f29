"""The ``radvlm-pacs`` command: the composition root that wires settings, database, node and jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from records.clock import utcnow
from training.cli import add_commands as add_training_commands

log = logging.getLogger("radvlm_pacs")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from records.settings import load_settings

    return load_settings(args.config)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _upgrade(settings)
    print(f"database at revision head: {settings.effective_database_url.split('@')[-1]}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The whole service in one process on the embedded default: node, API, and one model thread that
    answers questions first and analyses studies by priority."""
    from api.askers import LocalAsker
    from worker.context import build_context
    from worker.dispatch import InProcessRunner
    from worker.model_thread import ModelThread

    settings = _settings(args)
    _setup_logging(settings.log_level)
    _upgrade(settings)
    ctx = build_context(settings)
    ctx.backend  # load the model before the node accepts anything
    with ModelThread() as model_thread:
        runner = InProcessRunner(ctx, model_thread)
        runner.start()  # also sends what a previous run left in the outbox
        api = _api_server(settings, LocalAsker(ctx, model_thread), ctx.deliver)
        threading.Thread(target=api.run, name="api", daemon=True).start()
        try:
            return run_node(settings, on_ready=runner)
        finally:
            api.should_exit = True
            runner.close()


def _api_server(settings, asker, deliver):  # type: ignore[no-untyped-def]
    import uvicorn

    from api.main import create_app

    config = uvicorn.Config(create_app(settings, asker, deliver), host=settings.api.bind_address,
                            port=settings.api.port, log_level=settings.log_level.lower())
    return uvicorn.Server(config)


def cmd_api(args: argparse.Namespace) -> int:
    """The API alone (production layout): it reads what node and workers store, and questions go to the
    GPU workers through Celery (without a broker, chat answers 503)."""
    from api.askers import CeleryAsker
    from worker.app import make_celery, send_deliveries

    settings = _settings(args)
    _setup_logging(settings.log_level)
    _upgrade(settings)
    asker = deliver = None
    if settings.broker_url:
        app = make_celery(settings)
        asker = CeleryAsker(app, settings.broker_url)
        deliver = lambda items: send_deliveries(app, items)  # noqa: E731
    _api_server(settings, asker, deliver).run()
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    """The DICOM node alone (production layout): ready studies go to the Celery gpu queue."""
    from dicom_node.storage import InstanceStore
    from records.db import make_engine, make_session_factory
    from worker.app import make_celery
    from worker.dispatch import CeleryDispatcher

    settings = _settings(args)
    _setup_logging(settings.log_level)
    _upgrade(settings)
    dispatcher = CeleryDispatcher(
        make_celery(settings), make_session_factory(make_engine(settings.effective_database_url)),
        InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync), settings.worker.stat_rules)
    return run_node(settings, on_ready=dispatcher)


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker: on the gpu queue it loads the model once and takes analyses one at a time;
    on the io queue it delivers results (and loads no model)."""
    import redis

    from worker import tasks
    from worker.app import GPU_QUEUE, IO_QUEUE, make_celery, send_deliveries
    from worker.delivery.outbox import due_items
    from worker.presence import Presence

    settings = _settings(args)
    _setup_logging(settings.log_level)
    _upgrade(settings)
    app = make_celery(settings)
    queues = args.queues or GPU_QUEUE
    ctx = tasks.context_of(app)
    name = f"radvlm-{queues.replace(',', '-')}@{socket.gethostname()}-{os.getpid()}"
    presence = None
    if GPU_QUEUE in queues.split(","):
        ctx.backend  # load the model now: a load error stops the worker before it takes work
        presence = Presence(redis.Redis.from_url(settings.broker_url), name, ctx.backend.model_id)
        presence.start()  # the API tells "model down" from this
    if IO_QUEUE in queues.split(","):
        with ctx.sessions() as session:  # what a previous run left in the outbox
            send_deliveries(app, due_items(session, utcnow()))
    try:
        app.worker_main(["worker", "--pool=solo", "-Q", queues, "--without-mingle", "--without-gossip",
                         "-n", name, "-l", settings.log_level])
    finally:
        if presence is not None:
            presence.stop()
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from worker.test_model import make_test_model

    path = make_test_model(args.folder, seed=args.seed)
    print(f"tiny LLaVA-OneVision checkpoint (random weights) written to {path}")
    return 0


def _upgrade(settings) -> None:  # type: ignore[no-untyped-def]
    from records.db import upgrade

    upgrade(settings.effective_database_url)


def run_node(settings, on_ready: Callable[[int, int], None]) -> int:  # type: ignore[no-untyped-def]
    """Run the DICOM node until SIGINT/SIGTERM."""
    from dicom_node.server import Node
    from dicom_node.storage import InstanceStore
    from records.db import make_engine, make_session_factory

    engine = make_engine(settings.effective_database_url)
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
    from records.tables import Job, OutboxItem, Study

    settings = _settings(args)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    with sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == args.uid))
        jobs = [] if study is None else session.scalars(select(Job).where(Job.study_id == study.id)
                                                        .order_by(Job.id)).all()
        outbox = [] if study is None else session.scalars(select(OutboxItem).where(OutboxItem.study_id == study.id)
                                                          .order_by(OutboxItem.id)).all()
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
            "priority": study.priority,
            "jobs": [{"version": j.study_version, "model": j.model_id, "revision": j.model_revision,
                      "state": j.state.value, "attempts": j.attempts, "error": j.error,
                      "result": j.result.payload if j.result else None} for j in jobs],
            "deliveries": [{"kind": o.kind, "destination": o.destination, "uid": o.object_uid,
                            "state": o.state.value, "attempts": o.attempts, "last_error": o.last_error,
                            "sent_at": o.sent_at.isoformat() if o.sent_at else None} for o in outbox],
        }, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radvlm-pacs", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (else RADVLM_CONFIG_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the whole service in one process (embedded default)").set_defaults(
        func=cmd_serve)
    sub.add_parser("node", help="run the DICOM node alone; analyses go to Celery").set_defaults(func=cmd_node)
    sub.add_parser("api", help="run the HTTP API alone").set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run a GPU worker (Celery, Redis)")
    worker.add_argument("--queues", help="comma-separated queues: gpu (model work, the default), io (delivery)")
    worker.set_defaults(func=cmd_worker)
    tiny = sub.add_parser("make-test-model", help="write a tiny random LLaVA-OneVision checkpoint for tests")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_test_model)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)
    studies = sub.add_parser("studies", help="received studies").add_subparsers(dest="studies_command", required=True)
    studies.add_parser("list").set_defaults(func=cmd_studies_list)
    show = studies.add_parser("show")
    show.add_argument("uid", help="Study Instance UID")
    show.set_defaults(func=cmd_studies_show)
    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from worker.backends.base import ModelLoadError

    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValidationError, FileNotFoundError) as exc:  # what the user can fix: no traceback
        print(f"radvlm-pacs: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from records.clock import as_utc, utcnow
from training.cli import add_commands as add_training_commands

log = logging.getLogger("radvlm_pacs")

STOP_GRACE_S = 5.0  # what ``serve`` gives the analysis and the delivery running at SIGTERM (docker stop waits 10 s)
MALLOC_ARENAS = 2  # glibc's default is 8 per core; see _limit_malloc_arenas
M_ARENA_MAX = -8  # glibc malloc.h


def _limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc malloc arenas, unless MALLOC_ARENA_MAX (or GLIBC_TUNABLES) sets the number.

    Each thread that frees a large buffer (a 4 MiB PDU, a decoded image) raises glibc's mmap threshold, so
    later buffers of that size come from the thread's arena, and each arena keeps up to twice the largest
    freed buffer: with associations, spool writers, fsyncs and model threads coming and going on their own
    threads, ``serve`` held 850 MiB instead of 450 after 120 studies sent 6 at once (benchmarks/soak.py).
    Called first, before any thread starts; elsewhere than glibc it does nothing."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # no C library with mallopt (not glibc): nothing to limit
        pass


def _setup_logging(settings) -> None:  # type: ignore[no-untyped-def]
    """Log lines as configured; audit events also to the site's syslog collector when there is one."""
    from records.audit import send_to_syslog
    from records.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    if settings.audit.syslog_host:
        send_to_syslog(settings.audit.syslog_host, settings.audit.syslog_port, settings.node.ae_title)


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
    _setup_logging(settings)
    _upgrade(settings)
    ctx = build_context(settings)
    ctx.backend  # load the model before the node accepts anything
    model_thread = ModelThread(threads=settings.worker.concurrency)
    runner = InProcessRunner(ctx, model_thread)
    runner.start()  # queues again what a previous run left unfinished; sends what it left in the outbox
    api = _api_server(settings, LocalAsker(ctx, model_thread), ctx.deliver,
                      queue_depths=lambda: {"model": model_thread.waiting()})
    api_thread = threading.Thread(target=api.run, name="api", daemon=True)
    api_thread.start()
    try:
        return run_node(settings, on_ready=runner)
    finally:
        _stop_serving(api, api_thread, runner, model_thread)


def _stop_serving(api, api_thread: threading.Thread, runner, model_thread) -> None:  # type: ignore[no-untyped-def]
    """What ``serve`` does after the node has stopped, within STOP_GRACE_S whatever the backlog: work not
    started is dropped, not worked through (the database holds it: the runner's start takes it up again);
    the analysis, the delivery and the requests running get the grace, then are abandoned."""
    deadline = time.monotonic() + STOP_GRACE_S

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    api.should_exit = True
    model_thread.shutdown(wait=False, cancel_futures=True)
    runner.close(timeout=left())
    model_thread.shutdown(timeout=left())
    api_thread.join(left())
    if not model_thread.stopped or api_thread.is_alive():
        # the interpreter would wait at exit for their helper threads (the report's, the API's workers);
        # what they had not committed is rolled back, and the next start runs it again
        log.warning("stopping: work still running after %.0f s is abandoned", STOP_GRACE_S)
        logging.shutdown()
        os._exit(0)


def _api_server(settings, asker, deliver, **probes):  # type: ignore[no-untyped-def]
    """uvicorn with no logging set-up of its own: its lines go through ours (text or JSON)."""
    import uvicorn

    from api.main import create_app

    config = uvicorn.Config(create_app(settings, asker, deliver, **probes), host=settings.api.bind_address,
                            port=settings.api.port, log_level=settings.log_level.lower(), log_config=None,
                            ssl_certfile=settings.api.tls_cert_file, ssl_keyfile=settings.api.tls_key_file)
    return uvicorn.Server(config)


def cmd_api(args: argparse.Namespace) -> int:
    """The API alone (production layout): it reads what node and workers store, and questions go to the
    GPU workers through Celery (without a broker, chat answers 503)."""
    import redis

    from api.askers import CeleryAsker
    from records.metrics import redis_queue_depths
    from worker.app import GPU_QUEUE, IO_QUEUE, make_celery, send_deliveries
    from worker.presence import gpu_workers

    settings = _settings(args)
    _setup_logging(settings)
    _upgrade(settings)
    asker = deliver = None
    probes = {}
    if settings.broker_url:
        app = make_celery(settings)
        asker = CeleryAsker(app, settings.broker_url)
        deliver = lambda items: send_deliveries(app, items)  # noqa: E731
        client = redis.Redis.from_url(settings.broker_url)
        probes = {"queue_depths": redis_queue_depths(client, [GPU_QUEUE, IO_QUEUE]),
                  "gpu_workers": lambda: len(gpu_workers(client))}
    _api_server(settings, asker, deliver, **probes).run()
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    """The DICOM node alone (production layout): ready studies go to the Celery gpu queue."""
    from dicom_node.storage import InstanceStore
    from records.db import make_engine, make_session_factory
    from records.metrics import serve_metrics
    from worker.app import make_celery
    from worker.dispatch import CeleryDispatcher

    settings = _settings(args)
    _setup_logging(settings)
    _upgrade(settings)
    serve_metrics(settings.node.metrics_port, settings.node.bind_address)
    dispatcher = CeleryDispatcher(
        make_celery(settings), make_session_factory(make_engine(settings.effective_database_url)),
        InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync), settings.worker.stat_rules)
    return run_node(settings, on_ready=dispatcher)


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker: on the gpu queue it loads the model once and takes analyses one at a time;
    on the io queue it delivers results (and loads no model) and gives back what a dead GPU worker held."""
    import uuid

    import redis

    from records.metrics import redis_queue_depths, serve_metrics
    from worker import tasks
    from worker.app import GPU_QUEUE, IO_QUEUE, make_celery, send_analysis, send_deliveries
    from worker.chat import redis_publisher
    from worker.dispatch import OutboxSweep
    from worker.lapses import LapseSweep
    from worker.presence import Presence

    settings = _settings(args)
    _setup_logging(settings)
    _upgrade(settings)
    serve_metrics(settings.worker.metrics_port if args.metrics_port is None else args.metrics_port)
    app = make_celery(settings)
    queues = args.queues or GPU_QUEUE
    ctx = tasks.context_of(app)
    name = f"radvlm-{queues.replace(',', '-')}@{socket.gethostname()}-{os.getpid()}"
    presence = None
    if GPU_QUEUE in queues.split(","):
        ctx.backend  # load the model now: a load error stops the worker before it takes work
        # this start's own name: a container restarted after a crash has the same host name and pid
        ctx.worker = f"{name}.{uuid.uuid4().hex[:8]}"  # recorded on the jobs and questions it takes
        presence = Presence(redis.Redis.from_url(settings.broker_url), ctx.worker, ctx.backend.model_id)
        presence.start()  # the API tells "model down" from this, and the io workers a dead worker's work
    sweeps: list[OutboxSweep | LapseSweep] = []
    if IO_QUEUE in queues.split(","):
        policy, grace = settings.delivery, settings.worker.lapse_grace_s
        client = redis.Redis.from_url(settings.broker_url)
        depths = redis_queue_depths(client, [IO_QUEUE])
        sweeps = [  # what a previous run left in the outbox, then what the broker lost
            OutboxSweep(ctx.sessions, lambda items: send_deliveries(app, items), interval_s=policy.sweep_s,
                        grace_s=policy.sweep_grace_s, clock=utcnow, backlog=lambda: depths()[IO_QUEUE]),
            # what a dead GPU worker held, long before Redis would hand its message on (visibility timeout)
            LapseSweep(ctx.sessions, client, lambda *analysis: send_analysis(app, *analysis),
                       lambda exchange_id, event: redis_publisher(client, exchange_id)(event), grace_s=grace,
                       interval_s=min(5.0, grace / 3), clock=utcnow),
        ]
        for sweep in sweeps:
            sweep.start()
    try:
        # several tasks at once run as threads sharing one loaded model (and, in-process, its decode steps)
        concurrency = settings.worker.concurrency if args.concurrency is None else args.concurrency
        pool = ["--pool=solo"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]
        app.worker_main(["--quiet", "worker", *pool, "-Q", queues, "--without-mingle", "--without-gossip",
                         "-n", name, "-l", settings.log_level])
    finally:
        for sweep in sweeps:
            sweep.stop()
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

    engine = make_engine(settings.effective_database_url, pre_ping=False)  # see dicom_node.reception
    node = Node(
        settings.node, make_session_factory(engine),
        InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync),
        on_ready=on_ready, clock=utcnow,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    log.info("radvlm-pacs node %s on port %d", settings.node.ae_title, node.port)
    stop.wait()
    node.stop()
    engine.dispose()
    return 0


def _sessions(settings):  # type: ignore[no-untyped-def]
    from records.db import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.effective_database_url))


STUDY_COLUMNS = ("study_instance_uid", "version", "state", "instances", "reason")


def cmd_studies_list(args: argparse.Namespace) -> int:
    """The studies as a table under a header line; none: "no studies" on stderr, so stdout holds only the table."""
    from sqlalchemy import select

    from records.tables import Study, StudyState

    query = select(Study).order_by(Study.id)
    if args.state:
        query = query.where(Study.state == StudyState(args.state))
    with _sessions(_settings(args))() as session:
        rows = [(s.study_instance_uid, f"v{s.version}", s.state.value, f"{len(s.instances):3d} inst",
                 s.state_reason or "") for s in session.scalars(query)]
    if not rows:
        print(f"no studies{f' in state {args.state}' if args.state else ''}", file=sys.stderr)
        return 0
    table = [STUDY_COLUMNS, *rows]
    width = max(len(row[0]) for row in table)
    for uid, version, state, instances, reason in table:
        print(f"{uid:{width}s}  {version:7s}  {state:20s} {instances:9s}  {reason}".rstrip())
    return 0


def _chosen_studies(session, uids: list[str], state: str | None) -> list[str]:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from records.tables import Study, StudyState

    if state:
        uids = [*uids, *session.scalars(select(Study.study_instance_uid).where(Study.state == StudyState(state))
                                        .order_by(Study.id))]
    if not uids:
        raise SystemExit("radvlm-pacs: name at least one Study Instance UID, or --state")
    return list(dict.fromkeys(uids))


def _each_study(args: argparse.Namespace, settings, what: str, operation) -> bool:  # type: ignore[no-untyped-def]
    """Run ``operation(session, uid)`` on each chosen study in its own transaction, with a progress bar;
    report the studies it refused. True when it applied to every one."""
    from tqdm import tqdm

    from worker.operations import Refused

    sessions = _sessions(settings)
    with sessions() as session:
        uids = _chosen_studies(session, args.uids, args.state)
    done, refused = [], []
    for uid in tqdm(uids, desc=what, unit="study", disable=None):
        try:
            with sessions() as session, session.begin():
                operation(session, uid)
            done.append(uid)
        except Refused as exc:
            refused.append(f"{uid}: {exc}")
    for line in refused:
        print(f"not {what}: {line}", file=sys.stderr)
    print(f"{what}: {len(done)} of {len(uids)} stud{'y' if len(uids) == 1 else 'ies'}")
    return not refused


def cmd_reanalyse(args: argparse.Namespace) -> int:
    """A new version of each study, analysed by whatever takes ready studies: the Celery queue now when a
    broker is configured, else the running ``serve``'s node."""
    from worker.operations import reanalyse

    settings = _settings(args)
    every = _each_study(args, settings, "reanalysed",
                        lambda session, uid: reanalyse(session, uid, args.reason, utcnow()))
    if settings.broker_url:
        from dicom_node.completion import dispatch_ready
        from dicom_node.storage import InstanceStore
        from worker.app import make_celery
        from worker.dispatch import CeleryDispatcher

        sessions = _sessions(settings)
        dispatcher = CeleryDispatcher(make_celery(settings), sessions,
                                      InstanceStore(settings.effective_storage_dir), settings.worker.stat_rules)
        print(f"queued {dispatch_ready(sessions, dispatcher, utcnow())} for analysis")
    else:
        print("the running service's node queues them within a second (no broker configured)")
    return 0 if every else 1


def cmd_resend(args: argparse.Namespace) -> int:
    """The latest results of each study back in the outbox, due now."""
    from datetime import timedelta

    from worker.operations import resend

    settings = _settings(args)
    items: list[int] = []
    deliver_for = timedelta(seconds=settings.delivery.deliver_for_s)
    every = _each_study(args, settings, "resent", lambda session, uid: items.extend(
        resend(session, uid, utcnow(), deliver_for, destination=args.destination, failed_only=args.failed_only)))
    if settings.broker_url:
        from worker.app import make_celery, send_deliveries

        send_deliveries(make_celery(settings), items)
        print(f"{len(items)} object(s) handed to the io workers")
    else:
        print(f"{len(items)} object(s) due now: the running service sends them within a second")
    return 0 if every else 1


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
                           "transfer_syntax": i.transfer_syntax_uid, "calling_ae": i.calling_ae,
                           "removed_at": i.removed_at.isoformat() if i.removed_at else None}
                          for i in study.instances],
            "priority": study.priority,
            "jobs": [{"version": j.study_version, "model": j.model_id, "revision": j.model_revision,
                      "state": j.state.value, "attempts": j.attempts, "error": j.error, "worker": j.worker,
                      "result": j.result.payload if j.result else None} for j in jobs],
            "deliveries": [{"kind": o.kind, "destination": o.destination, "uid": o.object_uid,
                            "state": o.state.value, "attempts": o.attempts, "last_error": o.last_error,
                            "sent_at": o.sent_at.isoformat() if o.sent_at else None} for o in outbox],
        }, indent=2))
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from worker.agreement import agreement

    with _sessions(_settings(args))() as session:
        found = agreement(session, since=args.since, until=args.until)
    if args.json:
        print(json.dumps([entry.as_dict() for entry in found], indent=2))
    else:
        print("\n\n".join(entry.table() for entry in found) or "no sign-offs in that period")
    return 0


def _day(text: str) -> datetime:
    return as_utc(datetime.fromisoformat(text))


def _masked(settings) -> dict:  # type: ignore[no-untyped-def]
    """The effective settings as JSON, passwords in URLs hidden (API keys are SecretStr: masked by pydantic), and
    of each token hash its first 8 digits: enough to tell users apart, too few to test guesses offline."""
    from sqlalchemy.engine import make_url

    data = settings.model_dump(mode="json")
    data["database_url"] = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    data["storage_dir"] = str(settings.effective_storage_dir)
    if settings.broker_url:
        data["broker_url"] = make_url(settings.broker_url).render_as_string(hide_password=True)
    for user in data["api"]["users"]:
        user["token_sha256"] = user["token_sha256"][:8] + "…"
    return data


VISIBILITY_FACTOR = 4  # visibility timeouts above this many task time limits are worth a warning


def cmd_config_check(args: argparse.Namespace) -> int:
    """Print the effective configuration, then check each peer it names; exit 1 if one does not answer.
    Warnings (``warn`` lines, last) name what works now but may lose or delay work: they leave the exit 0."""
    from sqlalchemy import text
    from tqdm import tqdm

    from records.db import make_engine
    from worker.delivery.fhir import fhir_reachable
    from worker.delivery.hl7 import mllp_reachable
    from worker.delivery.send import Attempt, echo_destination
    from worker.delivery.stow import qido_reachable

    settings = _settings(args)
    print(json.dumps(_masked(settings), indent=2, ensure_ascii=False))
    warnings: list[str] = []  # what works now but loses or delays work later: said, not failed
    worker = settings.worker
    if settings.broker_url and worker.visibility_timeout_s > VISIBILITY_FACTOR * worker.task_time_limit_s:
        warnings.append(f"worker.visibility_timeout_s ({worker.visibility_timeout_s:g} s) is more than "
                        f"{VISIBILITY_FACTOR}x worker.task_time_limit_s ({worker.task_time_limit_s:g} s): an analysis "
                        "whose worker died waits that long before Redis hands it to another worker")

    def database() -> Attempt:
        engine = make_engine(settings.effective_database_url)
        try:
            with engine.connect() as connection:
                connection.execute(text("select 1"))
            return Attempt(True, False, "connected")
        except Exception as exc:
            return Attempt(False, True, f"{type(exc).__name__}: {exc}")
        finally:
            engine.dispose()

    def broker() -> Attempt:
        import redis

        client = redis.Redis.from_url(settings.broker_url or "", socket_timeout=settings.delivery.timeout_s)
        try:
            client.ping()
        except redis.RedisError as exc:
            return Attempt(False, True, str(exc))
        try:
            appendonly = client.config_get("appendonly").get("appendonly")
        except redis.RedisError as exc:  # a managed Redis may refuse CONFIG
            warnings.append(f"broker: cannot tell whether Redis keeps an append-only file ({exc})")
        else:
            if appendonly != "yes":
                warnings.append("broker: Redis runs without appendonly: the queued analyses and deliveries are lost "
                                "when it restarts (run it with --appendonly yes)")
        return Attempt(True, False, "PONG")

    def storage() -> Attempt:  # the folder, or the nearest parent it will be created in
        folder = settings.effective_storage_dir
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        writable = existing.is_dir() and os.access(existing, os.W_OK)
        return Attempt(writable, False, f"{folder} {'writable' if writable else 'not writable'}")

    checks: list[tuple[str, Callable[[], Attempt]]] = [("database", database), ("storage", storage)]
    if settings.broker_url:
        checks.append(("broker", broker))
    for destination in settings.destinations:
        if destination.stow_url:
            checks.append((f"destination {destination.name} ({destination.address}) QIDO-RS",
                           lambda d=destination: qido_reachable(d, settings.delivery.timeout_s)))
            continue
        checks.append((f"destination {destination.name} ({destination.address}) C-ECHO",
                       lambda d=destination: echo_destination(d, settings.node.ae_title, settings.delivery.timeout_s)))
    if settings.fhir:
        checks.append((f"EHR {settings.fhir.base_url} (FHIR capability statement)",
                       lambda: fhir_reachable(settings.fhir, settings.delivery.timeout_s)))
    if settings.hl7:
        checks.append((f"RIS {settings.hl7.host}:{settings.hl7.port} (MLLP)",
                       lambda: mllp_reachable(settings.hl7.host, settings.hl7.port, settings.delivery.timeout_s)))
    failed = 0
    lines = []
    for name, check in tqdm(checks, desc="checking", unit="peer", disable=None):
        outcome = check()
        failed += not outcome.delivered
        lines.append(f"{'ok  ' if outcome.delivered else 'FAIL'}  {name}: {outcome.detail}")
    print("\n".join(lines + [f"warn  {warning}" for warning in warnings]))
    return 1 if failed else 0


HEALTH_AE = "RADVLM-HEALTH"


def cmd_health(args: argparse.Namespace) -> int:
    """A container health check: 0 when this host's node, API or worker answers, else 1 with why."""
    import ssl
    import urllib.request

    settings = _settings(args)
    loopback = "127.0.0.1"
    # liveness on loopback: a certificate names the public host, not 127.0.0.1, so it is not verified
    unverified = ssl._create_unverified_context()
    try:
        if args.part == "node":
            from worker.delivery.send import c_echo

            port, tls, node_tls = settings.node.port, None, settings.node.tls
            if node_tls is not None and not node_tls.plain_listener:  # TLS only: present the node's own certificate
                unverified.load_cert_chain(node_tls.cert_file, node_tls.key_file)
                port, tls = node_tls.port, (unverified, loopback)
            outcome = c_echo(loopback, port, settings.node.ae_title, HEALTH_AE, 5, tls)
            if not outcome.delivered:
                raise RuntimeError(f"node: {outcome.detail}")
        elif args.part == "api":
            with urllib.request.urlopen(f"{settings.api.scheme}://{loopback}:{settings.api.port}/health",
                                        timeout=5, context=unverified) as rsp:
                rsp.read()
        else:
            import redis

            from worker.presence import PREFIX

            metrics_port = settings.worker.metrics_port if args.metrics_port is None else args.metrics_port
            if metrics_port:
                with urllib.request.urlopen(f"http://{loopback}:{metrics_port}/metrics", timeout=5) as rsp:
                    page = rsp.read().decode("utf-8", "replace")
                if args.gpu and any(line.split()[1:2] == ["0.0"] for line in page.splitlines()
                                    if line.startswith("radvlm_engine_compiled ")):
                    raise RuntimeError("the model engine decodes uncompiled, several times slower "
                                       "(radvlm_engine_compiled 0): the worker's log says why")
            client = redis.Redis.from_url(settings.broker_url or "", socket_timeout=5)
            client.ping()
            if args.gpu and not list(client.scan_iter(f"{PREFIX}*@{socket.gethostname()}-*")):
                raise RuntimeError("no GPU worker of this host announces itself in Redis")
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """A new API token: printed once, with the settings entry that holds only its hash."""
    import hashlib
    import secrets
    from datetime import timedelta

    from records.settings import ApiUser

    missing = {"radiologist": None if args.person_name else "--person-name Family^Given (DICOM PN): the verifying "
                                                            "observer their sign-offs name",
               "sender": None if args.ae_title else "--ae-title AE: the calling AE title its studies are recorded "
                                                    "under"}.get(args.role)
    if missing:
        print(f"radvlm-pacs token: a {args.role} needs {missing}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    user = ApiUser(name=args.name, role=args.role, sources=args.sources or [], person_name=args.person_name,
                   ae_title=args.ae_title, token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                   expires=utcnow() + timedelta(days=args.days) if args.days else None)
    entry = user.model_dump(mode="json", exclude_defaults=True)
    entry.setdefault("role", user.role)
    fields = ", ".join(f"{key} = {json.dumps(value)}" for key, value in entry.items())
    print(f"token (give it to {user.name}; it is not stored anywhere): {token}", file=sys.stderr)
    print(f"{{ {fields} }},")
    return 0


def _parser() -> argparse.ArgumentParser:
    from records.tables import StudyState

    parser = argparse.ArgumentParser(prog="radvlm-pacs", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (else RADVLM_CONFIG_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the whole service in one process (embedded default)").set_defaults(
        func=cmd_serve)
    sub.add_parser("node", help="run the DICOM node alone; analyses go to Celery").set_defaults(func=cmd_node)
    sub.add_parser("api", help="run the HTTP API alone").set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run a GPU worker (Celery, Redis)")
    worker.add_argument("--queues", help="comma-separated queues: gpu (model work, the default), io (delivery)")
    worker.add_argument("--metrics-port", type=int, help="Prometheus port of this worker (default worker.metrics_port; "
                                                         "0: off); give each worker on one host its own")
    worker.add_argument("--concurrency", type=int, help="tasks at once (default worker.concurrency); on a GPU worker "
                                                        "they share the model's decode steps")
    worker.set_defaults(func=cmd_worker)
    tiny = sub.add_parser("make-test-model", help="write a tiny random LLaVA-OneVision checkpoint for tests")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_test_model)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)
    studies = sub.add_parser("studies", help="received studies").add_subparsers(dest="studies_command", required=True)
    listing = studies.add_parser("list")
    listing.add_argument("--state", choices=[s.value for s in StudyState])
    listing.set_defaults(func=cmd_studies_list)
    show = studies.add_parser("show")
    show.add_argument("uid", help="Study Instance UID")
    show.set_defaults(func=cmd_studies_show)
    for name, func, help_text in (("reanalyse", cmd_reanalyse, "analyse studies again, as a new version of each"),
                                  ("resend", cmd_resend, "send the latest results of studies again")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("uids", nargs="*", metavar="UID", help="Study Instance UIDs")
        command.add_argument("--state", choices=[s.value for s in StudyState], help="and every study in this state")
        command.set_defaults(func=func)
    sub.choices["reanalyse"].add_argument("--reason", default="requested by an administrator",
                                          help="recorded with the new version")
    sub.choices["resend"].add_argument("--destination", help="only to this destination (its name; the RIS is \"ris\")")
    sub.choices["resend"].add_argument("--failed-only", action="store_true", help="only objects that failed")
    agree = sub.add_parser("agreement", help="how the drafts fare at sign-off: per finding kept, removed and added "
                                             "by the radiologists, per model revision")
    agree.add_argument("--since", type=_day, help="sign-offs from this date (YYYY-MM-DD, UTC) on")
    agree.add_argument("--until", type=_day, help="and before this date")
    agree.add_argument("--json", action="store_true", help="as JSON, as GET /agreement answers")
    agree.set_defaults(func=cmd_agreement)
    config = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    config.add_parser("check", help="print the effective settings; C-ECHO each destination, reach the RIS, "
                                    "database and broker").set_defaults(func=cmd_config_check)
    health = sub.add_parser("health", help="container health check of this host's node, API or worker")
    health.add_argument("part", choices=["node", "api", "worker"])
    health.add_argument("--gpu", action="store_true", help="worker: also require a live GPU worker on this host")
    health.add_argument("--metrics-port", type=int, help="worker: the Prometheus port to ask (default "
                                                         "worker.metrics_port; 0: none), as given to its worker "
                                                         "--metrics-port")
    health.set_defaults(func=cmd_health)
    token = sub.add_parser("token", help="make an API token: prints it once, and the api.users entry with its hash")
    token.add_argument("name", help="user name (audit log, sign-offs)")
    token.add_argument("--role", choices=["radiologist", "admin", "sender"], default="radiologist",
                       help="radiologist: read, ask, sign off; admin: every study and the audit log; sender: store "
                            "studies by STOW-RS")
    token.add_argument("--person-name", help="DICOM PN, e.g. House^Gregory: the verifying observer of the user's "
                                             "sign-offs (required for a radiologist)")
    token.add_argument("--ae-title", help="the calling AE title a sender's studies are recorded under (required "
                                          "for a sender)")
    token.add_argument("--days", type=int, default=90, help="valid for this many days (0: until removed)")
    token.add_argument("--sources", nargs="*", metavar="AE", help="calling AE titles whose studies the user sees")
    token.set_defaults(func=cmd_token)
    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from worker.backends.base import ModelLoadError

    _limit_malloc_arenas()
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValidationError, OSError) as exc:  # what the user can fix (files, ports): no traceback
        print(f"radvlm-pacs: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

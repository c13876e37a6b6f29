"""The long-running processes: ``serve``, ``node``, ``api`` and ``worker``. Each builds its parts from the
settings, runs until stopped, and stops within a bounded time."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from radvlm_pacs.common import close_sessions, open_sessions, settings_of, upgrade_database
from records.clock import utcnow

log = logging.getLogger("radvlm_pacs")

STOP_GRACE_S = 5.0  # what ``serve`` gives the analysis and the delivery running at SIGTERM (docker stop waits 10 s)
MALLOC_ARENAS = 2  # glibc's default is 8 per core; see limit_malloc_arenas
M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas() -> None:
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


def _start(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The settings of a long-running process, its logging set up and the schema upgraded before it starts."""
    settings = settings_of(args)
    _setup_logging(settings)
    upgrade_database(settings)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """The whole service in one process on the embedded default: node, API, and one model thread that
    answers questions first and analyses studies by priority."""
    from worker.askers import LocalAsker
    from worker.context import build_context
    from worker.dispatch import InProcessRunner
    from worker.model_thread import ModelThread

    settings = _start(args)
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

    from records.metrics import redis_queue_depths
    from worker.app import GPU_QUEUE, IO_QUEUE, make_celery, send_deliveries
    from worker.askers import CeleryAsker
    from worker.presence import gpu_workers

    settings = _start(args)
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
    from records.metrics import serve_metrics
    from worker.app import make_celery
    from worker.dispatch import CeleryDispatcher

    settings = _start(args)
    serve_metrics(settings.node.metrics_port, settings.node.bind_address)
    dispatcher = CeleryDispatcher(make_celery(settings), open_sessions(settings))
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

    settings = _start(args)
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


def run_node(settings, on_ready: Callable[[int, int], None]) -> int:  # type: ignore[no-untyped-def]
    """Run the DICOM node until SIGINT/SIGTERM: ``serve`` and ``node`` differ only in what takes the studies
    it completes (``on_ready``)."""
    from dicom_node.server import Node
    from records.storage import InstanceStore

    sessions = open_sessions(settings, pre_ping=False)  # see reception.receiver
    node = Node(
        settings.node, sessions,
        InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync),
        on_ready=on_ready, clock=utcnow, stat_rules=settings.worker.stat_rules,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    log.info("radvlm-pacs node %s on port %d", settings.node.ae_title, node.port)
    stop.wait()
    node.stop()
    close_sessions(sessions)
    return 0

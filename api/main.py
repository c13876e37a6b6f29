"""The FastAPI application: built from settings in its lifespan, never at import.

``asker`` answers questions (a GPU worker through Celery, or ``serve``'s model thread; None: chat
is unavailable) and ``deliver`` hands new outbox items to the deliverer; both come from the
composition root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from api import problems
from api.askers import Asker
from api.headers import SecurityHeaders
from api.logins import FailedLogins
from api.routes import admin, agreement, chat, dicomweb, signoff, studies
from reception.receiver import Receiver, inflated_limit
from records.clock import Clock, utcnow
from records.db import make_engine, make_session_factory
from records.metrics import QueueDepths, StateCollector
from records.settings import Settings
from records.storage import InstanceStore
from results.outbox import Deliver

PAGE = Path(__file__).with_name("page")


def create_app(settings: Settings, asker: Asker | None = None, deliver: Deliver | None = None,
               queue_depths: QueueDepths | None = None, gpu_workers: Callable[[], int] | None = None,
               clock: Clock = utcnow) -> FastAPI:
    """``queue_depths`` and ``gpu_workers`` feed the scrape-time gauges at ``/metrics``; ``clock`` decides
    token expiry."""
    state_metrics = CollectorRegistry(auto_describe=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.effective_database_url)
        app.state.settings = settings
        app.state.clock = clock
        app.state.failed_logins = FailedLogins(settings.api.failed_logins_per_minute)
        app.state.sessions = make_session_factory(engine)
        collector = StateCollector(app.state.sessions, queue_depths, gpu_workers)
        state_metrics.register(collector)
        app.state.store = InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync)
        syncer = ThreadPoolExecutor(2, thread_name_prefix="stow-sync")
        app.state.receiver = Receiver(store=app.state.store, sessions=app.state.sessions,
                                      reserve_bytes=settings.node.disk_reserve_mb << 20, clock=clock, syncer=syncer,
                                      max_inflated_bytes=inflated_limit(settings.node.max_image_megapixels))
        app.state.asker = asker
        app.state.deliver = deliver or (lambda items: None)  # the outbox sweep finds them later
        yield
        state_metrics.unregister(collector)
        syncer.shutdown()
        engine.dispose()

    app = FastAPI(title="radvlm-pacs", version="0.1.0", lifespan=lifespan,
                  description="RadVLM drafts for chest X-ray studies: studies, results, images, follow-up "
                              "questions and sign-off. Every route but /health needs a bearer token; the web "
                              "page at /ui/ holds no data and asks for one.")
    problems.install(app)
    app.add_middleware(SecurityHeaders, https=settings.api.tls_cert_file is not None)
    for module in (studies, chat, signoff, agreement, admin, dicomweb):
        app.include_router(module.router)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text format: this process's counters, then what the database and queues hold now."""
        body = generate_latest(REGISTRY) + generate_latest(state_metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=PAGE, html=True), name="page")
    return app

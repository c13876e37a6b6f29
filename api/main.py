"""The FastAPI application: built from settings in its lifespan, never at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import problems
from api.routes import studies
from dicom_node.storage import InstanceStore
from records.db import make_engine, make_session_factory
from records.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.effective_database_url)
        app.state.settings = settings
        app.state.sessions = make_session_factory(engine)
        app.state.store = InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync)
        yield
        engine.dispose()

    app = FastAPI(title="radvlm-pacs", version="0.1.0", lifespan=lifespan,
                  description="RadVLM drafts for chest X-ray studies: studies, results, images. "
                              "Every route but /health needs a bearer token.")
    problems.install(app)
    app.include_router(studies.router)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app

"""What a worker process holds for its whole life: sessions, storage, and the model, loaded once."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from radvlm.backends import load_backend
from radvlm.backends.base import ModelBackend
from records.db import make_engine, make_session_factory
from records.settings import Settings
from records.storage import InstanceStore
from results.outbox import Deliver, Routing
from worker.pipeline import AnalysisOptions


@dataclass
class WorkerContext:
    """``backend`` loads on first use: a worker on the io queue alone never loads the model."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: InstanceStore
    options: AnalysisOptions
    outputs: Routing
    deliver: Deliver = lambda items: None  # noqa: E731 (replaced by the composition root)
    # the name a GPU worker announces in Redis (worker.presence), recorded on the jobs and questions it takes
    # so that an io worker's sweep can give them back if it dies (worker.lapses); None in serve
    worker: str | None = None
    _backend: ModelBackend | None = None

    @property
    def backend(self) -> ModelBackend:
        if self._backend is None:
            self._backend = load_backend(self.settings.model)
        return self._backend


def build_context(settings: Settings, backend: ModelBackend | None = None) -> WorkerContext:
    """A worker process's context from the settings; ``backend`` given (tests, ``serve``) or loaded on first use."""
    return WorkerContext(
        settings=settings,
        sessions=make_session_factory(make_engine(settings.effective_database_url)),
        store=InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync),
        options=AnalysisOptions(max_new_tokens=settings.model.max_new_tokens, regions=tuple(settings.model.regions),
                                max_megapixels=settings.node.max_image_megapixels),
        outputs=Routing.of(settings),
        _backend=backend,
    )

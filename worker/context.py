"""What a worker process holds for its whole life: sessions, storage, and the model, loaded once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.storage import InstanceStore
from records.db import make_engine, make_session_factory
from records.settings import ModelSettings, Settings
from worker.analysis import Outputs
from worker.backends.base import ModelBackend
from worker.pipeline import AnalysisOptions

Deliver = Callable[[list[int]], None]


@dataclass
class WorkerContext:
    """``backend`` loads on first use: a worker on the io queue alone never loads the model."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: InstanceStore
    options: AnalysisOptions
    outputs: Outputs
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


def load_backend(model: ModelSettings) -> ModelBackend:
    """The configured backend. ``scripted`` is the named test double and says so in every result."""
    if model.backend == "scripted":
        from worker.backends.scripted import ScriptedBackend

        return ScriptedBackend(delay_s=model.scripted_delay_s)
    if model.backend == "openai-server":
        from worker.backends.openai_server import OpenAIServerBackend

        key = model.server_api_key.get_secret_value() if model.server_api_key else None
        return OpenAIServerBackend(model.server_url or "", model.server_model or model.id, api_key=key,
                                   revision=model.revision, timeout_s=model.server_timeout_s)
    from worker.backends.transformers import TransformersBackend

    return TransformersBackend(model.id, revision=model.revision, device=model.device,
                               quantization=model.quantization, prefix_cache_mb=model.prefix_cache_mb,
                               batch_cache_mb=model.batch_cache_mb, max_prompt_tokens=model.max_prompt_tokens,
                               max_new_tokens=model.max_new_tokens, compile_decode=model.compile_decode,
                               prefill_chunk_tokens=model.prefill_chunk_tokens)


def build_context(settings: Settings, backend: ModelBackend | None = None) -> WorkerContext:
    return WorkerContext(
        settings=settings,
        sessions=make_session_factory(make_engine(settings.effective_database_url)),
        store=InstanceStore(settings.effective_storage_dir, fsync=settings.node.fsync),
        options=AnalysisOptions(max_new_tokens=settings.model.max_new_tokens, regions=tuple(settings.model.regions),
                                max_megapixels=settings.node.max_image_megapixels),
        outputs=Outputs.of(settings),
        _backend=backend,
    )

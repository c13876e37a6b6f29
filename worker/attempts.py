"""How an analysis attempt or a question ends, the same for a Celery task and for ``serve``'s model thread."""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout

from radvlm.backends.base import GenerationParams, ModelUnavailable, PromptTooLong
from records.backoff import backoff
from records.clock import utcnow
from records.logs import log_context
from records.metrics import ANALYSES
from records.text import one_line
from worker.analysis import PermanentFailure, fail, run_analysis
from worker.chat import Publish, answer_question
from worker.context import WorkerContext
from worker.delivery.outbox import deliver_item, sender

log = logging.getLogger(__name__)

RETRY_CAP_S = 300.0  # the longest wait between two attempts at an analysis, whatever the number of retries


def transient(exc: BaseException) -> bool:
    """Whether a failure may pass on its own (a database, broker or disk away, GPU memory short), so the study
    is tried again with backoff; anything else (a bug, an input the code cannot handle) would fail the same way.
    """
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError))
    if isinstance(exc, (SQLAlchemyTimeout, DisconnectionError, RedisError, KombuOperationalError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):  # the disk full or away; a file that is not there stays missing
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def attempt(ctx: WorkerContext, study_id: int, version: int, retries_done: int) -> float | None:
    """Run one attempt. Return None when finished (done or failed for good), else the retry delay."""
    with log_context(study_id=study_id, study_version=version):
        return _attempt(ctx, study_id, version, retries_done)


def _attempt(ctx: WorkerContext, study_id: int, version: int, retries_done: int) -> float | None:
    try:
        items = run_analysis(study_id, version, sessions=ctx.sessions, store=ctx.store, backend=ctx.backend,
                             options=ctx.options, clock=utcnow, outputs=ctx.outputs, worker=ctx.worker)
    except (PermanentFailure, PromptTooLong) as exc:  # no retry makes the prompt shorter
        log.error("study %d version %d failed: %s", study_id, version, exc)
        fail(ctx.sessions, study_id, version, ctx.backend.model_revision, str(exc), utcnow())
        ANALYSES.labels("failed").inc()
        return None
    except ModelUnavailable as exc:  # the model server is away: the study waits for it, however long
        delay = backoff(retries_done, first=0, base=ctx.settings.worker.retry_backoff_s, cap=RETRY_CAP_S)
        log.warning("study %d version %d waits for the model (%s); next attempt in %.0f s", study_id, version, exc,
                    delay)
        ANALYSES.labels("waiting_for_model").inc()
        return delay
    except Exception as exc:  # a bug or an input the code cannot take fails at once; the world's troubles retry
        policy = ctx.settings.worker
        if not transient(exc):
            reason = one_line(f"{type(exc).__name__}: {exc}")
            log.error("study %d version %d failed (not retried: the same input fails the same way): %s", study_id,
                      version, reason, exc_info=True)
            fail(ctx.sessions, study_id, version, ctx.backend.model_revision, reason, utcnow())
            ANALYSES.labels("failed").inc()
            return None
        if retries_done >= policy.max_retries:
            reason = one_line(f"gave up after {retries_done + 1} attempts: {type(exc).__name__}: {exc}")
            log.error("study %d version %d %s", study_id, version, reason)
            fail(ctx.sessions, study_id, version, ctx.backend.model_revision, reason, utcnow())
            ANALYSES.labels("failed").inc()
            return None
        delay = backoff(retries_done, first=0, base=policy.retry_backoff_s, cap=RETRY_CAP_S)
        log.warning("study %d version %d attempt %d failed (%s: %s); retrying in %.0f s", study_id, version,
                    retries_done + 1, type(exc).__name__, exc, delay)
        ANALYSES.labels("retry").inc()
        return delay
    ANALYSES.labels("done").inc()
    if items:  # after the commit: the outbox rows exist whatever happens to the messages
        try:
            ctx.deliver(items)
        except Exception as exc:  # the broker away: an io worker's sweep finds the items in the outbox
            log.warning("study %d version %d: %d result object(s) wait in the outbox (%s: %s)", study_id, version,
                        len(items), type(exc).__name__, exc)
    return None


def deliver_once(ctx: WorkerContext, item_id: int) -> float | None:
    """One delivery attempt; None when settled, else seconds until the item is due again."""
    settings = ctx.settings
    send = sender(settings.destinations, settings.hl7, settings.node.ae_title, settings.delivery, settings.fhir)
    return deliver_item(ctx.sessions, item_id, send, settings.delivery, utcnow)


def answer(ctx: WorkerContext, exchange_id: int, publish: Publish) -> None:
    """Answer one chat question with the context's model, streaming to ``publish``."""
    answer_question(exchange_id, sessions=ctx.sessions, store=ctx.store, backend=ctx.backend,
                    params=GenerationParams(max_new_tokens=ctx.options.max_new_tokens), clock=utcnow,
                    publish=publish, worker=ctx.worker)

"""Celery tasks. Arguments are IDs; the task re-reads the world and decides what is left to do."""

from __future__ import annotations

import redis
from celery import Task, shared_task

from records.logs import log_context
from worker.app import ANALYSE_TASK, CHAT_TASK, DELIVER_TASK, send_deliveries
from worker.attempts import answer, attempt, deliver_once
from worker.chat import redis_publisher
from worker.context import WorkerContext, build_context


def context_of(app) -> WorkerContext:  # type: ignore[no-untyped-def]
    """The worker process's context, built on first use and kept: the model loads once."""
    ctx = getattr(app, "radvlm_context", None)
    if ctx is None:
        ctx = app.radvlm_context = build_context(app.radvlm_settings)
        ctx.deliver = lambda items: send_deliveries(app, items)
    return ctx


@shared_task(bind=True, name=ANALYSE_TASK, max_retries=None)
def analyse_study(self: Task, study_id: int, version: int) -> str:
    """One analysis attempt of a study version; retried with the delay ``attempt`` returns (a transient failure)."""
    with log_context(task_id=self.request.id):
        delay = attempt(context_of(self.app), study_id, version, self.request.retries)
    if delay is not None:
        raise self.retry(countdown=delay)
    return "finished"


@shared_task(bind=True, name=CHAT_TASK, max_retries=0)
def chat(self: Task, exchange_id: int) -> str:
    """A radiologist's question: answered once, streamed to the API over Redis pub/sub, never retried
    (a failure is shown to the radiologist, who may ask again)."""
    ctx = context_of(self.app)
    client = getattr(self.app, "radvlm_redis", None) or redis.Redis.from_url(ctx.settings.broker_url)
    self.app.radvlm_redis = client
    with log_context(task_id=self.request.id, exchange_id=exchange_id):
        answer(ctx, exchange_id, redis_publisher(client, exchange_id))
    return "answered"


@shared_task(bind=True, name=DELIVER_TASK, max_retries=None)
def deliver(self: Task, item_id: int) -> str:
    """One outbox item to its destination; retried with backoff until delivered or out of time."""
    with log_context(task_id=self.request.id, outbox_item_id=item_id):
        delay = deliver_once(context_of(self.app), item_id)
    if delay is not None:
        raise self.retry(countdown=delay)
    return "settled"

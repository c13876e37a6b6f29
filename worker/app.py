"""The Celery application: a ``gpu`` queue for model work and an ``io`` queue for delivery.

At-least-once with idempotent results: tasks are acknowledged late, each of a worker's threads
(``worker.concurrency``) takes one task at a time, and Redis redelivers what a dead worker never
acknowledged (after ``visibility_timeout``, set above the task time limit, and swept for every few
seconds); a dead GPU worker's work is given back sooner by an io worker (worker.lapses). Results are unique
per (study, version, model revision).
"""

from __future__ import annotations

from celery import Celery

from records.settings import Settings
from records.tables import ROUTINE_PRIORITY

ANALYSE_TASK = "radvlm.analyse_study"
CHAT_TASK = "radvlm.chat"
DELIVER_TASK = "radvlm.deliver"
GPU_QUEUE, IO_QUEUE = "gpu", "io"
# Redis transport: a lower number is served first. A radiologist waiting on a question goes first, then
# STAT studies, then routine ones.
CHAT_PRIORITY = 0


def make_celery(settings: Settings) -> Celery:
    """The Celery application on the configured Redis; ValueError without a broker (``serve`` needs none)."""
    if not settings.broker_url:
        raise ValueError("broker_url is not set: Celery needs Redis (serve runs analyses in-process instead)")
    app = Celery("radvlm", broker=settings.broker_url, backend=settings.broker_url)
    policy = settings.worker
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_time_limit=policy.task_time_limit_s, task_soft_time_limit=policy.task_time_limit_s * 0.9,
        task_routes={ANALYSE_TASK: {"queue": GPU_QUEUE}, CHAT_TASK: {"queue": GPU_QUEUE},
                     DELIVER_TASK: {"queue": IO_QUEUE}},
        task_default_priority=ROUTINE_PRIORITY,
        broker_transport_options={
            "visibility_timeout": policy.visibility_timeout_s,
            # look for tasks of dead workers every few seconds (kombu's default is ~100 s)
            "unacked_restore_interval": max(1, min(10, int(policy.visibility_timeout_s / 5))),
            "unacked_restore_throttle": 1,
            "priority_steps": list(range(10)), "sep": ":", "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
    )
    app.radvlm_settings = settings  # read by worker.tasks to build the process's context once
    return app


def send_analysis(app: Celery, study_id: int, version: int, priority: int) -> None:
    """One gpu-queue message for a study version, at the study's priority (STAT first)."""
    app.send_task(ANALYSE_TASK, args=[study_id, version], queue=GPU_QUEUE, priority=priority)


def send_deliveries(app: Celery, items: list[int]) -> None:
    """One io-queue message per outbox item (the rows are committed before this is called)."""
    for item in items:
        app.send_task(DELIVER_TASK, args=[item], queue=IO_QUEUE)

"""Turning a "study ready" event into work: a Celery message (production) or an in-process run."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from records.clock import Clock, utcnow
from records.periodic import Periodic, log_failure
from records.tables import Study, StudyState, StudyVersion
from worker.app import send_analysis
from worker.attempts import attempt, deliver_once
from worker.context import WorkerContext
from worker.delivery.outbox import due_items
from worker.model_thread import ModelThread

log = logging.getLogger(__name__)


def study_priority(sessions: sessionmaker[Session], study_id: int) -> int:
    """The priority the node recorded on the study at completion, from its headers (``worker.stat_rules``):
    no file is read again to queue it."""
    with sessions() as session:
        return session.get_one(Study, study_id).priority


class CeleryDispatcher:
    """The node's ``on_ready`` in production: one analysis message on the gpu queue, by priority."""

    def __init__(self, app, sessions: sessionmaker[Session]) -> None:  # type: ignore[no-untyped-def]
        self.app, self.sessions = app, sessions

    def __call__(self, study_id: int, version: int) -> None:
        priority = study_priority(self.sessions, study_id)
        send_analysis(self.app, study_id, version, priority)
        log.info("study %d version %d queued for analysis (priority %d)", study_id, version, priority)


class OutboxLoop:
    """``serve``'s deliverer: one thread that sends every due outbox item, then waits for new items
    or the next poll. Items wait in the database, not in threads, so none starves another, and a
    restart simply finds them again."""

    def __init__(self, ctx: WorkerContext, poll_s: float = 1.0) -> None:
        self.ctx, self.poll_s = ctx, poll_s
        self._closed = threading.Event()
        self._loop = Periodic("outbox", poll_s, self._pass, on_error=self._failed, stop_event=self._closed)

    def _pass(self) -> None:
        with self.ctx.sessions() as session:
            due = due_items(session, utcnow())
        for item in due:
            if self._closed.is_set():
                return
            deliver_once(self.ctx, item)

    def _failed(self, exc: Exception) -> None:  # the database may be briefly away; the next pass retries
        log.exception("outbox pass failed")

    def deliver(self, items: list[int]) -> None:
        """New items are in the outbox: the next pass starts now rather than at the next poll."""
        self._loop.wake()

    def start(self) -> None:
        self._loop.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop after the attempt in flight, or leave it after ``timeout`` (a destination may take its
        whole network timeout); pending items stay in the outbox for the next start, and an item left
        in flight keeps its lease until then, so it is sent again rather than lost."""
        if not self._loop.stop(timeout):
            log.warning("outbox: a delivery attempt still in flight is left; it is retried after its lease")


class OutboxSweep:
    """An io worker's safety net: every ``interval_s``, when the io queue holds no message (``backlog``),
    it queues again the pending items overdue by more than ``grace_s``: their message was lost by the
    broker or never taken. The first pass, at start, queues every due item. Deliveries are idempotent (a
    lease per attempt, nothing sent once settled), so a message that was only late costs one no-op; a
    queue still draining is left alone, so a long backlog is never multiplied."""

    def __init__(self, sessions: sessionmaker[Session], send: Callable[[list[int]], None], *, interval_s: float,
                 grace_s: float, clock: Clock, backlog: Callable[[], int] = lambda: 0) -> None:
        self.sessions, self.send, self.interval_s, self.grace_s, self.clock = sessions, send, interval_s, grace_s, clock
        self.backlog = backlog
        self._grace = 0.0  # the first pass, at start, queues every due item
        # the database or the broker away: the next pass tries again
        self._loop = Periodic("outbox-sweep", interval_s, self._pass,
                              on_error=log_failure("outbox sweep", interval_s, log))

    def run_once(self, grace_s: float) -> list[int]:
        if self.backlog():
            return []
        with self.sessions() as session:
            items = due_items(session, self.clock() - timedelta(seconds=grace_s))
        if items:
            self.send(items)
            log.info("outbox sweep queued %d overdue item(s)", len(items))
        return items

    def _pass(self) -> None:
        self.run_once(self._grace)
        self._grace = self.grace_s

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()


def unfinished_analyses(sessions: sessionmaker[Session]) -> list[tuple[int, int, int]]:
    """(study, version, priority) of each current ready version that was handed over but not analysed:
    a stop dropped it from the model thread's queue, or left its job running. Versions not yet handed
    over are the completion monitor's to send."""
    query = (select(StudyVersion.study_id, StudyVersion.version, Study.priority)
             .join(Study, Study.id == StudyVersion.study_id)
             .where(StudyVersion.outcome == StudyState.ready, StudyVersion.dispatched_at.is_not(None),
                    StudyVersion.version == Study.version,
                    Study.state.in_((StudyState.ready, StudyState.analysing)))
             .order_by(StudyVersion.id))
    with sessions() as session:
        return [(study_id, version, priority) for study_id, version, priority in session.execute(query)]


class InProcessRunner:
    """``serve``'s ``on_ready``: the same attempt as the Celery task, on the model thread, by the
    study's priority; deliveries go to an ``OutboxLoop``, so a PACS that is down never holds the model."""

    def __init__(self, ctx: WorkerContext, model_thread: ModelThread) -> None:
        self.ctx, self.model_thread = ctx, model_thread
        self._closed = threading.Event()
        self.outbox = OutboxLoop(ctx)
        ctx.deliver = self.outbox.deliver

    def _run(self, study_id: int, version: int) -> None:
        if self._closed.is_set():  # stopping: the next start takes it up again (unfinished_analyses)
            return
        retries = 0
        while (delay := attempt(self.ctx, study_id, version, retries)) is not None:
            if self._closed.wait(delay):
                return
            retries += 1

    def __call__(self, study_id: int, version: int) -> None:
        priority = study_priority(self.ctx.sessions, study_id)
        self.model_thread.submit_at(priority, self._run, study_id, version)

    def start(self) -> None:
        """Queue again what a previous run left unfinished, then send what it left in the outbox.

        The job keeps one result per version: a job left ``running`` is claimed again, one done is not redone."""
        unfinished = unfinished_analyses(self.ctx.sessions)
        for study_id, version, priority in unfinished:
            self.model_thread.submit_at(priority, self._run, study_id, version)
        if unfinished:
            log.info("%d analysis(es) left by the previous run queued again", len(unfinished))
        self.outbox.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking up analyses (those queued return at once) and stop the outbox within ``timeout``."""
        self._closed.set()
        self.outbox.close(timeout)

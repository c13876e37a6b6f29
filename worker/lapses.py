"""What a dead GPU worker held, given back within a minute rather than after Redis's visibility timeout.

Redis hands a dead worker's unacknowledged task to another worker only after
``worker.visibility_timeout_s``: an hour by default, since it must exceed the task time limit or a slow
task would run twice. Until then the study would read ``analysing`` and a question ``answering``. Each
GPU worker announces itself every few seconds (worker.presence) and records its name on the job it
claims and the question it answers, so an io worker's sweep can tell a dead holder from a slow one: once
a worker's announcement has been gone for ``worker.lapse_grace_s``, its running analyses go back on the
gpu queue at their study's priority, and its questions fail at once with their reason, published to the
API request waiting on them, as any other chat failure is.

Idempotent: a job is given back only while it is still running under that worker's name, under the same
row locks as ``claim``, so two io workers give it back once; and ``claim``/``finish`` keep one result
however many messages arrive. The dead worker's own message, redelivered after the visibility timeout,
finds the job done (or the question failed) and stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from records.chat_events import Event
from records.clock import Clock
from records.periodic import Periodic, log_failure
from records.tables import Exchange, ExchangeState, Job, JobState, Study, StudyState
from records.text import one_line
from worker.presence import announced

log = logging.getLogger(__name__)

Resend = Callable[[int, int, int], None]  # (study id, version, priority): one analysis message on the gpu queue
PublishTo = Callable[[int, Event], None]  # (exchange id, event): to the API request waiting on the exchange
STOPPED = "the GPU worker answering it stopped"


@dataclass
class GivenBack:
    """What one pass gave back: the jobs queued again and the questions failed."""

    jobs: list[int] = field(default_factory=list)
    exchanges: list[int] = field(default_factory=list)


class LapseSweep:
    """Every ``interval_s``: the GPU workers named on running jobs and answering questions whose Redis
    announcement (``client``: redis.Redis) has been gone for ``grace_s`` are taken for dead, and what they
    held is given back (``resend``, ``publish``). The grace counts from the first pass that missed the
    announcement, which itself lapses a few announcements after the worker's last."""

    def __init__(self, sessions: sessionmaker[Session], client: Any, resend: Resend, publish: PublishTo, *,
                 grace_s: float, interval_s: float, clock: Clock) -> None:
        self.sessions, self.client, self.resend, self.publish = sessions, client, resend, publish
        self.grace, self.interval_s, self.clock = timedelta(seconds=grace_s), interval_s, clock
        self._missing: dict[str, datetime] = {}  # worker name -> first pass that found no announcement
        # the database or Redis away: the next pass tries again
        self._loop = Periodic("lapse-sweep", interval_s, self.run_once,
                              on_error=log_failure("lapse sweep", interval_s, log))

    def _holders(self) -> set[str]:
        with self.sessions() as session:
            jobs = session.scalars(select(Job.worker).distinct()
                                   .where(Job.state == JobState.running, Job.worker.is_not(None)))
            exchanges = session.scalars(select(Exchange.worker).distinct()
                                        .where(Exchange.state == ExchangeState.answering, Exchange.worker.is_not(None)))
            return {*jobs, *exchanges}

    def lapsed(self) -> list[str]:
        """The holders whose announcement has been gone for the grace."""
        now, holders = self.clock(), self._holders()
        self._missing = {name: since for name, since in self._missing.items() if name in holders}
        dead = []
        for name in sorted(holders):
            if announced(self.client, name):
                self._missing.pop(name, None)
            elif now - self._missing.setdefault(name, now) >= self.grace:
                dead.append(name)
        return dead

    def run_once(self) -> GivenBack:
        given = GivenBack()
        for name in self.lapsed():
            with self.sessions() as session:
                held = session.execute(select(Job.id, Job.study_id)
                                       .where(Job.state == JobState.running, Job.worker == name)).all()
            given.jobs += [job_id for job_id, study_id in held if self._requeue(job_id, study_id, name)]
            given.exchanges += self._fail_questions(name)
        return given

    def _requeue(self, job_id: int, study_id: int, name: str) -> bool:
        """Queue the job again if it is still running under ``name``. The message is sent before the
        commit: a send that fails leaves the job running for the next pass; a commit that fails after it
        costs one message that ``claim`` answers."""
        with self.sessions() as session, session.begin():
            study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()  # claim's order
            job = session.get_one(Job, job_id, with_for_update=True)
            if job.state is not JobState.running or job.worker != name:
                return False  # finished, or claimed by another runner, since the query
            job.state = JobState.queued
            if study.version == job.study_version and study.state is StudyState.analysing:
                study.state = StudyState.ready
                study.state_reason = one_line(f"queued again: the GPU worker analysing it stopped ({name})")
            self.resend(study_id, job.study_version, study.priority)
        log.warning("study %d version %d queued again (priority %d): GPU worker %s stopped announcing itself",
                    study_id, job.study_version, study.priority, name)
        return True

    def _fail_questions(self, name: str) -> list[int]:
        """Fail the questions ``name`` was answering, then tell each waiting request (after the commit, so a
        question asked again at once finds the conversation free)."""
        with self.sessions() as session, session.begin():
            exchanges = session.scalars(select(Exchange).where(Exchange.state == ExchangeState.answering,
                                                               Exchange.worker == name).with_for_update()).all()
            for exchange in exchanges:
                exchange.state, exchange.error = ExchangeState.failed, STOPPED
            failed = [exchange.id for exchange in exchanges]
        for exchange_id in failed:
            log.warning("question %d failed: GPU worker %s stopped announcing itself", exchange_id, name)
            try:
                self.publish(exchange_id, {"type": "error", "status": 502, "detail": STOPPED})
            except Exception as exc:  # the request then answers 504 at its timeout; the question reads failed
                log.warning("question %d: the failure could not be published (%s: %s)", exchange_id,
                            type(exc).__name__, exc)
        return failed

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

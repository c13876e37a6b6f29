"""When a study is complete, and the one "study ready" event per completed version.

A study is complete once no instance of it has arrived for the stable age. Everything is in
the database, so a node restarted mid-study picks up where it was: the study completes once
(the (study, version) row is unique), and a ready event not yet taken is sent again.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.selection import is_stat
from dicom_node.selection import select as select_image
from records.clock import Clock
from records.metrics import INSTANCES_SKIPPED, STUDIES_COMPLETED, skip_reason
from records.periodic import Periodic
from records.pixels import DEFAULT_MAX_MEGAPIXELS, PixelError, model_image, size_problem
from records.settings import PriorityRule
from records.storage import InstanceStore
from records.tables import STAT_PRIORITY, Instance, Study, StudyState, StudyVersion
from records.text import one_line

log = logging.getLogger(__name__)

OnReady = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageRules:
    """The node's settings that decide, beside the header rules, whether a received image is analysed, and the
    site's rules for a study that is read first (``worker.stat_rules``), applied to the same header read."""

    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    for_processing: bool = False
    stat_rules: tuple[PriorityRule, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """One received image judged: analysed or not and why, a pixel error found by decoding it once, and
    whether its header makes the study STAT."""

    selected: bool
    reason: str
    pixel_error: str | None = None
    stat: bool = False


def evaluate(store: InstanceStore, relative_path: str, rules: ImageRules = ImageRules()) -> Evaluation:
    """Select from the header; decode a selected image once so a corrupt one is known now.

    An image above the size limit is skipped from its header, before anything is decoded.
    """
    try:
        ds = dcmread(store.path(relative_path))
        choice = select_image(ds, for_processing=rules.for_processing)
    except Exception as exc:  # stored before reception checked every value, or changed on disk since
        return Evaluation(False, "unreadable file", one_line(f"{type(exc).__name__}: {exc}"))
    try:
        stat = is_stat(ds, rules.stat_rules)
    except Exception:  # a priority value that cannot be read: the image is judged all the same, as routine
        log.warning("%s: a STAT rule's attribute cannot be read; taken as routine", relative_path)
        stat = False
    if not choice.selected:
        return Evaluation(False, choice.reason, stat=stat)
    too_large = size_problem(ds, rules.max_megapixels)
    if too_large:
        return Evaluation(False, too_large, stat=stat)
    try:
        model_image(ds, rules.max_megapixels)
    except PixelError as exc:
        return Evaluation(True, choice.reason, str(exc), stat=stat)
    return Evaluation(True, choice.reason, stat=stat)


def _nothing_reason(instances: list[Instance]) -> str:
    reasons = Counter(
        f"pixel error: {i.pixel_error}" if i.pixel_error else "removed after node.keep_images_days"
        if i.removed_at else (i.selection_reason or "unknown")
        for i in instances
    )
    listed = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    return f"no usable frontal chest image ({listed})"


def complete_study(
    sessions: sessionmaker[Session], store: InstanceStore, study_id: int, cutoff: datetime, now: datetime,
    rules: ImageRules = ImageRules(), *, stop: threading.Event | None = None,
) -> StudyVersion | None:
    """Complete ``study_id`` if it has been quiet since ``cutoff``; None if it was not (or is done).

    Once ``stop`` is set it returns None between two files, with nothing written: a study of many
    files must not hold up a shutdown, and the next start evaluates it again from the start.
    """
    with sessions() as session:
        pending = session.execute(
            select(Instance.id, Instance.path).where(Instance.study_id == study_id, Instance.selected.is_(None))
        ).all()
    # Header reads and decoding happen outside any transaction: they take seconds, not milliseconds.
    evaluations: dict[int, Evaluation] = {}
    for instance_id, path in pending:
        if stop is not None and stop.is_set():
            return None
        evaluations[instance_id] = evaluate(store, path, rules)

    with sessions() as session, session.begin():
        study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
        if study is None or study.state is not StudyState.receiving or study.last_received_at > cutoff:
            return None
        for instance in study.instances:
            if instance.id in evaluations:
                result = evaluations[instance.id]
                instance.selected, instance.selection_reason, instance.pixel_error = (
                    result.selected, result.reason, result.pixel_error)
        unevaluated = [i for i in study.instances if i.selected is None]
        if unevaluated:  # arrived between the two phases; the next pass completes the study
            return None
        if any(result.stat for result in evaluations.values()):  # once STAT, a study stays STAT
            study.priority = STAT_PRIORITY
        usable = [i for i in study.instances if i.usable]
        outcome = StudyState.ready if usable else StudyState.nothing_to_analyse
        reason = (f"{len(usable)} frontal chest image(s) to analyse" if usable
                  else _nothing_reason(study.instances))
        version = StudyVersion(
            study_id=study.id, version=study.version, completed_at=now, outcome=outcome, reason=reason,
            instance_count=len(study.instances), selected_count=len(usable),
        )
        session.add(version)
        study.state, study.state_reason = outcome, reason
        session.flush()
        skipped = [skip_reason(i.selection_reason, i.pixel_error) for i in study.instances
                   if i.study_version == study.version and not i.usable]
        log.info("study %s version %d complete: %s", study.study_instance_uid, study.version, reason,
                 extra={"study_uid": study.study_instance_uid, "study_version": study.version})
    STUDIES_COMPLETED.labels(outcome.value).inc()
    for kind in skipped:
        INSTANCES_SKIPPED.labels(kind).inc()
    return version


def stable_study_ids(session: Session, cutoff: datetime) -> list[int]:
    """Studies still receiving that have had nothing new since ``cutoff``, the longest quiet first."""
    query = select(Study.id).where(Study.state == StudyState.receiving, Study.last_received_at <= cutoff)
    return list(session.scalars(query.order_by(Study.last_received_at)))


def dispatch_ready(sessions: sessionmaker[Session], on_ready: OnReady, now: datetime, *,
                   stop: threading.Event | None = None) -> int:
    """Hand each ready version not yet taken to ``on_ready``; mark it taken only once that returns.

    Once ``stop`` is set it returns between two versions; the rest stay untaken for the next start.
    """
    with sessions() as session:
        waiting = session.execute(
            select(StudyVersion.id, StudyVersion.study_id, StudyVersion.version)
            .where(StudyVersion.outcome == StudyState.ready, StudyVersion.dispatched_at.is_(None))
            .order_by(StudyVersion.id)
        ).all()
    sent = 0
    for version_id, study_id, version in waiting:
        if stop is not None and stop.is_set():
            break
        try:
            on_ready(study_id, version)
        except Exception:
            log.exception("study ready event for study %d version %d not taken; will retry", study_id, version)
            continue
        with sessions() as session, session.begin():
            session.get_one(StudyVersion, version_id).dispatched_at = now
        sent += 1
    return sent


class CompletionMonitor:
    """A thread that completes quiet studies and dispatches their ready events."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        *,
        stable_age: timedelta,
        poll_interval: float,
        on_ready: OnReady,
        clock: Clock,
        rules: ImageRules = ImageRules(),
    ) -> None:
        self.sessions, self.store, self.stable_age = sessions, store, stable_age
        self.poll_interval, self.on_ready, self.clock, self.rules = poll_interval, on_ready, clock, rules
        self._stop = threading.Event()
        self._loop = Periodic("completion-monitor", poll_interval, self.run_once, first_now=False,
                              on_error=self._failed, stop_event=self._stop)

    def run_once(self) -> list[StudyVersion]:
        """One pass; after ``stop`` it ends between two studies (or files), leaving the rest for the next start."""
        now = self.clock()
        cutoff = now - self.stable_age
        with self.sessions() as session:
            candidates = stable_study_ids(session, cutoff)
        completed = []
        for sid in candidates:
            if self._stop.is_set():
                return completed
            version = complete_study(self.sessions, self.store, sid, cutoff, now, self.rules, stop=self._stop)
            if version is not None:
                completed.append(version)
        dispatch_ready(self.sessions, self.on_ready, now, stop=self._stop)
        return completed

    def _failed(self, exc: Exception) -> None:  # the database may be briefly away; the next pass retries
        log.exception("completion pass failed; retrying in %.1f s", self.poll_interval)

    def start(self) -> None:
        """The first pass one interval after this, then one every interval."""
        self._loop.start()

    def stop(self) -> None:
        """End the pass in progress between two studies (or files), and wait for it."""
        self._loop.stop()

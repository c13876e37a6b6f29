"""How long received images are kept: the node is not an archive (the PACS holds the images), so a
study's files go once it is finished and has been quiet for ``node.keep_images_days``; the disk does
not fill with copies, and patient images are not kept longer than the work needs.

Only the files go. The rows (instances, versions, results, conversations, sign-offs, audit) stay,
each instance marked with when its file was removed, so the study list, its history and the
results served by DICOMweb are unchanged; what needs the pixels (the image on the radiologist's
page, chat, sign-off, reanalysis) says that they were removed. A study that receives a new image
afterwards is analysed again with what it has on disk.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from records.audit import PROCESS_USER, process_host, record
from records.clock import Clock
from records.metrics import IMAGES_REMOVED
from records.periodic import Periodic
from records.storage import InstanceStore
from records.tables import Instance, Study, StudyState

log = logging.getLogger(__name__)

# no analysis, question or sign-off of the current version is waiting for these studies' pixels
FINISHED = (StudyState.analysed, StudyState.signed_off, StudyState.nothing_to_analyse, StudyState.failed)


def remove_old_images(sessions: sessionmaker[Session], store: InstanceStore, keep: timedelta, now: datetime, *,
                      stop: threading.Event | None = None) -> int:
    """Remove the files of every finished study that has received nothing for ``keep``; the count removed.
    Once ``stop`` is set it returns between two studies: the next pass finds the rest."""
    cutoff = now - keep
    on_disk = exists().where(Instance.study_id == Study.id, Instance.removed_at.is_(None))
    with sessions() as session:
        study_ids = session.scalars(select(Study.id).where(Study.state.in_(FINISHED), Study.last_received_at < cutoff,
                                                           on_disk).order_by(Study.id)).all()
    count = 0
    for study_id in study_ids:
        if stop is not None and stop.is_set():
            break
        with sessions() as session, session.begin():
            # the study's row lock: an instance arriving now waits, and then reopens the study
            study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
            if study is None or study.state not in FINISHED or study.last_received_at >= cutoff:
                continue
            removing = [instance for instance in study.instances if instance.removed_at is None]
            freed = 0
            for instance in removing:
                freed += store.remove(instance.path)
                instance.removed_at = now
            count += len(removing)
            days = keep / timedelta(days=1)
            what = f"{len(removing)} file(s), {freed / 1e6:.1f} MB, removed after {days:g} quiet days"
            record(session, "remove_images", at=now, user=PROCESS_USER, role="retention", client=process_host(),
                   study_uid=study.study_instance_uid, detail=what)
            log.info("study %s: %s", study.study_instance_uid, what, extra={"study_uid": study.study_instance_uid})
    IMAGES_REMOVED.inc(count)
    return count


class RetentionSweep:
    """A thread that removes old images at start and then every ``interval``."""

    def __init__(self, sessions: sessionmaker[Session], store: InstanceStore, *, keep: timedelta,
                 interval: timedelta, clock: Clock) -> None:
        self.sessions, self.store, self.keep, self.interval, self.clock = sessions, store, keep, interval, clock
        self._stop = threading.Event()
        self._loop = Periodic("retention", interval, self._sweep, on_error=self._failed, stop_event=self._stop)

    def _sweep(self) -> None:
        remove_old_images(self.sessions, self.store, self.keep, self.clock(), stop=self._stop)

    def _failed(self, exc: Exception) -> None:  # the database may be briefly away; the next pass catches up
        log.exception("removing old images failed; trying again in %s", self.interval)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """End the sweep in progress between two studies, and wait for it."""
        self._loop.stop()

"""A node started in-process, what a worker holds over it, and RG1's study in its database."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.server import Node
from records.settings import Settings
from records.storage import InstanceStore
from records.tables import Study
from testbed.radiographs import RG1_STUDY


@dataclass
class RunningNode:
    """A node started in-process on a free port, with the ready events it emitted."""

    node: Node
    sessions: sessionmaker[Session]
    store: InstanceStore
    url: str
    ready: list[tuple[int, int]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.node.port


@dataclass
class AnalysedNode:
    """A node that received RG1 (chest, analysed by the scripted model) and RG3 (tibia, not analysable),
    and the model thread and runner that analysed it, still running (its outbox loop delivers)."""

    running: RunningNode
    runner: object
    model_thread: object


def worker_context(running: RunningNode, backend, outputs=None, **settings):  # type: ignore[no-untyped-def]
    """What a worker holds, over the running node's database and storage, with ``backend``."""
    from results.outbox import Routing
    from worker.context import WorkerContext
    from worker.pipeline import AnalysisOptions

    return WorkerContext(settings=Settings(**settings), sessions=running.sessions, store=running.store,
                         options=AnalysisOptions(max_new_tokens=64), outputs=outputs or Routing(), _backend=backend)


def rg1_study(sessions) -> Study | None:  # type: ignore[no-untyped-def]
    """RG1's study in the database ``sessions`` open, if it is there."""
    with sessions() as session:
        return session.scalar(select(Study).where(Study.study_instance_uid == RG1_STUDY))

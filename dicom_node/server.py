"""The node's Application Entity: what it accepts, from whom, and the completion monitor beside it."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.completion import CompletionMonitor, OnReady
from dicom_node.handlers import (
    Receiver,
    handle_accepted,
    handle_echo,
    handle_rejected,
    handle_requested,
    handle_store,
)
from dicom_node.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.storage import InstanceStore
from records.metrics import ASSOCIATIONS_ACTIVE
from records.settings import NodeSettings

log = logging.getLogger(__name__)


def build_ae(node: NodeSettings) -> AE:
    """An AE accepting Verification and projection radiography storage in every decodable syntax."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class Node:
    """The DICOM node: the association server plus the completion monitor, started and stopped together."""

    def __init__(
        self,
        node: NodeSettings,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        *,
        on_ready: OnReady,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = node
        self.ae = build_ae(node)
        self.syncer = ThreadPoolExecutor(max_workers=node.max_associations, thread_name_prefix="fsync")
        self.receiver = Receiver(store=store, sessions=sessions, reserve_bytes=node.disk_reserve_mb << 20,
                                 clock=clock, syncer=self.syncer)
        self.monitor = CompletionMonitor(
            sessions, store, stable_age=timedelta(seconds=node.stable_age_s),
            poll_interval=node.completion_poll_s, on_ready=on_ready, clock=clock,
        )
        self.server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("node not started")
        return int(self.server.server_address[1])

    def start(self) -> None:
        if not self.settings.allowed_callers:
            log.warning("no allowed_callers configured: any calling AE title is accepted")
        # pynetdicom writes each incoming dataset to a temporary file as its fragments arrive;
        # the handler moves that file into storage (see handlers.handle_store).
        _config.STORE_RECV_CHUNKED_DATASET = True
        if not self.receiver.store.same_device_as(Path(tempfile.gettempdir())):
            log.warning("TMPDIR %s is not on the storage file system: every received file is copied "
                        "once more; set TMPDIR to a folder beside %s", tempfile.gettempdir(),
                        self.receiver.store.root)
        handlers = [
            (evt.EVT_C_STORE, handle_store, [self.receiver]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_REQUESTED, handle_requested, [self.settings.allowed_callers]),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected),
        ]
        ASSOCIATIONS_ACTIVE.set_function(lambda: sum(a.is_acceptor for a in self.ae.active_associations))
        self.server = self.ae.start_server(
            (self.settings.bind_address, self.settings.port), block=False, evt_handlers=handlers
        )
        log.info("DICOM node %s listening on %s:%d", self.settings.ae_title, self.settings.bind_address, self.port)
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.syncer.shutdown(wait=True)

"""The node's Application Entity: what it accepts, from whom, and the completion monitor and
retention sweep beside it."""

from __future__ import annotations

import logging
import ssl
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import spool
from dicom_node.completion import CompletionMonitor, ImageRules, OnReady
from dicom_node.handlers import (
    Transfers,
    handle_accepted,
    handle_closed,
    handle_echo,
    handle_rejected,
    handle_requested,
    handle_store,
)
from dicom_node.retention import RetentionSweep
from dicom_node.transport import serve
from reception.receiver import Receiver, inflated_limit
from reception.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from records.clock import Clock
from records.metrics import ASSOCIATIONS_ACTIVE
from records.settings import NodeSettings, NodeTLS, PriorityRule
from records.storage import InstanceStore

log = logging.getLogger(__name__)

INCOMING = ".incoming"  # under the storage root: datasets being received
LEFTOVER_AGE = timedelta(hours=1)  # a file there untouched this long was left by a stopped node
RETENTION_SWEEP = timedelta(hours=1)  # how often studies past node.keep_images_days lose their files


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


class _HandshakeInAssociationThread(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its accept loop, where a handshake would let one silent
    or failing client stall every other caller and leave no trace: here the handshake is left to the
    association's own thread (its first read), which logs a failure, and that socket gets a timeout."""

    timeout_s: float | None = None

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,  # type: ignore[no-untyped-def,override]
                    suppress_ragged_eofs=True, server_hostname=None, session=None):
        sock.settimeout(self.timeout_s)
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


def server_tls_context(tls: NodeTLS, timeout_s: float | None) -> ssl.SSLContext:
    """TLS 1.2 or later (BCP 195); a client certificate is checked against the CA bundle when one is
    given, and required when the settings say so."""
    context = _HandshakeInAssociationThread(ssl.PROTOCOL_TLS_SERVER)
    context.timeout_s = timeout_s
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


class Node:
    """The DICOM node: the association server plus the completion monitor, started and stopped together.

    ``stat_rules``: the header rules that put a study first (``worker.stat_rules``), judged at completion from
    the header read there."""

    def __init__(
        self,
        node: NodeSettings,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        *,
        on_ready: OnReady,
        clock: Clock,
        stat_rules: Sequence[PriorityRule] = (),
    ) -> None:
        self.settings = node
        self.ae = build_ae(node)
        self.syncer = ThreadPoolExecutor(max_workers=node.max_associations, thread_name_prefix="fsync")
        self.receiver = Receiver(store=store, sessions=sessions, reserve_bytes=node.disk_reserve_mb << 20,
                                 clock=clock, syncer=self.syncer,
                                 max_inflated_bytes=inflated_limit(node.max_image_megapixels))
        self.transfers = Transfers()
        self.monitor = CompletionMonitor(
            sessions, store, stable_age=timedelta(seconds=node.stable_age_s),
            poll_interval=node.completion_poll_s, on_ready=on_ready, clock=clock,
            rules=ImageRules(max_megapixels=node.max_image_megapixels, for_processing=node.analyse_for_processing,
                             stat_rules=tuple(stat_rules)),
        )
        self.retention = None if not node.keep_images_days else RetentionSweep(
            sessions, store, keep=timedelta(days=node.keep_images_days), interval=RETENTION_SWEEP, clock=clock)
        self.servers: dict[str, ThreadedAssociationServer] = {}

    @property
    def port(self) -> int:
        """The plain listener's port."""
        return self._port("plain")

    @property
    def tls_port(self) -> int:
        return self._port("tls")

    def _port(self, listener: str) -> int:
        if listener not in self.servers:
            raise RuntimeError(f"node has no {listener} listener running")
        return int(self.servers[listener].server_address[1])

    def start(self) -> None:
        if not self.settings.allowed_callers:
            log.warning("no allowed_callers configured: any calling AE title is accepted")
        # pynetdicom writes each incoming dataset to a temporary file as its fragments arrive (on a
        # thread of the spool's); the handler moves that file into storage (see handlers.handle_store).
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's logger is kept at WARNING (records.logs): its standard event handlers would
        # still format a debug line for every PDU, under the association's lock, for no reader
        _config.LOG_HANDLER_LEVEL = "none"
        store = self.receiver.store
        spooled = spool.install(store.root / INCOMING, writeback=store.fsync)
        spool.remove_leftovers(store.root / INCOMING, LEFTOVER_AGE, self.receiver.clock())
        if not spooled and not store.same_device_as(Path(tempfile.gettempdir())):
            log.warning("TMPDIR %s is not on the storage file system: every received file is copied "
                        "once more; set TMPDIR to a folder beside %s", tempfile.gettempdir(), store.root)
        handlers = [
            (evt.EVT_C_STORE, handle_store, [self.receiver, self.transfers]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_REQUESTED, handle_requested, [self.settings.allowed_callers, self.receiver]),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected, [self.receiver]),
            (evt.EVT_CONN_CLOSE, handle_closed, [self.receiver, self.transfers]),
        ]
        ASSOCIATIONS_ACTIVE.set_function(lambda: sum(a.is_acceptor for a in self.ae.active_associations))
        tls = self.settings.tls
        listeners: dict[str, tuple[int, ssl.SSLContext | None]] = {}
        if tls is None or tls.plain_listener:
            listeners["plain"] = (self.settings.port, None)
        if tls is not None:
            listeners["tls"] = (tls.port, server_tls_context(tls, self.settings.network_timeout_s))
        for name, (port, context) in listeners.items():
            self.servers[name] = serve(self.ae, (self.settings.bind_address, port), handlers, context)
            log.info("DICOM node %s listening on %s:%d (%s)", self.settings.ae_title, self.settings.bind_address,
                     self._port(name), name if context is None else
                     f"TLS, client certificate {'required' if tls and tls.require_client_cert else 'optional'}")
        self.monitor.start()
        if self.retention is not None:
            self.retention.start()

    def stop(self) -> None:
        """Stop within seconds: an association still open is aborted (its reader thread would hold the
        process up to network_timeout_s), and the sender sends again what was not confirmed."""
        if self.retention is not None:
            self.retention.stop()
        self.monitor.stop()
        for server in self.servers.values():
            server.shutdown()
        self.servers.clear()
        for assoc in self.ae.active_associations:
            assoc.abort()
        self.syncer.shutdown(wait=True)

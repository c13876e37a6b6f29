"""pynetdicom event handlers: C-STORE through reception (one DICOM status per kind of failure), the
allow-list at association, and the audit of what each association transferred.

Handlers are plain functions; what they need (the receiver, the allow-list, the transfer counts) is
bound when the server registers them.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset

from dicom_node import spool
from reception.receiver import (
    CANNOT_STORE,
    OUT_OF_RESOURCES,
    SUCCESS,
    Caller,
    Receiver,
    Transfers,
    receive,
    refuse,
)
from records.audit import Outcome
from records.logs import log_context
from records.metrics import ASSOCIATIONS
from records.settings import CallerRule

log = logging.getLogger(__name__)


def _status(code: int, reason: str) -> Dataset:
    """A refusal, answered with its comment."""
    rsp = Dataset()
    rsp.Status = code
    # LO: 64 characters, no backslash or control characters (a parser's message may hold any)
    rsp.ErrorComment = "".join(c if c.isprintable() and c != "\\" else " " for c in reason)[:64]
    return rsp


def _peer(event) -> str:  # type: ignore[no-untyped-def]
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def handle_store(event, receiver: Receiver, transfers: Transfers) -> int | Dataset:  # type: ignore[no-untyped-def]
    """C-STORE: pynetdicom has written the dataset to a temporary Part 10 file as its fragments arrived
    (``STORE_RECV_CHUNKED_DATASET``, through ``spool``); reception moves it into storage. Every log line
    of it carries the instance's UID and the caller."""
    request, requestor = event.request, event.assoc.requestor
    caller = Caller(requestor.ae_title, requestor.address)
    with log_context(sop_instance_uid=request.AffectedSOPInstanceUID, calling_ae=requestor.ae_title):
        try:
            spool.finish(event.dataset_path)
        except OSError as exc:
            log.error("refused %s from %s: cannot write: %s", request.AffectedSOPInstanceUID, caller, exc)
            verdict = refuse(OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else CANNOT_STORE, "cannot write the file")
        else:
            verdict = receive(receiver, Path(event.dataset_path), event.context.transfer_syntax, caller,
                              expected=(str(request.AffectedSOPInstanceUID), str(request.AffectedSOPClassUID)))
    transfers.note(event.assoc, verdict.study_uid, stored=verdict.stored)
    return SUCCESS if verdict.stored else _status(verdict.status, verdict.reason)


def handle_echo(event) -> int:  # type: ignore[no-untyped-def]
    """C-ECHO: always success, logged with the caller, so a PACS administrator's test shows in the log."""
    log.info("C-ECHO from %s", _peer(event))
    return SUCCESS


def handle_closed(event, receiver: Receiver, transfers: Transfers) -> None:  # type: ignore[no-untyped-def]
    """The connection closed (released, aborted or dropped): audit what it transferred, study by study."""
    events = transfers.events(event.assoc)
    if events:
        receiver.audit("receive", event.assoc.requestor.ae_title, event.assoc.requestor.address, events)


def handle_requested(event, allowed: Sequence[CallerRule], receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    """A-ASSOCIATE-RQ: reject a caller outside the allow-list (empty list: allow all)."""
    if not allowed:
        return
    # The A-ASSOCIATE-RQ is not negotiated yet: the calling AE title is only in the primitive.
    calling = event.assoc.requestor.primitive.calling_ae_title.strip()
    address = event.assoc.requestor.address
    if any(rule.matches(calling, address) for rule in allowed):
        return
    known_ae = any(rule.ae_title == calling for rule in allowed)
    reason = "host not allowed for this AE title" if known_ae else "calling AE title not allowed"
    log.warning("rejected association from %s@%s: %s", calling, address, reason)
    ASSOCIATIONS.labels("rejected").inc()
    receiver.audit("association_refused", calling, address, [(None, reason, Outcome.minor_failure)])
    # rejected-permanent, by the service user, calling AE title not recognised; then wait for the
    # PDU to leave before the socket closes, as pynetdicom's own rejections do
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)
    event.assoc.kill()


def handle_rejected(event, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    """pynetdicom's own rejections (called AE title not ours, too many associations); it logs why."""
    ASSOCIATIONS.labels("rejected").inc()
    primitive = event.assoc.requestor.primitive
    calling = primitive.calling_ae_title.strip() if primitive is not None else "unknown"
    receiver.audit("association_refused", calling, event.assoc.requestor.address,
                   [(None, "refused by the DICOM layer (called AE title, association limit)", Outcome.minor_failure)])


def handle_accepted(event) -> None:  # type: ignore[no-untyped-def]
    """Count and log an accepted association, with the SOP classes it proposed that the node does not take."""
    assoc = event.assoc
    ASSOCIATIONS.labels("accepted").inc()
    log.info("association from %s accepted: %d context(s)", _peer(event), len(assoc.accepted_contexts))
    unsupported = sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts})
    if unsupported:  # storage SCUs propose every class they know; only these matter here
        log.info("association from %s: SOP classes not supported (rejected): %s", _peer(event),
                 ", ".join(unsupported))

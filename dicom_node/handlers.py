"""pynetdicom event handlers: one DICOM status per kind of failure, a log line with each.

Handlers are plain functions; what they need (the receiver, the allow-list) is bound when
the server registers them. A C-STORE is answered with success only once the file is on
disk and its row is committed, so nothing acknowledged can be lost.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.catalog import Arrival, record_arrival
from dicom_node.storage import InstanceStore, valid_uid
from records.audit import Outcome, record
from records.logs import log_context
from records.metrics import ASSOCIATIONS, INSTANCES_RECEIVED, INSTANCES_REJECTED
from records.settings import CallerRule

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_STORE = 0xA701
DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNDECODABLE = 0xC210
MISSING_UID = 0xC211
BAD_PIXEL_DATA = 0xC212
REJECTION_REASONS = {OUT_OF_RESOURCES: "out_of_resources", CANNOT_STORE: "cannot_store",
                     DOES_NOT_MATCH_SOP_CLASS: "uid_mismatch", UNDECODABLE: "undecodable",
                     MISSING_UID: "missing_uid", BAD_PIXEL_DATA: "bad_pixel_data"}

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 64 * 1024  # values larger than this are not read into memory by the handler


class Transfers:
    """What each open association stored and refused, by study, for its audit events when it closes
    (ATNA's "DICOM Instances Transferred": one event per study per association)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, Counter[tuple[str | None, bool]]] = {}

    def note(self, assoc: object, study_uid: str | None, stored: bool) -> None:
        key = (study_uid if study_uid and valid_uid(study_uid) else None, stored)
        with self._lock:
            self._counts.setdefault(id(assoc), Counter())[key] += 1

    def pop(self, assoc: object) -> Counter[tuple[str | None, bool]]:
        with self._lock:
            return self._counts.pop(id(assoc), Counter())


@dataclass
class Receiver:
    """What the handlers need, bound at registration."""

    store: InstanceStore
    sessions: sessionmaker[Session]
    reserve_bytes: int
    clock: Callable[[], datetime]
    syncer: Executor  # runs InstanceStore.sync beside the database transaction
    transfers: Transfers = field(default_factory=Transfers)

    def audit(self, action: str, calling_ae: str, address: str,
              events: list[tuple[str | None, str, Outcome]]) -> None:
        """Write a peer's audit events (study, detail, outcome); a database that is down costs the events,
        with a log line, never the association."""
        try:
            with self.sessions() as session, session.begin():
                for study_uid, detail, outcome in events:
                    record(session, action, at=self.clock(), user=calling_ae, role="calling AE", client=address,
                           study_uid=study_uid, detail=detail, outcome=outcome)
        except SQLAlchemyError as exc:
            log.error("audit events %s of %s@%s not recorded: %s", action, calling_ae, address, exc)


def _status(code: int, reason: str) -> Dataset:
    """A refusal: counted by kind, answered with its comment."""
    INSTANCES_REJECTED.labels(REJECTION_REASONS[code]).inc()
    rsp = Dataset()
    rsp.Status = code
    # LO: 64 characters, no backslash or control characters (a parser's message may hold any)
    rsp.ErrorComment = "".join(c if c.isprintable() and c != "\\" else " " for c in reason)[:64]
    return rsp


def _peer(event) -> str:  # type: ignore[no-untyped-def]
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def encoding_problem(path: Path, syntax: UID) -> str | None:
    """Why the dataset is not in the negotiated syntax, when that can be seen (explicit VR only).

    pydicom reads on past a mismatch (it assumes the writer switched to implicit VR), so bytes
    that are no dataset at all would be parsed into nonsense elements. In explicit VR the first
    element's VR must be two upper-case letters (PS3.5 7.1.2).
    """
    if syntax.is_implicit_VR or syntax.is_deflated:
        return None
    start = 128 + 4 + 12 + int(read_file_meta_info(path).FileMetaInformationGroupLength)
    with path.open("rb") as fh:
        fh.seek(start + 4)
        vr = fh.read(2)
    if len(vr) == 2 and all(0x41 <= b <= 0x5A for b in vr):
        return None
    return f"not encoded as the negotiated {syntax.name}"


def pixel_data_problem(ds: Dataset, file_size: int) -> str | None:
    """Why the pixel data of ``ds`` is unusable as received, or None when it is complete.

    ``ds`` is read with large values deferred: their length is checked against the file's size.
    """
    if "PixelData" not in ds:
        return "no pixel data (absent, or encapsulated data cut short)"
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.length != UNDEFINED_LENGTH:
        if element.value is None:  # deferred: the bytes are in the file from value_tell on
            received = max(0, min(element.length, file_size - element.value_tell))
        else:
            received = len(element.value)
        if received < element.length:
            return f"pixel data truncated: {received} of {element.length} bytes"
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
                        * int(ds.BitsAllocated) + 7) // 8
        except (AttributeError, TypeError, ValueError) as exc:
            return f"image pixel module incomplete: {exc}"
        if received < expected:
            return f"pixel data shorter than the image: {received} of {expected} bytes"
    return None


def header_problem(ds: Dataset) -> str | None:
    """Which attribute cannot be decoded as its VR says (a value of the wrong length or form), if any.

    pydicom decodes a value when it is first used; without this, a bad value would surface later,
    in selection or in the worker, long after the sender was told the instance was stored. Large
    values left in the file (deferred) and the pixel data are not read here.
    """
    for tag in list(ds.keys()):
        element = ds.get_item(tag, keep_deferred=True)
        if tag == PIXEL_DATA or (isinstance(element, RawDataElement) and element.value is None):
            continue
        try:
            decoded = ds[tag]
        except Exception as exc:
            return f"{tag} cannot be decoded: {type(exc).__name__}"
        if decoded.VR == "SQ":
            for item in decoded.value:
                problem = header_problem(item)
                if problem:
                    return problem
    return None


def handle_store(event, receiver: Receiver) -> int | Dataset:  # type: ignore[no-untyped-def]
    """C-STORE: every log line of it carries the instance's UID and the caller."""
    with log_context(sop_instance_uid=event.request.AffectedSOPInstanceUID,
                     calling_ae=event.assoc.requestor.ae_title):
        status, study_uid = _store(event, receiver)
    receiver.transfers.note(event.assoc, study_uid, stored=status == SUCCESS)
    return status


def _store(event, receiver: Receiver) -> tuple[int | Dataset, str | None]:  # type: ignore[no-untyped-def]
    """C-STORE: check space, read the header, keep the file as received, record the arrival.

    pynetdicom has written the dataset to a temporary Part 10 file as its fragments arrived
    (``STORE_RECV_CHUNKED_DATASET``); the handler reads the header from it and moves it into
    storage, so the pixel data is never copied in memory. Returns the status and the study, once known.
    """
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    peer = _peer(event)

    free = receiver.store.free_bytes()
    if free < receiver.reserve_bytes:
        log.error("refused %s from %s: %d MiB free, reserve is %d MiB", sop_uid, peer,
                  free >> 20, receiver.reserve_bytes >> 20)
        return _status(OUT_OF_RESOURCES, "disk space below the reserve"), None

    incoming = Path(event.dataset_path)
    syntax = event.context.transfer_syntax
    ds = None
    try:
        problem = encoding_problem(incoming, syntax)
        if problem is None:
            ds = dcmread(incoming, defer_size=DEFER_BYTES)
            problem = header_problem(ds)
    except Exception as exc:  # any parse failure: the bytes are not a dataset we can read
        problem = f"{type(exc).__name__}: {exc}"
    if problem or ds is None:
        log.error("refused %s from %s: cannot decode the dataset: %s", sop_uid, peer, problem)
        return _status(UNDECODABLE, f"cannot decode dataset: {problem}"), None
    try:
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        ds_sop_uid, ds_class_uid = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
        header = {k: (str(ds[k].value) if k in ds and ds[k].value not in (None, "") else None)
                  for k in ("PatientID", "PatientName", "AccessionNumber", "StudyDate")}
        problem = pixel_data_problem(ds, incoming.stat().st_size)
    except Exception as exc:  # the values checked above decode; anything else here is still a bad dataset
        log.error("refused %s from %s: cannot decode the dataset: %s: %s", sop_uid, peer, type(exc).__name__, exc)
        return _status(UNDECODABLE, f"cannot decode dataset: {type(exc).__name__}"), None

    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                      ("SOPInstanceUID", ds_sop_uid)):
        if not valid_uid(uid):
            log.error("refused %s from %s: %s missing or invalid (%r)", sop_uid, peer, name, uid[:80])
            return _status(MISSING_UID, f"{name} missing or invalid"), study_uid
    if ds_sop_uid != sop_uid or ds_class_uid != str(event.request.AffectedSOPClassUID):
        log.error("refused %s from %s: dataset UIDs (%s, %s) differ from the request's", sop_uid, peer,
                  ds_sop_uid, ds_class_uid)
        return _status(DOES_NOT_MATCH_SOP_CLASS, "SOP UIDs differ from the C-STORE request"), study_uid
    if problem:
        log.error("refused %s from %s: %s", sop_uid, peer, problem)
        return _status(BAD_PIXEL_DATA, problem), study_uid

    try:
        relative = receiver.store.relative_path(study_uid, series_uid, sop_uid)
        size = incoming.stat().st_size
    except (OSError, ValueError) as exc:
        log.error("refused %s from %s: cannot store: %s", sop_uid, peer, exc)
        return _status(CANNOT_STORE, "cannot store the file"), study_uid
    arrival = Arrival(
        study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
        sop_class_uid=ds_class_uid, transfer_syntax_uid=str(syntax),
        path=relative, size_bytes=size, calling_ae=event.assoc.requestor.ae_title,
        calling_host=event.assoc.requestor.address,
        patient_id=header["PatientID"], patient_name=header["PatientName"],
        accession_number=header["AccessionNumber"], study_date=header["StudyDate"],
    )
    # The file is forced to disk while the database does its part; the row is committed only
    # once the file is durable and in place, and success is answered only after the commit.
    synced = receiver.syncer.submit(receiver.store.sync, incoming)
    try:
        with receiver.sessions() as session, session.begin():
            study, new = record_arrival(session, arrival, receiver.clock())
            version = study.version
            if new:
                synced.result()
                receiver.store.place(incoming, relative)
    except IntegrityError:  # the same instance committed by a concurrent association
        log.info("duplicate %s from %s: stored concurrently, first copy kept", sop_uid, peer)
        INSTANCES_RECEIVED.labels("duplicate").inc()
        return SUCCESS, study_uid
    except OSError as exc:
        log.error("refused %s from %s: cannot write: %s", sop_uid, peer, exc)
        return _status(CANNOT_STORE, "cannot write the file"), study_uid
    except SQLAlchemyError as exc:
        log.error("refused %s from %s: database unavailable: %s", sop_uid, peer, exc)
        return _status(CANNOT_STORE, "database unavailable"), study_uid
    finally:
        wait([synced])  # never leave a sync running on a file pynetdicom is about to delete
    if new:
        log.debug("stored %s (study %s version %d) from %s", sop_uid, study_uid, version, peer,
                  extra={"study_uid": study_uid})
    else:
        log.info("duplicate %s from %s: already stored, first copy kept", sop_uid, peer, extra={"study_uid": study_uid})
    INSTANCES_RECEIVED.labels("stored" if new else "duplicate").inc()
    return SUCCESS, study_uid


def handle_echo(event) -> int:  # type: ignore[no-untyped-def]
    log.info("C-ECHO from %s", _peer(event))
    return SUCCESS


def handle_closed(event, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    """The connection closed (released, aborted or dropped): audit what it transferred, study by study."""
    counts = receiver.transfers.pop(event.assoc)
    events = []
    for study_uid in dict.fromkeys(study for study, _ in counts):
        stored, refused = counts[(study_uid, True)], counts[(study_uid, False)]
        outcome = Outcome.success if not refused else Outcome.minor_failure if stored else Outcome.serious_failure
        events.append((study_uid, f"{stored} instance(s) stored, {refused} refused", outcome))
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
    assoc = event.assoc
    ASSOCIATIONS.labels("accepted").inc()
    log.info("association from %s accepted: %d context(s)", _peer(event), len(assoc.accepted_contexts))
    unsupported = sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts})
    if unsupported:  # storage SCUs propose every class they know; only these matter here
        log.info("association from %s: SOP classes not supported (rejected): %s", _peer(event),
                 ", ".join(unsupported))

"""Reception, whatever the transport (C-STORE or STOW-RS): read the header of a received Part 10
file, check it, move the file into storage and record the arrival, with one status per kind of
failure and a log line with each. Success is answered only once the file is durable and its row is
committed, so nothing acknowledged can be lost.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import Counter
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from reception.catalog import Arrival, record_arrival
from records.audit import Outcome, record
from records.clock import Clock
from records.db import error_summary
from records.metrics import INSTANCES_RECEIVED, INSTANCES_REJECTED
from records.pixels import DEFAULT_MAX_MEGAPIXELS
from records.storage import InstanceStore, valid_uid
from records.text import one_line

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_STORE = 0xA701
DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNDECODABLE = 0xC210
MISSING_UID = 0xC211
BAD_PIXEL_DATA = 0xC212
SOP_CLASS_NOT_SUPPORTED = 0x0122  # STOW-RS (PS3.18 table 10.5.3-2); C-STORE refuses at association
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
REJECTION_REASONS = {OUT_OF_RESOURCES: "out_of_resources", CANNOT_STORE: "cannot_store",
                     DOES_NOT_MATCH_SOP_CLASS: "uid_mismatch", UNDECODABLE: "undecodable",
                     MISSING_UID: "missing_uid", BAD_PIXEL_DATA: "bad_pixel_data",
                     SOP_CLASS_NOT_SUPPORTED: "sop_class_not_supported",
                     TRANSFER_SYNTAX_NOT_SUPPORTED: "transfer_syntax_not_supported"}

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 64 * 1024  # values larger than this are not read into memory by the handler


def inflated_limit(max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> int:
    """A deflated dataset is inflated in memory to be read: at most the largest image the node decodes (at 16
    bits) and a header."""
    return int(max_megapixels * 2e6) + (64 << 20)


@dataclass(frozen=True)
class Caller:
    """Who sent the instance: a calling AE title and its address (for STOW-RS, the token's AE title)."""

    ae_title: str
    address: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.address}"


@dataclass(frozen=True)
class Verdict:
    """How one received instance ended: ``status`` SUCCESS or a refusal code, with the reason."""

    status: int
    reason: str = ""
    study_uid: str | None = None

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


class Transfers:
    """What each open transfer (an association, a STOW-RS request) stored and refused, by study, for its
    audit events when it ends (ATNA's "DICOM Instances Transferred": one event per study per transfer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, Counter[tuple[str | None, bool]]] = {}

    def note(self, assoc: object, study_uid: str | None, stored: bool) -> None:
        key = (study_uid if study_uid and valid_uid(study_uid) else None, stored)
        with self._lock:
            self._counts.setdefault(id(assoc), Counter())[key] += 1

    def events(self, transfer: object, by: str = "") -> list[tuple[str | None, str, Outcome]]:
        """The audit events of a finished transfer, one per study (detail and outcome); forgets it."""
        with self._lock:
            counts = self._counts.pop(id(transfer), Counter())
        events = []
        for study_uid in dict.fromkeys(study for study, _ in counts):
            stored, refused = counts[(study_uid, True)], counts[(study_uid, False)]
            outcome = Outcome.success if not refused else Outcome.minor_failure if stored else Outcome.serious_failure
            events.append((study_uid, f"{by}{stored} instance(s) stored, {refused} refused", outcome))
        return events


def refuse(code: int, reason: str, study_uid: str | None = None) -> Verdict:
    """The refusal ``code`` (a failure status of ``REJECTION_REASONS``) with its reason, counted in the rejection metric
    under that status's name."""
    INSTANCES_REJECTED.labels(REJECTION_REASONS[code]).inc()
    return Verdict(code, reason, study_uid)


@dataclass
class Receiver:
    """What reception needs: storage, database, disk reserve, clock; shared by the node and the API."""

    store: InstanceStore
    sessions: sessionmaker[Session]
    reserve_bytes: int
    clock: Clock
    syncer: Executor  # runs InstanceStore.sync beside the database transaction
    max_inflated_bytes: int = field(default_factory=inflated_limit)

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
            log.error("audit events %s of %s@%s not recorded: %s", action, calling_ae, address, error_summary(exc))


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


def inflated_problem(path: Path, limit_bytes: int) -> tuple[int, str] | None:
    """Why a deflated file cannot be read, with its status: it inflates past ``limit_bytes`` (out of resources:
    a few kilobytes of zeros can claim gigabytes), or its stream is broken (undecodable). Inflated in pieces
    and counted, never held whole."""
    start = 128 + 4 + 12 + int(read_file_meta_info(path).FileMetaInformationGroupLength)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with path.open("rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 22))
                if total > limit_bytes:
                    return OUT_OF_RESOURCES, f"deflated data inflates to more than {limit_bytes >> 20} MiB"
                chunk = inflater.unconsumed_tail
    return None if inflater.eof else (UNDECODABLE, "deflated data stream is cut short")


def pixel_data_problem(ds: Dataset, file_size: int) -> str | None:
    """Why the pixel data of ``ds`` is unusable as received, or None when it is complete.

    ``ds`` is read with large values deferred: their length is checked against the file's size. A
    deflated file is read whole (pydicom inflates it in memory), so its values' own lengths count.
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


def _commit_arrival(receiver: Receiver, arrival: Arrival, incoming: Path, synced: Future[None]) -> int | None:
    """Record the arrival and place its file: the study version, or None for a duplicate (nothing
    changed). A new instance's row is committed only once its file is durable and in place.

    Pooled connections are not pinged before use (a round trip per instance, see records.db): when
    the database has dropped the one taken (a restart), the recording fails at its first statement
    and is run once more, on a fresh connection.
    """
    now = receiver.clock()
    with receiver.sessions() as session:
        try:
            version = record_arrival(session, arrival, now)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("database connection lost (%s): recording %s again on a new one", error_summary(exc),
                        arrival.sop_instance_uid)
            session.rollback()
            version = record_arrival(session, arrival, now)
        if version is None:
            return None  # closing the session rolls the study's update back
        synced.result()
        receiver.store.place(incoming, arrival.path)
        session.commit()
        return version


def receive(receiver: Receiver, incoming: Path, syntax: UID, caller: Caller,
            expected: tuple[str, str] | None = None) -> Verdict:
    """Check space, read the header, keep the file as received, record the arrival.

    ``incoming`` is a complete Part 10 file on the storage's file system (pynetdicom writes one as the
    fragments arrive, STOW-RS streams each part to one), in ``syntax``; it is moved into storage, so the
    pixel data is never copied in memory. ``expected``: the (SOP Instance, SOP Class) UIDs the sender
    announced (C-STORE), which the dataset must carry.
    """
    sop_uid = expected[0] if expected else "instance"
    peer = str(caller)

    free = receiver.store.free_bytes()
    if free < receiver.reserve_bytes:
        log.error("refused %s from %s: %d MiB free, reserve is %d MiB", sop_uid, peer,
                  free >> 20, receiver.reserve_bytes >> 20)
        return refuse(OUT_OF_RESOURCES, "disk space below the reserve")

    ds = None
    try:
        problem = encoding_problem(incoming, syntax)
        inflated = inflated_problem(incoming, receiver.max_inflated_bytes) if syntax.is_deflated else None
        if inflated is not None and inflated[0] == OUT_OF_RESOURCES:
            log.error("refused %s from %s: %s", sop_uid, peer, inflated[1])
            return refuse(*inflated)
        problem = problem or (inflated[1] if inflated else None)
        if problem is None:
            # pydicom inflates a deflated file in memory and cannot leave values in it: none is deferred
            ds = dcmread(incoming, defer_size=None if syntax.is_deflated else DEFER_BYTES)
            problem = header_problem(ds)
    except Exception as exc:  # any parse failure: the bytes are not a dataset we can read
        problem = f"{type(exc).__name__}: {exc}"
    if problem or ds is None:
        problem = one_line(problem or "unreadable")
        log.error("refused %s from %s: cannot decode the dataset: %s", sop_uid, peer, problem)
        return refuse(UNDECODABLE, f"cannot decode dataset: {problem}")
    try:
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        ds_sop_uid, ds_class_uid = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
        header = {k: (str(ds[k].value) if k in ds and ds[k].value not in (None, "") else None)
                  for k in ("PatientID", "PatientName", "AccessionNumber", "StudyDate")}
        problem = pixel_data_problem(ds, incoming.stat().st_size)
    except Exception as exc:  # the values checked above decode; anything else here is still a bad dataset
        log.error("refused %s from %s: cannot decode the dataset: %s: %s", sop_uid, peer, type(exc).__name__, exc)
        return refuse(UNDECODABLE, f"cannot decode dataset: {type(exc).__name__}")

    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                      ("SOPInstanceUID", ds_sop_uid)):
        if not valid_uid(uid):
            log.error("refused %s from %s: %s missing or invalid (%r)", sop_uid, peer, name, uid[:80])
            return refuse(MISSING_UID, f"{name} missing or invalid", study_uid)
    if expected is None:
        sop_uid = ds_sop_uid
    elif (ds_sop_uid, ds_class_uid) != expected:
        log.error("refused %s from %s: dataset UIDs (%s, %s) differ from the request's", sop_uid, peer,
                  ds_sop_uid, ds_class_uid)
        return refuse(DOES_NOT_MATCH_SOP_CLASS, "SOP UIDs differ from the request", study_uid)
    if problem:
        log.error("refused %s from %s: %s", sop_uid, peer, problem)
        return refuse(BAD_PIXEL_DATA, problem, study_uid)

    try:
        relative = receiver.store.relative_path(study_uid, series_uid, sop_uid)
        size = incoming.stat().st_size
    except (OSError, ValueError) as exc:
        log.error("refused %s from %s: cannot store: %s", sop_uid, peer, exc)
        return refuse(CANNOT_STORE, "cannot store the file", study_uid)
    arrival = Arrival(
        study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
        sop_class_uid=ds_class_uid, transfer_syntax_uid=str(syntax),
        path=relative, size_bytes=size, calling_ae=caller.ae_title, calling_host=caller.address,
        patient_id=header["PatientID"], patient_name=header["PatientName"],
        accession_number=header["AccessionNumber"], study_date=header["StudyDate"],
    )
    # The file is forced to disk while the database does its part; the row is committed only
    # once the file is durable and in place, and success is answered only after the commit.
    synced = receiver.syncer.submit(receiver.store.sync, incoming)
    try:
        version = _commit_arrival(receiver, arrival, incoming, synced)
    except OSError as exc:
        log.error("refused %s from %s: cannot write: %s", sop_uid, peer, exc)
        return refuse(CANNOT_STORE, "cannot write the file", study_uid)
    except SQLAlchemyError as exc:
        log.error("refused %s from %s: database unavailable: %s", sop_uid, peer, error_summary(exc))
        return refuse(CANNOT_STORE, "database unavailable", study_uid)
    finally:
        wait([synced])  # never leave a sync running on a file pynetdicom is about to delete
    new = version is not None
    if new:
        log.debug("stored %s (study %s version %d) from %s", sop_uid, study_uid, version, peer,
                  extra={"study_uid": study_uid})
    else:
        log.info("duplicate %s from %s: already stored, first copy kept", sop_uid, peer, extra={"study_uid": study_uid})
    INSTANCES_RECEIVED.labels("stored" if new else "duplicate").inc()
    return Verdict(SUCCESS, "", study_uid)

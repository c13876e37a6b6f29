"""pynetdicom event handlers: one DICOM status per kind of failure, a log line with each.

Handlers are plain functions; what they need (the receiver, the allow-list) is bound when
the server registers them. A C-STORE is answered with success only once the file is on
disk and its row is committed, so nothing acknowledged can be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pynetdicom.dsutils import decode
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.catalog import Arrival, is_stored, record_arrival
from dicom_node.storage import InstanceStore, valid_uid
from records.settings import CallerRule

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_STORE = 0xA701
DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNDECODABLE = 0xC210
MISSING_UID = 0xC211
BAD_PIXEL_DATA = 0xC212

UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass
class Receiver:
    """What the C-STORE handler needs, bound at registration."""

    store: InstanceStore
    sessions: sessionmaker[Session]
    reserve_bytes: int
    clock: Callable[[], datetime]


def _status(code: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = reason[:64]
    return rsp


def _peer(event) -> str:  # type: ignore[no-untyped-def]
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def pixel_data_problem(ds: Dataset) -> str | None:
    """Why the pixel data of ``ds`` is unusable as received, or None when it is complete."""
    if "PixelData" not in ds:
        return "no pixel data (absent, or encapsulated data cut short)"
    element = ds.get_item(0x7FE00010)
    if isinstance(element, RawDataElement) and element.length != UNDEFINED_LENGTH:
        received = len(element.value or b"")
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


def handle_store(event, receiver: Receiver) -> int | Dataset:  # type: ignore[no-untyped-def]
    """C-STORE: check space, read the header, keep the bytes as received, record the arrival."""
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    peer = _peer(event)

    free = receiver.store.free_bytes()
    if free < receiver.reserve_bytes:
        log.error("refused %s from %s: %d MiB free, reserve is %d MiB", sop_uid, peer,
                  free >> 20, receiver.reserve_bytes >> 20)
        return _status(OUT_OF_RESOURCES, "disk space below the reserve")

    syntax = event.context.transfer_syntax
    try:
        # decoded here rather than through event.dataset, which overwrites the encoding pydicom found
        ds = decode(event.request.DataSet, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        if ds.original_encoding != (syntax.is_implicit_VR, syntax.is_little_endian):
            raise ValueError(f"not encoded as the negotiated {syntax.name}")
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        ds_sop_uid, ds_class_uid = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
        header = {k: (str(ds[k].value) if k in ds and ds[k].value not in (None, "") else None)
                  for k in ("PatientID", "PatientName", "AccessionNumber", "StudyDate")}
        problem = pixel_data_problem(ds)
    except Exception as exc:  # any parse failure: the bytes are not a dataset we can read
        log.error("refused %s from %s: cannot decode the dataset: %s: %s", sop_uid, peer, type(exc).__name__, exc)
        return _status(UNDECODABLE, f"cannot decode dataset: {type(exc).__name__}")

    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                      ("SOPInstanceUID", ds_sop_uid)):
        if not valid_uid(uid):
            log.error("refused %s from %s: %s missing or invalid (%r)", sop_uid, peer, name, uid[:80])
            return _status(MISSING_UID, f"{name} missing or invalid")
    if ds_sop_uid != sop_uid or ds_class_uid != str(event.request.AffectedSOPClassUID):
        log.error("refused %s from %s: dataset UIDs (%s, %s) differ from the request's", sop_uid, peer,
                  ds_sop_uid, ds_class_uid)
        return _status(DOES_NOT_MATCH_SOP_CLASS, "SOP UIDs differ from the C-STORE request")
    if problem:
        log.error("refused %s from %s: %s", sop_uid, peer, problem)
        return _status(BAD_PIXEL_DATA, problem)

    try:
        with receiver.sessions() as session:
            if is_stored(session, sop_uid):
                log.info("duplicate %s from %s: already stored, first copy kept", sop_uid, peer)
                return SUCCESS
        relative = receiver.store.relative_path(study_uid, series_uid, sop_uid)
        size = receiver.store.write(relative, event.encoded_dataset())
    except OSError as exc:
        log.error("refused %s from %s: cannot write: %s", sop_uid, peer, exc)
        return _status(CANNOT_STORE, "cannot write the file")
    except SQLAlchemyError as exc:
        log.error("refused %s from %s: database unavailable: %s", sop_uid, peer, exc)
        return _status(CANNOT_STORE, "database unavailable")

    arrival = Arrival(
        study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
        sop_class_uid=ds_class_uid, transfer_syntax_uid=str(syntax),
        path=relative, size_bytes=size, calling_ae=event.assoc.requestor.ae_title,
        calling_host=event.assoc.requestor.address,
        patient_id=header["PatientID"], patient_name=header["PatientName"],
        accession_number=header["AccessionNumber"], study_date=header["StudyDate"],
    )
    try:
        with receiver.sessions() as session, session.begin():
            study, new = record_arrival(session, arrival, receiver.clock())
            version = study.version
    except IntegrityError:  # the same instance committed by a concurrent association
        log.info("duplicate %s from %s: stored concurrently, first copy kept", sop_uid, peer)
        return SUCCESS
    except SQLAlchemyError as exc:
        log.error("refused %s from %s: database unavailable: %s", sop_uid, peer, exc)
        return _status(CANNOT_STORE, "database unavailable")
    if new:
        log.debug("stored %s (study %s version %d) from %s", sop_uid, study_uid, version, peer)
    else:
        log.info("duplicate %s from %s: recorded meanwhile, first copy kept", sop_uid, peer)
    return SUCCESS


def handle_echo(event) -> int:  # type: ignore[no-untyped-def]
    log.info("C-ECHO from %s", _peer(event))
    return SUCCESS


def handle_requested(event, allowed: Sequence[CallerRule]) -> None:  # type: ignore[no-untyped-def]
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
    # rejected-permanent, by the service user, calling AE title not recognised; then wait for the
    # PDU to leave before the socket closes, as pynetdicom's own rejections do
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)
    event.assoc.kill()


def handle_accepted(event) -> None:  # type: ignore[no-untyped-def]
    assoc = event.assoc
    log.info("association from %s accepted: %d context(s)", _peer(event), len(assoc.accepted_contexts))
    unsupported = sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts})
    if unsupported:  # storage SCUs propose every class they know; only these matter here
        log.info("association from %s: SOP classes not supported (rejected): %s", _peer(event),
                 ", ".join(unsupported))

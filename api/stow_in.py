"""STOW-RS (PS3.18 10.5): a multipart/related body of DICOM Part 10 files, streamed part by part to files on
the storage's file system and handed to the same reception as C-STORE, one verdict per part.

Nothing is held in memory: each part is written to disk as its bytes arrive and received as soon as it
ends, so an upload of any size costs one part's worth of disk in staging.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.problems import Problem
from reception.receiver import (
    DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    UNDECODABLE,
    Caller,
    Receiver,
    Verdict,
    receive,
    refuse,
)
from reception.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

DICOM = "application/dicom"


@dataclass
class PartResult:
    """One part's verdict, with the UIDs it could be read for (a part that is no DICOM has none)."""

    verdict: Verdict
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


@dataclass
class _Part:
    file: IO[bytes] | None
    path: Path | None
    headers: dict[str, str] = field(default_factory=dict)
    refused: Verdict | None = None


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary, or a problem saying why the body is not STOW-RS (415, 400)."""
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/related":
        raise Problem(415, "unsupported media type", f"STOW-RS takes multipart/related; type=\"{DICOM}\", "
                                                     f"not {content_type or 'no Content-Type'}")
    part_type = options.get(b"type", DICOM.encode()).decode("latin-1")
    if part_type.lower() != DICOM:
        raise Problem(415, "unsupported media type", f"this node stores {DICOM} parts (Part 10 files), not {part_type}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise Problem(400, "no boundary", "the multipart/related Content-Type has no boundary parameter")
    return boundary


def _check(path: Path, study_uid: str | None) -> tuple[UID | None, str, str, Verdict | None]:
    """Read the part's file meta and header: its syntax and UIDs, or the refusal (before reception)."""
    try:
        meta = read_file_meta_info(path)
        syntax = UID(str(meta.TransferSyntaxUID))
        sop_class, sop_uid = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
    except Exception as exc:  # not a Part 10 file
        return None, "", "", refuse(UNDECODABLE, f"not a DICOM Part 10 file: {type(exc).__name__}")
    if sop_class not in STORAGE_SOP_CLASSES:
        return syntax, sop_class, sop_uid, refuse(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} not stored here")
    if syntax not in TRANSFER_SYNTAXES:
        return syntax, sop_class, sop_uid, refuse(TRANSFER_SYNTAX_NOT_SUPPORTED,
                                                   f"transfer syntax {syntax} not supported")
    if study_uid is not None:
        try:
            found = str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        except Exception:
            found = ""
        if found != study_uid:
            return syntax, sop_class, sop_uid, refuse(DOES_NOT_MATCH_SOP_CLASS,
                                                       f"instance of study {found or '?'}, not {study_uid}")
    return syntax, sop_class, sop_uid, None


def receive_part(receiver: Receiver, path: Path, caller: Caller, study_uid: str | None) -> PartResult:
    """One part through reception; the staging file is gone afterwards, whatever became of it."""
    try:
        syntax, sop_class, sop_uid, refusal = _check(path, study_uid)
        if refusal is not None:
            log.error("STOW-RS from %s: refused %s: %s", caller, sop_uid or "a part", refusal.reason)
            return PartResult(refusal, sop_class, sop_uid)
        verdict = receive(receiver, path, syntax, caller, expected=(sop_uid, sop_class))
        return PartResult(verdict, sop_class, sop_uid)
    finally:
        path.unlink(missing_ok=True)


async def store_stream(chunks: AsyncIterator[bytes], boundary: bytes, receiver: Receiver, caller: Caller,
                       study_uid: str | None, staging: Path) -> list[PartResult]:
    """Parse the body as it arrives; each completed part is received before the next bytes are read."""
    staging.mkdir(parents=True, exist_ok=True)
    ended: list[_Part] = []
    current: list[_Part] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        if receiver.store.free_bytes() < receiver.reserve_bytes:  # not even staged
            current.append(_Part(None, None, refused=refuse(OUT_OF_RESOURCES, "disk space below the reserve")))
            return
        fd, name = tempfile.mkstemp(dir=staging, prefix="stow-", suffix=".dcm")
        current.append(_Part(os.fdopen(fd, "wb"), Path(name)))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = current[-1]
        if part.file is not None:
            part.file.write(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        current[-1].headers[header[0].decode("latin-1").lower()] = header[1].decode("latin-1").strip()
        header[0] = header[1] = b""

    def on_part_end() -> None:
        part = current.pop()
        if part.file is not None:
            part.file.close()
        ended.append(part)

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                                        "on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_part_end": on_part_end})
    results: list[PartResult] = []
    try:
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except MultipartParseError as exc:  # what was received before it stays stored
                stored = sum(r.verdict.stored for r in results)
                raise Problem(400, "malformed multipart body", f"{exc}; {stored} instance(s) before it were "
                                                               "stored") from exc
            while ended:
                results.append(await run_in_threadpool(_settle, ended.pop(0), receiver, caller, study_uid))
        parser.finalize()
    finally:
        for part in current + ended:  # a body cut short: what was staged is not kept
            if part.file is not None:
                part.file.close()
            if part.path is not None:
                part.path.unlink(missing_ok=True)
    return results


def _settle(part: _Part, receiver: Receiver, caller: Caller, study_uid: str | None) -> PartResult:
    if part.refused is not None:
        log.error("STOW-RS from %s: refused a part: %s", caller, part.refused.reason)
        return PartResult(part.refused)
    assert part.path is not None
    media = part.headers.get("content-type", DICOM).split(";")[0].strip().lower()
    if media != DICOM:
        part.path.unlink(missing_ok=True)
        log.error("STOW-RS from %s: refused a part of type %s", caller, media)
        return PartResult(refuse(UNDECODABLE, f"part of type {media}, not {DICOM}"))
    return receive_part(receiver, part.path, caller, study_uid)


def response(results: list[PartResult]) -> tuple[int, Dataset]:
    """PS3.18 10.5.3: 200 all stored, 202 some, 409 none (or no part at all); the dataset lists each
    instance, a refused one with its failure reason (the reason's text is in the node's log)."""
    ds = Dataset()
    stored, failed = [], []
    for result in results:
        item = Dataset()
        if result.sop_class_uid:
            item.ReferencedSOPClassUID = result.sop_class_uid
        if result.sop_instance_uid:
            item.ReferencedSOPInstanceUID = result.sop_instance_uid
        if result.verdict.stored:
            stored.append(item)
        else:
            item.FailureReason = result.verdict.status
            failed.append(item)
    if stored:
        ds.ReferencedSOPSequence = stored
    if failed:
        ds.FailedSOPSequence = failed
    status = 409 if not stored else 200 if not failed else 202
    return status, ds

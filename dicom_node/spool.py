"""Incoming C-STORE datasets written to disk beside the network read.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each fragment of an incoming dataset to a
``NamedTemporaryFile`` in the thread that reads the socket, so copying to the page cache and reading
the network take turns (about 3 ms of every 8 MiB image). ``install()`` gives pynetdicom a
``SpoolFile`` instead: the same temporary file, written by a thread of its own through a short queue,
so the next fragment is read while the last is written; for a store that fsyncs, that thread also
starts each MiB's write to disk as it goes, so the handler's fsync finds little left to do. The C-STORE
handler calls ``finish()`` before it reads the file. The hook is pynetdicom's module-level name,
process-wide like its ``_config``.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import weakref
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import BinaryIO

import pynetdicom
from pynetdicom import dimse_messages

log = logging.getLogger(__name__)

WRITEBACK_BYTES = 1 << 20
QUEUE_DEPTH = 8  # fragments waiting per file; a fragment is at most one PDU (node.max_pdu_bytes)
_DONE, _ABANDONED = object(), object()
_open: weakref.WeakValueDictionary[str, SpoolFile] = weakref.WeakValueDictionary()


def _write_all(out: BinaryIO, chunks: queue.Queue[object], failure: list[OSError], name: str,
               writeback: bool) -> None:
    """The writer thread: write fragments in order until done, starting the disk write of each full
    MiB behind them; keep the first error; an abandoned file (its association ended before the
    handler) is removed."""
    written = flushed = 0
    with out:
        while (chunk := chunks.get()) is not _DONE:
            if chunk is _ABANDONED:
                Path(name).unlink(missing_ok=True)
                return
            if failure:
                continue
            try:
                view = memoryview(chunk)  # type: ignore[arg-type]
                while view:  # an unbuffered write may be short
                    count = out.write(view)
                    view, written = view[count:], written + count
                if writeback and written - flushed >= WRITEBACK_BYTES:
                    # starts writing these pages back now (and drops those written back before), so
                    # the handler's fsync finds the file mostly on disk already
                    end = written - written % WRITEBACK_BYTES
                    os.posix_fadvise(out.fileno(), flushed, end - flushed, os.POSIX_FADV_DONTNEED)
                    flushed = end
            except OSError as exc:
                failure.append(exc)


class SpoolFile:
    """The file-like object pynetdicom writes a received dataset to: ``write``, ``file.flush``, ``name``,
    ``close``; the bytes reach the file on the writer thread, all of them once ``finish()`` returns."""

    def __init__(self, *, folder: Path | None = None, writeback: bool = False, suffix: str = "",
                 **_: object) -> None:  # pynetdicom also passes delete=False, mode="wb"
        fd, self.name = tempfile.mkstemp(suffix=suffix, dir=folder)
        self._chunks: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._failure: list[OSError] = []
        self._writer = threading.Thread(target=_write_all, name="spool", daemon=True,
                                        args=(os.fdopen(fd, "wb", buffering=0), self._chunks, self._failure, self.name,
                                              writeback and hasattr(os, "posix_fadvise")))
        self._writer.start()
        # an association that ends mid-dataset drops this object without closing it
        self._abandon = weakref.finalize(self, self._chunks.put, _ABANDONED)
        _open[self.name] = self

    @property
    def file(self) -> SpoolFile:
        """pynetdicom calls ``file.flush()`` after each fragment (a property: no reference cycle, so a
        dropped SpoolFile is finalized at once)."""
        return self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._chunks.put(data.tobytes() if isinstance(data, memoryview) else data)
        return len(data)

    def flush(self) -> None:
        """Nothing to flush here: the writer thread writes unbuffered."""

    def finish(self) -> None:
        """Wait until every fragment is in the file; raise the first write error, if any."""
        if self._abandon.detach() is not None:
            self._chunks.put(_DONE)
        self._writer.join()
        if self._failure:
            raise self._failure[0]

    def close(self) -> None:
        """pynetdicom closes the file after its handler ran (and then unlinks the name); a write error
        was the handler's to report."""
        try:
            self.finish()
        except OSError:
            pass


def finish(path: str | os.PathLike[str]) -> None:
    """Wait for the dataset at ``path`` to be fully written, when a SpoolFile is writing it."""
    spooled = _open.get(str(path))
    if spooled is not None:
        spooled.finish()


def install(folder: Path, *, writeback: bool) -> bool:
    """Have pynetdicom write incoming datasets through SpoolFile, into ``folder`` (on the storage's file
    system, so that each is renamed into place, never copied); False, with a warning, when the installed
    pynetdicom has no such hook and writes them itself. ``writeback``: start each MiB's disk write as it
    is written (for a store that fsyncs; without fsync the page cache is left to write back later)."""
    current = getattr(dimse_messages, "NamedTemporaryFile", None)
    if not (current is tempfile.NamedTemporaryFile or (isinstance(current, partial) and current.func is SpoolFile)):
        log.warning("pynetdicom %s has no NamedTemporaryFile hook: datasets are written on the network "
                    "thread", pynetdicom.__version__)
        return False
    folder.mkdir(parents=True, exist_ok=True)
    dimse_messages.NamedTemporaryFile = partial(SpoolFile, folder=folder, writeback=writeback)  # type: ignore[assignment]
    return True


def remove_leftovers(folder: Path, older_than: timedelta, now: datetime) -> int:
    """Delete what a node stopped mid-transfer (killed, or the machine lost) left in ``folder``: files not
    written to for ``older_than``, far longer than any transfer waits between fragments."""
    removed = 0
    for path in folder.glob("*.dcm") if folder.is_dir() else ():
        if now - datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) > older_than:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.warning("removed %d partly received file(s) left in %s by an earlier run", removed, folder)
    return removed

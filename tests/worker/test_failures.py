"""How an analysis fails: one object at a time, at once when no retry can help, with backoff when the world is away."""

from __future__ import annotations

import io
import sqlite3
import time
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from radvlm.backends.scripted import ScriptedBackend
from records.metrics import OBJECTS_NOT_BUILT
from records.settings import Destination, HL7Settings
from records.tables import Job, JobState, OutboxItem, Study, StudyState
from results import outbox
from results.outbox import Routing
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.node import worker_context
from testbed.radiographs import radiograph
from worker.attempts import attempt, transient

PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1, objects=["sr", "narrative", "gsps"])
RIS = HL7Settings(host="127.0.0.1", port=1)


def _ready(running, path) -> tuple[int, int]:
    assert storescu(running.port, path).returncode == 0
    wait_for(lambda: running.ready, 30)
    return running.ready[-1]


def _rg1_variant(tmp_path, name: str, **changes: object) -> tuple[str, object]:
    """RG1 with fresh UIDs and ``changes`` (None deletes an attribute), saved: its study UID and path."""
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name, "series"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name])
    for keyword, value in changes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds.StudyInstanceUID, path


def test_a_gsps_that_cannot_be_built_costs_neither_the_sr_nor_the_hl7(sqlite_url, start_node, tmp_path,
                                                                       monkeypatch):
    def refuse(*_args: object) -> Dataset:
        raise ValueError("highdicom refused the presentation state")

    monkeypatch.setitem(outbox.BUILDERS, "gsps", refuse)
    running = start_node(sqlite_url)
    study_id, version = _ready(running, radiograph("RG1_UNCI.dcm"))
    before = OBJECTS_NOT_BUILT.labels("gsps")._value.get()
    ctx = worker_context(running, ScriptedBackend(), outputs=Routing(destinations=[PACS], hl7=RIS))
    ctx.deliver = lambda items: None
    assert attempt(ctx, study_id, version, retries_done=0) is None

    with running.sessions() as session:
        study = session.get_one(Study, study_id)
        job = session.scalars(select(Job).where(Job.study_id == study_id)).one()
        kinds = sorted(session.scalars(select(OutboxItem.kind).where(OutboxItem.study_id == study_id)))
    assert kinds == ["hl7", "narrative", "sr"]  # everything but the GSPS is in the outbox
    assert study.state is StudyState.analysed
    assert study.state_reason.startswith("analysed: Cardiomegaly, Pleural Effusion; with problems: 1 object(s)")
    assert job.state is JobState.done
    assert job.error.startswith("gsps of image 1 (") and "ValueError: highdicom refused" in job.error
    assert OBJECTS_NOT_BUILT.labels("gsps")._value.get() == before + 1


def test_a_voi_lut_only_dx_gets_its_sr_and_a_gsps_that_carries_the_lut(sqlite_url, start_node, tmp_path):
    """Many vendors' DX carry their display transform as a VOI LUT Sequence with no window: before, the
    results failed to build (highdicom read LUT Data as bytes), and the study failed after six retries."""
    table = np.rint(4095 * (np.arange(26000) / 25999.0) ** 0.6).astype(np.uint16)
    lut = Dataset()
    lut.LUTDescriptor, lut.LUTExplanation, lut.LUTData = [26000, 1000, 12], "GAMMA", table.tolist()
    lut["LUTData"].VR = "US"
    uid, path = _rg1_variant(tmp_path, "voi-lut-only", WindowCenter=None, WindowWidth=None, VOILUTSequence=[lut])
    running = start_node(sqlite_url)
    study_id, version = _ready(running, path)
    ctx = worker_context(running, ScriptedBackend(), outputs=Routing(destinations=[PACS]))
    ctx.deliver = lambda items: None
    started = time.monotonic()
    assert attempt(ctx, study_id, version, retries_done=0) is None
    assert time.monotonic() - started < 30

    with running.sessions() as session:
        assert session.get_one(Study, study_id).state is StudyState.analysed
        payloads = dict(session.execute(select(OutboxItem.kind, OutboxItem.payload)
                                        .where(OutboxItem.study_id == study_id)).all())
    assert set(payloads) == {"sr", "narrative", "gsps"}
    gsps = pydicom.dcmread(io.BytesIO(payloads["gsps"]))
    [transformation] = gsps.SoftcopyVOILUTSequence
    [carried] = transformation.VOILUTSequence
    assert [int(v) for v in carried.LUTDescriptor] == [26000, 1000, 16]  # 8 or 16 in a presentation state
    carried_table = np.frombuffer(carried.LUTData, dtype="<u2").astype(float)
    assert np.abs(carried_table - table * (65535 / 4095)).max() <= 1  # the image's curve over 16 bits
    assert pydicom.dcmread(io.BytesIO(payloads["sr"])).ContentSequence  # the SR was built from the same header


@dataclass
class _Failing(ScriptedBackend):
    """The scripted test backend, failing every generation with ``error``."""

    error: Exception | None = None

    def generate_many(self, *args: object, **kwargs: object) -> list:
        raise self.error  # type: ignore[misc]


def test_a_deterministic_failure_fails_at_once_with_its_reason(sqlite_url, start_node):
    running = start_node(sqlite_url)
    study_id, version = _ready(running, radiograph("RG1_UNCI.dcm"))
    ctx = worker_context(running, _Failing(error=TypeError("a bytes-like object is required, not 'list'")))
    assert attempt(ctx, study_id, version, retries_done=0) is None  # no retry: the same input fails the same way
    with running.sessions() as session:
        study = session.get_one(Study, study_id)
        job = session.scalars(select(Job).where(Job.study_id == study_id)).one()
    assert study.state is StudyState.failed and job.state is JobState.failed
    assert study.state_reason == "TypeError: a bytes-like object is required, not 'list'"


def test_a_transient_failure_is_retried_with_backoff_and_the_study_waits(sqlite_url, start_node):
    running = start_node(sqlite_url)
    study_id, version = _ready(running, radiograph("RG1_UNCI.dcm"))
    away = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    ctx = worker_context(running, _Failing(error=away))
    assert attempt(ctx, study_id, version, retries_done=0) == ctx.settings.worker.retry_backoff_s
    with running.sessions() as session:
        assert session.get_one(Study, study_id).state is not StudyState.failed


@pytest.mark.parametrize("exc, expected", [
    (OperationalError("x", {}, sqlite3.OperationalError("database is locked")), True),
    (ConnectionRefusedError(111, "refused"), True),
    (OSError(28, "No space left on device"), True),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), True),
    (IntegrityError("x", {}, sqlite3.IntegrityError("UNIQUE")), False),
    (FileNotFoundError(2, "gone"), False),
    (TypeError("a bytes-like object is required"), False),
    (ValueError("could not convert string to float"), False),
    (KeyError("PixelSpacing"), False),
])
def test_which_failures_are_retried(exc, expected):
    assert transient(exc) is expected

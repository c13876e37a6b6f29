"""Analysis in-process: the real pipeline with the scripted test backend and the tiny real model."""

from __future__ import annotations

import pydicom
import pytest
from sqlalchemy import func, select

from radvlm.backends.scripted import ScriptedBackend
from records.clock import utcnow
from records.schema import StudyResult
from records.tables import ROUTINE_PRIORITY, STAT_PRIORITY, Job, JobState, Result, Study, StudyState
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.node import worker_context
from testbed.radiographs import RG1_STUDY, RG3_STUDY, radiograph, rg1_copy
from worker.analysis import claim, run_analysis
from worker.dispatch import InProcessRunner
from worker.model_thread import ModelThread
from worker.pipeline import AnalysisOptions


def _analysed(running, uid: str, timeout: float = 60) -> Study:
    def done():
        with running.sessions() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
            return study if study and study.state in (StudyState.analysed, StudyState.failed) else None
    return wait_for(done, timeout)


def _result(running, study_id: int) -> StudyResult:
    with running.sessions() as session:
        [row] = session.scalars(select(Result).where(Result.study_id == study_id)).all()
        return StudyResult.model_validate(row.payload)


def test_storescu_to_stored_result_with_pixel_boxes(database_url, start_node):
    backend = ScriptedBackend()
    with ModelThread() as executor:
        holder = {}
        running = start_node(database_url, on_ready=lambda s, v: holder["runner"](s, v))
        holder["runner"] = InProcessRunner(worker_context(running, backend), executor)
        assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
        study = _analysed(running, RG1_STUDY)
    assert study.state is StudyState.analysed, study.state_reason
    result = _result(running, study.id)
    assert (result.backend, result.model_revision, result.study_version) == ("scripted", "scripted", 1)
    [image] = result.images
    assert (image.rows, image.columns) == (1955, 1841)
    assert "MONOCHROME1 inverted" in image.pixel_steps
    assert image.report.text.startswith("Findings:")
    assert {k for k, v in image.labels.items() if v} == {"Cardiomegaly", "Pleural Effusion"}
    by_label = {g.label: g for g in image.groundings}
    assert set(by_label) == {"Cardiomegaly", "Pleural Effusion"}
    effusion = by_label["Pleural Effusion"].answer
    assert effusion.question == "Where is the pleural effusion located in this Chest X-ray?"
    assert len(effusion.boxes) == 2 and effusion.malformed is None
    box = effusion.boxes[0]
    assert (box.x1, box.y1, box.x2, box.y2) == (0.05, 0.62, 0.31, 0.88)
    assert box.px == pytest.approx((0.05 * 1841, 0.62 * 1955, 0.31 * 1841, 0.88 * 1955))
    # every question was one user turn with the image, RadVLM's evaluation format
    assert all(len(turns) == 1 and turns[0].role == "user" for turns in backend.requests)
    assert len(backend.requests) == 4  # report, abnormalities, two groundings


def test_a_repeat_or_second_runner_stores_one_result(sqlite_url, start_node):
    running = start_node(sqlite_url)
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: running.ready, 15)
    [(study_id, version)] = running.ready
    backend = ScriptedBackend()
    for _ in range(2):
        assert run_analysis(study_id, version, sessions=running.sessions, store=running.store, backend=backend,
                            options=AnalysisOptions(), clock=utcnow) == []  # no destinations configured
    with running.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 1
        [job] = session.scalars(select(Job)).all()
        assert job.attempts == 1 and job.state is JobState.done
    assert len(backend.requests) == 4  # the repeat asked the model nothing


def test_an_older_version_is_superseded(sqlite_url, start_node, tmp_path):
    running = start_node(sqlite_url)
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: running.ready, 15)
    assert storescu(running.port, rg1_copy(tmp_path)).returncode == 0
    wait_for(lambda: len(running.ready) == 2, 15)
    study_id = running.ready[0][0]
    assert claim(running.sessions, study_id, 1, ScriptedBackend(), utcnow()) is None
    with running.sessions() as session:
        [job] = session.scalars(select(Job)).all()
        assert job.state is JobState.superseded and job.error == "study is at version 2"


def test_no_decodable_image_fails_visibly(sqlite_url, start_node):
    running = start_node(sqlite_url)
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: running.ready, 15)
    [(study_id, version)] = running.ready
    with running.sessions() as session:
        study = session.get_one(Study, study_id)
        running.store.path(study.instances[0].path).write_bytes(b"damaged on disk")
    runner = InProcessRunner(worker_context(running, ScriptedBackend()), ModelThread())
    runner._run(study_id, version)
    with running.sessions() as session:
        study = session.get_one(Study, study_id)
        assert study.state is StudyState.failed
        assert study.state_reason.startswith("no decodable frontal image")
        [job] = session.scalars(select(Job)).all()
        assert job.state is JobState.failed


def test_stat_studies_get_the_first_priority(sqlite_url, start_node, tmp_path):
    """The node judges the STAT rules from the header it reads at completion; dispatch reads no file."""
    from worker.dispatch import study_priority

    running = start_node(sqlite_url)
    stat = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    request = pydicom.Dataset()
    request.RequestedProcedurePriority = "STAT"
    stat.RequestAttributesSequence = [request]
    stat.save_as(tmp_path / "stat.dcm")
    assert storescu(running.port, tmp_path / "stat.dcm", radiograph("RG3_UNCI.dcm")).returncode == 0
    wait_for(lambda: len(running.ready) == 1, 15)  # the tibia has nothing to analyse: it is never ready
    with running.sessions() as session:
        studies = {s.study_instance_uid: s for s in session.scalars(select(Study))}
    assert studies[RG1_STUDY].priority == STAT_PRIORITY
    assert studies[RG3_STUDY].priority == ROUTINE_PRIORITY
    for path in running.store.root.rglob("*.dcm"):
        path.unlink()  # the priority was recorded: queuing the study does not need its files
    assert study_priority(running.sessions, studies[RG1_STUDY].id) == STAT_PRIORITY


def test_tiny_real_model_end_to_end(sqlite_url, start_node, tiny_model):
    """The real loading and generate path (transformers, LLaVA-OneVision) on CPU."""
    from radvlm.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(tiny_model))
    assert backend.model_revision.startswith("local-")
    running = start_node(sqlite_url)
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: running.ready, 15)
    [(study_id, version)] = running.ready
    run_analysis(study_id, version, sessions=running.sessions, store=running.store, backend=backend,
                 options=AnalysisOptions(max_new_tokens=16), clock=utcnow)
    result = _result(running, study_id)
    [image] = result.images
    assert result.backend == "transformers" and result.model_revision == backend.model_revision
    assert 0 < image.report.new_tokens <= 16 and image.report.seconds > 0
    assert set(image.labels) == {"No Finding", *[k for k in image.labels if k != "No Finding"]}
    assert len(image.labels) == 14


def test_model_threads_start_by_priority_and_run_side_by_side():
    """One thread: work starts by priority, then in order. Two: two items run at once (each waits for
    the other here, which one thread could never finish)."""
    import threading

    from records.tables import ROUTINE_PRIORITY
    from worker.app import CHAT_PRIORITY

    started: list[str] = []
    gate = threading.Event()
    with ModelThread() as one:
        one.submit(gate.wait, 10)  # holds the thread while the rest queue up
        for name, priority in (("first analysis", ROUTINE_PRIORITY), ("second analysis", ROUTINE_PRIORITY),
                               ("question", CHAT_PRIORITY)):
            one.submit_at(priority, started.append, name)
        gate.set()
    assert started == ["question", "first analysis", "second analysis"]

    meeting = threading.Barrier(2, timeout=10)
    with ModelThread(threads=2) as two:
        both = [two.submit(meeting.wait) for _ in range(2)]
        assert sorted(future.result(timeout=20) for future in both) == [0, 1]


def test_groundings_are_asked_while_the_report_is_still_being_written():
    """The abnormalities answer (a few words) decides the grounding questions; they need not wait for
    the report (hundreds of words), so on the engine they share its decode steps."""
    import time
    from dataclasses import dataclass, field

    import numpy as np

    from radvlm import prompts
    from records.pixels import ModelImage
    from worker.pipeline import analyse_image

    @dataclass
    class Timed(ScriptedBackend):  # the scripted model, its report slow, the time of each question kept
        spans: dict[str, tuple[float, float]] = field(default_factory=dict)

        def generate(self, image, turns, params, on_text=None):  # type: ignore[no-untyped-def]
            start = time.monotonic()
            if turns[-1].text == prompts.REPORT:
                time.sleep(1.5)
            completion = super().generate(image, turns, params, on_text)
            with self._lock:
                self.spans[turns[-1].text] = (start, time.monotonic())
            return completion

    backend = Timed()
    result = analyse_image(backend, ModelImage(np.zeros((64, 64), np.uint8), 2048, 2500), "1.2.3", "1.2",
                           AnalysisOptions(regions=("right lung",)))
    report_start, report_end = backend.spans[prompts.REPORT]
    grounding_starts = [backend.spans[prompts.grounding_question(label)][0]
                        for label in ("Cardiomegaly", "Pleural effusion")]
    assert all(report_start < start < report_end for start in grounding_starts)
    assert result.report.text.startswith("Findings:") and [g.label for g in result.groundings] == [
        "Cardiomegaly", "Pleural Effusion", "right lung"]
    assert result.groundings[0].answer.boxes  # each answer went back to its question

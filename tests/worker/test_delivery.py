"""Results back to the PACS: a real Orthanc receives SR, narrative and GSPS, also after an outage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pydicom
from sqlalchemy import select

from radvlm.backends.scripted import ScriptedBackend
from records.clock import utcnow
from records.settings import CallerRule, DeliverySettings, Destination, Settings
from records.tables import AuditEvent, DeliveryState, Job, OutboxItem, StudyVersion
from results.outbox import Routing
from testbed.dcmtk import storescu
from testbed.network import free_port, wait_for
from testbed.orthanc import running_orthanc
from testbed.radiographs import radiograph, rg1_copy
from worker.analysis import run_analysis
from worker.context import WorkerContext
from worker.delivery.dimse import c_store
from worker.dispatch import InProcessRunner
from worker.model_thread import ModelThread
from worker.pipeline import AnalysisOptions

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
FAST_RETRIES = DeliverySettings(retry_backoff_s=0.5, max_backoff_s=1, timeout_s=5)


def _runner(running, destinations, pool) -> InProcessRunner:
    settings = Settings(destinations=destinations, delivery=FAST_RETRIES)
    ctx = WorkerContext(settings=settings, sessions=running.sessions, store=running.store,
                        options=AnalysisOptions(max_new_tokens=64),
                        outputs=Routing(destinations=destinations, policy=FAST_RETRIES), _backend=ScriptedBackend())
    runner = InProcessRunner(ctx, pool)
    runner.start()
    return runner


def _items(running) -> list[OutboxItem]:
    with running.sessions() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def _orthanc_series(orthanc) -> dict[str, str]:
    """Modality of each series Orthanc holds for the chest study, by Series Instance UID."""
    [study] = orthanc.request("POST", "/tools/lookup", raw=RG1_STUDY.encode())
    series = orthanc.request("GET", f"/studies/{study['ID']}/series")
    return {s["MainDicomTags"]["SeriesInstanceUID"]: s["MainDicomTags"]["Modality"] for s in series}


def test_orthanc_routes_a_study_and_gets_sr_and_gsps_back(database_url, start_node, tmp_path):
    holder = {}
    node = start_node(database_url, stable_age_s=2.0, allowed_callers=[CallerRule(ae_title="ORTHANC")],
                      on_ready=lambda s, v: holder["runner"](s, v))
    with running_orthanc(tmp_path / "orthanc", {"RADVLM": ("RADVLM", "127.0.0.1", node.port)}) as orthanc, \
            ModelThread() as pool:
        pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        holder["runner"] = _runner(node, [pacs], pool)
        image = orthanc.upload(radiograph("RG1_UNCI.dcm"))
        sent = time.monotonic()
        orthanc.send("RADVLM", image)
        wait_for(lambda: len(_orthanc_series(orthanc)) == 4, 30)
        holder["runner"].close()
        elapsed = time.monotonic() - sent
        modalities = sorted(_orthanc_series(orthanc).values())
    with node.sessions() as session:  # analysis: from the study's completion to its stored result
        completed = session.scalar(select(StudyVersion.completed_at))
        finished = session.scalar(select(Job.finished_at))
        analysis_s = (finished - completed).total_seconds()
    assert modalities == ["CR", "PR", "SR", "SR"]
    print(f"routed to results in Orthanc: {elapsed:.2f} s (stable age 2 s, analysis {analysis_s:.2f} s)")
    assert elapsed <= 2.0 + analysis_s + 2.0, (elapsed, analysis_s)  # stable age + analysis time + 2 s
    items = _items(node)
    assert sorted(i.kind for i in items) == ["gsps", "narrative", "sr"]
    assert all(i.state is DeliveryState.sent and i.attempts == 1 for i in items)


def test_pacs_down_then_back_gets_each_object_once(sqlite_url, start_node, tmp_path):
    orthanc_dicom = free_port()
    pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc_dicom)
    pool = ModelThread()
    holder = {}
    node = start_node(sqlite_url, on_ready=lambda s, v: holder["runner"](s, v))
    holder["runner"] = _runner(node, [pacs], pool)
    assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: (items := _items(node)) and all(i.attempts >= 2 for i in items), 30)
    assert all(i.state is DeliveryState.pending and i.last_error.startswith("no association")
               for i in _items(node))
    holder["runner"].close()  # the service goes down with the PACS still away
    pool.shutdown(wait=True)
    node.node.stop()

    with running_orthanc(tmp_path / "orthanc", {}, dicom_port=orthanc_dicom) as orthanc:
        with ModelThread() as again:  # the service restarts and resumes its outbox
            restarted = _runner(node, [pacs], again)
            wait_for(lambda: all(i.state is DeliveryState.sent for i in _items(node)), 30)
            restarted.close()
        stats = orthanc.request("GET", "/statistics")
    items = _items(node)
    assert stats["CountInstances"] == 3 == len(items)
    assert len({i.object_uid for i in items}) == 3
    assert all(i.attempts >= 3 for i in items)
    # the status per destination, as an administrator reads it
    shown = subprocess.run([sys.executable, "-m", "radvlm_pacs", "studies", "show", RG1_STUDY],
                           env={**os.environ, "RADVLM_DATABASE_URL": sqlite_url}, capture_output=True, text=True)
    deliveries = json.loads(shown.stdout)["deliveries"]
    assert sorted((d["kind"], d["destination"], d["state"]) for d in deliveries) == [
        ("gsps", "pacs", "sent"), ("narrative", "pacs", "sent"), ("sr", "pacs", "sent")]
    assert all(d["attempts"] >= 3 and d["last_error"] is None for d in deliveries)
    with node.sessions() as session:  # audited once per object delivered, not per attempt
        sent = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "deliver")).all()
    assert sorted(sent) == sorted(f"{i.kind} {i.object_uid} to pacs" for i in items)


def test_dicom_tls_destination(tmp_path):
    """C-STORE over TLS to an Orthanc that only speaks TLS, verifying its certificate."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(tmp_path / "cert.pem"),
           "DicomTlsPrivateKey": str(tmp_path / "key.pem"), "DicomTlsTrustedCertificates": str(tmp_path / "cert.pem"),
           "DicomTlsRemoteCertificateRequired": False}
    payload = radiograph("RG1_UNCI.dcm").read_bytes()
    with running_orthanc(tmp_path / "orthanc", {}, extra=tls) as orthanc:
        secure = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, tls=True,
                             tls_ca_file=tmp_path / "cert.pem")
        plain = secure.model_copy(update={"tls": False})
        assert c_store(payload, secure, "RADVLM", 10).delivered
        refused = c_store(payload, plain, "RADVLM", 5)
        assert not refused.delivered and refused.retry
        assert orthanc.request("GET", "/statistics")["CountInstances"] == 1


def test_a_new_version_names_the_earlier_report_as_predecessor(sqlite_url, start_node, tmp_path):
    pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=free_port(),
                       objects=["sr", "narrative"])
    outputs = Routing(destinations=[pacs], policy=FAST_RETRIES)
    node = start_node(sqlite_url)
    assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: node.ready, 15)
    [(study_id, _)] = node.ready
    first = run_analysis(study_id, 1, sessions=node.sessions, store=node.store, backend=ScriptedBackend(),
                           options=AnalysisOptions(), clock=utcnow, outputs=outputs)
    assert storescu(node.port, rg1_copy(tmp_path)).returncode == 0
    wait_for(lambda: len(node.ready) == 2, 15)
    second = run_analysis(study_id, 2, sessions=node.sessions, store=node.store, backend=ScriptedBackend(),
                          options=AnalysisOptions(), clock=utcnow, outputs=outputs)
    assert len(second) == 4  # an SR and a narrative per frontal image of version 2
    with node.sessions() as session:
        before = {i.kind: i for i in session.scalars(select(OutboxItem).where(OutboxItem.id.in_(first)))}
        after = [session.get_one(OutboxItem, i) for i in second]
    for item in after:
        sr = pydicom.dcmread(io.BytesIO(item.payload))
        [study_ref] = sr.PredecessorDocumentsSequence
        [series_ref] = study_ref.ReferencedSeriesSequence
        assert series_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == before[item.kind].object_uid
        assert item.object_uid != before[item.kind].object_uid


def test_c_store_statuses_success_warning_retry_and_refusal(tmp_path):
    """What the peer answers decides the attempt: success and every warning PS3.7 C.1 lists (0001, 0107,
    0116, Bxxx) are delivered; out of resources (A7xx) is retried; any other failure is final."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    answers = [0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xA700, 0xA900, 0xC000]
    replies = iter(answers)
    peer = AE(ae_title="PACS")
    peer.add_supported_context(ComprehensiveSRStorage)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda event: next(replies))])
    try:
        sr = pydicom.Dataset()
        sr.SOPClassUID, sr.SOPInstanceUID = ComprehensiveSRStorage, pydicom.uid.generate_uid()
        sr.Modality = "SR"
        sr.file_meta = pydicom.dataset.FileMetaDataset()
        sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        outcomes = [(a.delivered, a.retry) for a in (c_store(buffer.getvalue(), destination, "RADVLM", 5)
                                                          for _ in answers)]
    finally:
        server.shutdown()
    assert outcomes == [(True, False)] * 5 + [(False, True), (False, False), (False, False)]

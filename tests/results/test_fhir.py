"""FHIR R4 out: the transaction Bundle validates (fhir.resources), says what the result says, and travels
through the outbox with its retries.

No FHIR server that stores and processes transactions installs here (looked 2026-11-30: HAPI FHIR comes
from Maven Central, which does not answer; @medplum/server is not on npm; PyPI's fhirstarter and npm's
node-fhir-server-core are frameworks that leave storage and transactions to the implementer), so the
delivery test posts to a recording HTTP endpoint (a test double that answers like a server's transaction
endpoint: 503 once, then 200) and validates what it received."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fhir.resources.R4B.bundle import Bundle
from pydicom import dcmread
from sqlalchemy import select

from radvlm.backends.scripted import ScriptedBackend
from records.clock import utcnow
from records.schema import StudyResult
from records.settings import DeliverySettings, FhirSettings
from records.tables import DeliveryState, OutboxItem, Result
from results.outbox import Routing, fhir_result
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.radiographs import radiograph
from worker.analysis import run_analysis
from worker.delivery.outbox import deliver_item, sender
from worker.pipeline import AnalysisOptions

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
SCT = "http://snomed.info/sct"


@contextmanager
def recording_endpoint(answers: list[int]) -> Iterator[tuple[str, list[tuple[dict, bytes]]]]:
    """An HTTP endpoint that records each POST (headers, body) and answers the next status of ``answers``."""
    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            status = answers[min(len(received), len(answers)) - 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.end_headers()
            self.wfile.write(b'{"resourceType": "Bundle", "type": "transaction-response"}')

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir", received
    finally:
        server.shutdown()


def test_bundle_validates_and_goes_through_the_outbox_with_retries(sqlite_url, start_node):
    node = start_node(sqlite_url)
    assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: node.ready, 15)
    [(study_id, version)] = node.ready
    policy = DeliverySettings(retry_backoff_s=0.2, max_backoff_s=0.5, timeout_s=5, urgent_findings=["pleural effusion"])
    with recording_endpoint([503, 200]) as (url, received):
        fhir = FhirSettings(base_url=url, token="ehr secret", patient_identifier_system="urn:oid:1.2.3.4")
        [item_id] = run_analysis(study_id, version, sessions=node.sessions, store=node.store,
                                 backend=ScriptedBackend(), options=AnalysisOptions(), clock=utcnow,
                                 outputs=Routing(fhir=fhir, policy=policy))
        send = sender([], None, "RADVLM", policy, fhir)
        delay = deliver_item(node.sessions, item_id, send, policy, utcnow)  # 503: tried again later
        assert delay is not None and delay > 0
        wait_for(lambda: deliver_item(node.sessions, item_id, send, policy, utcnow) is None, 10)
    with node.sessions() as session:
        item = session.get_one(OutboxItem, item_id)
    assert item.kind == "fhir" and item.destination == "ehr" and item.state is DeliveryState.sent
    assert item.attempts == 2 and len(received) == 2
    headers, body = received[-1]
    assert headers["Authorization"] == "Bearer ehr secret" and headers["Content-Type"] == "application/fhir+json"
    assert body == item.payload  # the same bytes every attempt

    bundle = Bundle.model_validate_json(body)  # fhir.resources validates every resource on the way in
    assert bundle.type == "transaction"
    kinds = [entry.resource.__resource_type__ for entry in bundle.entry]
    assert kinds.count("Observation") == 14 and kinds.count("DiagnosticReport") == 1
    by_url = {entry.fullUrl: entry for entry in bundle.entry}
    [report] = [e.resource for e in bundle.entry if e.resource.__resource_type__ == "DiagnosticReport"]
    assert report.status == "preliminary" and report.code.coding[0].system == "http://loinc.org"
    assert report.conclusion.startswith("AI draft, not verified")
    study = by_url[report.imagingStudy[0].reference]
    assert study.resource.identifier[0].value == f"urn:oid:{RG1_STUDY}"
    assert study.request.ifNoneExist == f"identifier=urn:dicom:uid|urn:oid:{RG1_STUDY}"  # not created twice
    patient = by_url[report.subject.reference].resource
    assert patient.identifier[0].system == "urn:oid:1.2.3.4"
    observations = {o.code.coding[0].display: o for o in (by_url[r.reference].resource for r in report.result)}
    present = {name for name, o in observations.items() if o.valueCodeableConcept.coding[0].code == "52101004"}
    assert present == {"Cardiomegaly", "Pleural effusion"}  # what the scripted model answered
    effusion = observations["Pleural effusion"]
    assert effusion.bodySite.coding[0].code == "3120008" and effusion.bodySite.coding[0].system == SCT
    assert effusion.interpretation[0].coding[0].code == "AA"  # urgent, as in the HL7 v2 result
    assert observations["Cardiomegaly"].interpretation[0].coding[0].code == "A"
    assert [c.coding[0].code for c in report.conclusionCode] == ["60046008"]
    assert json.loads(body)["entry"][0]["request"]["method"] == "POST"

    # the radiologist's sign-off sends the final report: its own bundle, status final, no draft notice
    with node.sessions() as session:
        result = StudyResult.model_validate(session.scalars(select(Result.payload)).one())
    final = fhir_result(result, dcmread(radiograph("RG1_UNCI.dcm"), stop_before_pixels=True), fhir,
                        policy.urgent_findings, utcnow(), final=True, interpreter="House^Gregory")
    final_report = Bundle.model_validate_json(final.payload).entry[-1].resource
    assert final.sop_instance_uid != item.object_uid and final_report.status == "final"
    assert not final_report.conclusion.startswith("AI draft")
    assert [r.display for r in final_report.resultsInterpreter] == ["Gregory House"]  # who signed it
    assert report.resultsInterpreter is None  # the draft: nobody yet


def test_a_refused_transaction_is_final_and_a_missing_server_is_retried():
    from worker.delivery.fhir_rest import post_bundle

    with recording_endpoint([422]) as (url, _):
        refused = post_bundle(b"{}", FhirSettings(base_url=url), 5)
    assert not refused.delivered and not refused.retry and "422" in refused.detail
    down = post_bundle(b"{}", FhirSettings(base_url="http://127.0.0.1:9/fhir"), 2)
    assert not down.delivered and down.retry

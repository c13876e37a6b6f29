"""The RIS result: ORU^R01 v2.5.1 built with hl7apy, strictly valid, delivered over MLLP with ACKs."""

from __future__ import annotations

from datetime import datetime, timezone

import pydicom
import pytest

from radvlm.backends.scripted import ScriptedBackend
from records.clock import utcnow
from records.pixels import read_model_image
from records.schema import StudyResult
from records.settings import DeliverySettings, HL7Settings
from records.tables import DeliveryState, OutboxItem
from results.hl7 import oru_message, parse_strict
from results.outbox import Routing
from testbed.dcmtk import storescu
from testbed.hl7_listener import listener
from testbed.network import free_port, wait_for
from testbed.radiographs import radiograph
from worker.analysis import run_analysis
from worker.delivery.mllp import mllp_send
from worker.delivery.outbox import deliver_item, sender
from worker.pipeline import AnalysisOptions, analyse_image

WHEN = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _result(findings: list[str]) -> tuple[pydicom.Dataset, StudyResult]:
    path = radiograph("RG1_UNCI.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    image = analyse_image(ScriptedBackend(findings=findings, boxes={}), read_model_image(path),
                          header.SOPInstanceUID, header.SeriesInstanceUID, AnalysisOptions())
    return header, StudyResult(study_instance_uid=header.StudyInstanceUID, study_version=1, model_id="m",
                               model_revision="r", prompt_version="p", backend="scripted", images=[image], seconds=1)


def _message(findings: list[str]) -> str:
    header, result = _result(findings)
    return oru_message(header, result, "CTRL0001", WHEN, sending_application="RADVLM", sending_facility="HOSP",
                       receiving_application="RIS", receiving_facility="HOSP", urgent={"Pneumothorax"})


def test_oru_is_strictly_valid_with_patient_order_and_findings():
    message = parse_strict(_message(["pneumothorax", "pleural effusion"]))
    assert message.msh.msh_9.value == "ORU^R01^ORU_R01" and message.msh.msh_12.value == "2.5.1"
    patient = message.oru_r01_patient_result.oru_r01_patient.pid
    assert patient.pid_3.value == "9RG1" and patient.pid_5.value == "CompressedSamples^RG1"
    assert message.msh.msh_7.value == "20261123120000+0000"  # UTC, and saying so
    assert message.msh.msh_18.value == "UNICODE UTF-8"  # as the bytes are
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_3.value == "exam Number" and order.obr.obr_25.value == "P"
    observations = [group.obx for group in order.oru_r01_observation]
    assert len(observations) == 15  # the report and the 14 labels
    assert observations[0].obx_2.value == "TX" and observations[0].obx_5.value.startswith("AI draft")
    flags = {obx.obx_3.value.split("^")[1]: obx.obx_8.value for obx in observations[1:] if obx.obx_8.value}
    assert flags == {"Pneumothorax": "AA", "Pleural effusion": "A"}  # critical, abnormal
    assert all(obx.obx_11.value == "P" for obx in observations)


def test_no_urgent_finding_no_critical_flag():
    message = parse_strict(_message(["cardiomegaly"]))
    observations = [g.obx for g in message.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation]
    assert [obx.obx_8.value for obx in observations if obx.obx_8.value] == ["A"]


def test_report_lines_are_tx_repetitions_and_delimiters_cannot_break_the_message():
    """A line break is a repetition of OBX-5 (HL7's TX line break); a CR can never end a segment early,
    and delimiters in the model's text or the patient's header are escaped, not interpreted."""
    header, result = _result([])
    report = "Heart | size ^ normal & clear ~ \\ end\r\nSecond line\rThird line\nFourth"
    result.images[0].report.text = report
    header.PatientID = "ID\r1|2"
    er7 = oru_message(header, result, "CTRL0002", WHEN, sending_application="RADVLM", sending_facility="HOSP",
                      receiving_application="RIS", receiving_facility="HOSP", urgent=set(), final=True,
                      interpreter="O'Neil & Sons^Pat^^Dr.^Jr")
    assert [segment[:3] for segment in er7.split("\r")] == ["MSH", "PID", "OBR"] + ["OBX"] * 15
    message = parse_strict(er7)
    assert message.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7() == "ID 1\\F\\2"
    narrative = message.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation[0].obx
    lines = [field.to_er7() for field in narrative.children if field.name == "OBX_5"]
    assert lines == ["Heart \\F\\ size \\S\\ normal \\T\\ clear \\R\\ \\E\\ end", "Second line", "Third line", "Fourth"]
    interpreter = message.oru_r01_patient_result.oru_r01_order_observation.obr.obr_32
    assert interpreter.to_er7() == "&O'Neil \\T\\ Sons&Pat&&Jr&Dr."  # CNN: no ID, family, given, middle, suffix, prefix


def test_delivered_through_the_outbox_to_an_mllp_listener(sqlite_url, start_node, tmp_path):
    node = start_node(sqlite_url)
    assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    wait_for(lambda: node.ready, 15)
    [(study_id, version)] = node.ready
    policy = DeliverySettings(retry_backoff_s=0.2, max_backoff_s=0.5, timeout_s=5)
    with listener(tmp_path) as port:
        hl7 = HL7Settings(host="127.0.0.1", port=port)
        [item_id] = run_analysis(study_id, version, sessions=node.sessions, store=node.store,
                                 backend=ScriptedBackend(), options=AnalysisOptions(), clock=utcnow,
                                 outputs=Routing(hl7=hl7, policy=policy))
        assert deliver_item(node.sessions, item_id, sender([], hl7, "RADVLM", policy), policy, utcnow) is None
    with node.sessions() as session:
        item = session.get_one(OutboxItem, item_id)
    assert item.kind == "hl7" and item.destination == "ris" and item.state is DeliveryState.sent
    [saved] = (tmp_path / "ris").glob("*.hl7")
    assert saved.name.startswith(item.object_uid) and len(item.object_uid) == 20
    assert parse_strict(saved.read_text()).msh.msh_10.value == item.object_uid


@pytest.mark.parametrize("answer, delivered, retry", [("AA", True, False), ("AE", False, True), ("AR", False, False)])
def test_ack_codes(tmp_path, answer, delivered, retry):
    with listener(tmp_path, answer) as port:
        outcome = mllp_send(_message([]).encode(), "127.0.0.1", port, 5)
    assert (outcome.delivered, outcome.retry) == (delivered, retry)


def test_listener_down_is_retried():
    outcome = mllp_send(b"MSH|", "127.0.0.1", free_port(), 2)
    assert not outcome.delivered and outcome.retry


def test_patient_name_prefix_and_suffix_go_where_xpn_has_them():
    """DICOM PN is family^given^middle^prefix^suffix; HL7 XPN is family^given^middle^suffix^prefix."""
    header, result = _result([])
    header.PatientName = "Curie^Marie^S^Dr.^PhD=キュリー"
    er7 = oru_message(header, result, "CTRL0003", WHEN, sending_application="RADVLM", sending_facility="HOSP",
                      receiving_application="RIS", receiving_facility="HOSP", urgent=set())
    patient = parse_strict(er7).oru_r01_patient_result.oru_r01_patient.pid
    assert patient.pid_5.value == "Curie^Marie^S^PhD^Dr."
    assert [c.value for c in patient.pid_5.children] == ["Curie", "Marie", "S", "PhD", "Dr."]

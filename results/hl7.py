"""The RIS result: an HL7 v2.5.1 ORU^R01 per analysed study, sent over MLLP with ACK handling.

PID from the DICOM patient, OBR with the accession number and result status P (preliminary),
an OBX with the draft report, and an OBX per CheXpert label, flagged abnormal when present and
critical (AA) when it is one of the configured urgent findings. Built with hl7apy and checked by
its strict validation before it is stored in the outbox.
"""

from __future__ import annotations

import re
from datetime import datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from pydicom import Dataset
from pydicom.valuerep import PersonName

from records.schema import StudyResult
from results import concepts
from results.authorship import DRAFT_NOTICE

START, END = b"\x0b", b"\x1c\x0d"
REPORT_CODE = "18748-4^Diagnostic Imaging Report^LN"
NARRATIVE_CODE = "18782-3^Radiology Study observation (narrative)^LN"


def _escape(text: str) -> str:
    """HL7 escapes for the delimiters (v2.5.1 section 2.7); a line break, which would end the segment,
    becomes a space (text with lines goes through ``_lines``)."""
    for raw, escaped in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(raw, escaped)
    return re.sub(r"[\r\n]+", " ", text)


def _lines(text: str) -> list[str]:
    """A TX value's lines: each is one repetition of OBX-5, which is how TX carries a line break."""
    return [_escape(line) for line in re.split(r"\r\n|\r|\n", text)]


def _name_parts(value: str) -> list[str]:
    """A DICOM PN's alphabetic group (family^given^middle^prefix^suffix) in HL7's order (family, given,
    middle, suffix, prefix), escaped."""
    name = PersonName(value)
    return [_escape(part) for part in (name.family_name, name.given_name, name.middle_name, name.name_suffix,
                                       name.name_prefix)]


def _name(value: str) -> str:
    """A DICOM PN as an HL7 XPN (components)."""
    return "^".join(_name_parts(value)).rstrip("^")


def _interpreter(name: str) -> str:
    """A DICOM PN as OBR-32's first component: a CNN (subcomponents), with no ID."""
    return "&" + "&".join(_name_parts(name)).rstrip("&")


def _timestamp(when: datetime) -> str:
    """HL7 DTM to the second, with the UTC offset (a receiver would otherwise read its own local time)."""
    return when.strftime("%Y%m%d%H%M%S%z")


def oru_message(header: Dataset, result: StudyResult, control_id: str, when: datetime, *,
                sending_application: str, sending_facility: str, receiving_application: str,
                receiving_facility: str, urgent: set[str], final: bool = False, interpreter: str | None = None) -> str:
    """The ORU^R01 as ER7 text (segments separated by CR): a preliminary AI draft, or with
    ``final`` the report as a radiologist signed it off (result status F); ``interpreter``, the DICOM
    name of that radiologist, goes to OBR-32 (Principal Result Interpreter)."""
    status = "F" if final else "P"
    m = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = sending_application
    m.msh.msh_4 = sending_facility
    m.msh.msh_5 = receiving_application
    m.msh.msh_6 = receiving_facility
    m.msh.msh_7 = _timestamp(when)
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.5.1"
    m.msh.msh_18 = "UNICODE UTF-8"  # HL7 table 0211: the bytes on the wire (names, report text) are UTF-8
    patient_result = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = patient_result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3 = _escape(str(header.get("PatientID", "") or "UNKNOWN"))
    pid.pid_5 = _name(str(header.get("PatientName", "") or "UNKNOWN"))
    if header.get("PatientBirthDate"):
        pid.pid_7 = str(header.PatientBirthDate)
    if header.get("PatientSex") in ("M", "F", "O"):
        pid.pid_8 = str(header.PatientSex)
    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = _escape(str(header.get("AccessionNumber", "") or result.study_instance_uid[-22:]))
    order.obr.obr_4 = REPORT_CODE
    order.obr.obr_7 = str(header.get("StudyDate", "") or when.strftime("%Y%m%d"))
    order.obr.obr_22 = _timestamp(when)
    order.obr.obr_25 = status
    if interpreter:
        order.obr.obr_32 = _interpreter(interpreter)
    labels = result.study_labels()
    critical = result.critical_labels(urgent)
    text = result.images[0].report.text
    rows: list[tuple[str, str, str | list[str], str]] = [
        ("TX", NARRATIVE_CODE, _lines(text if final else f"{DRAFT_NOTICE}. {text}"), "AA" if critical else ""),
    ]
    for label, present in labels.items():
        coding = concepts.LABELS[label].finding
        code = f"{coding.value}^{coding.meaning}^{coding.scheme_designator}"
        value = f"{concepts.PRESENT.value}^Present^SCT" if present else f"{concepts.ABSENT.value}^Absent^SCT"
        flag = ("AA" if label in critical else "A") if present and label != "No Finding" else ""
        rows.append(("CWE", code, value, flag))
    for number, (value_type, code, value, flag) in enumerate(rows, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(number)
        obx.obx_2 = value_type
        obx.obx_3 = code
        if isinstance(value, list):
            for line in value:
                obx.add_field("OBX_5").value = line
        else:
            obx.obx_5 = value
        if flag:
            obx.obx_8 = flag
        obx.obx_11 = status
    m.validate()
    return m.to_er7()


def parse_strict(er7: str) -> Message:
    """An ER7 message read back with hl7apy's strict validation (segments ending in CR or LF), which raises on anything
    HL7 v2.5.1 does not allow: how the tests check what is sent."""
    return parse_message(er7.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)



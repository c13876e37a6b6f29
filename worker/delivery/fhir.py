"""The result for an EHR as FHIR R4: a transaction Bundle with a preliminary DiagnosticReport, one
Observation per CheXpert label (present or absent, coded, with its body site), the ImagingStudy it is
about and the Patient, both created only if the server has no match (conditional create). Built and
validated with fhir.resources (its R4B models: R4's DiagnosticReport, Observation, ImagingStudy and
Bundle, unchanged), and posted to the configured endpoint by the outbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

import httpx
from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset
from pydicom.valuerep import PersonName

from records.schema import StudyResult
from records.settings import FhirSettings
from worker.delivery import codes as cx
from worker.delivery.equipment import DRAFT_NOTICE
from worker.delivery.send import Attempt

SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "LN": "http://loinc.org", cx.PRIVATE_SCHEME: "urn:radvlm:codes"}
REPORT_CODE = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
           "display": "Imaging"}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DICOM_UID = "urn:dicom:uid"
NAMESPACE = uuid.UUID("8f0d5c2e-3b1a-5d7e-9c4f-2a6b8e1d0f37")  # fullUrls derived from the result, not random


def _concept(code) -> dict:  # type: ignore[no-untyped-def]
    return {"coding": [{"system": SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}]}


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, '/'.join(parts))}"


def _date(value: str) -> str | None:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else None


def report_bundle(result: StudyResult, header: Dataset, fhir: FhirSettings, urgent: Collection[str], when: datetime,
                  final: bool = False, interpreter: str | None = None) -> Bundle:
    """The study's result as a transaction Bundle; ``final``: the report as a radiologist signed it off,
    ``interpreter`` (a DICOM name) named as its results interpreter."""
    key = result.identity(final)
    patient_id = str(header.get("PatientID", "") or "")
    patient_url, study_url, report_url = _urn(key, "patient"), _urn(key, "study"), _urn(key, "report")
    study_oid = f"urn:oid:{result.study_instance_uid}"
    status = "final" if final else "preliminary"
    labels = result.study_labels()
    critical = result.critical_labels(urgent)
    entries = [
        {"fullUrl": patient_url,
         "resource": {"resourceType": "Patient",
                      "identifier": [{"system": fhir.patient_identifier_system, "value": patient_id}]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier={fhir.patient_identifier_system}|{patient_id}"}},
        {"fullUrl": study_url,
         "resource": {"resourceType": "ImagingStudy", "status": "available",
                      "identifier": [{"system": DICOM_UID, "value": study_oid}],
                      "subject": {"reference": patient_url},
                      "numberOfInstances": len(result.images)},
         "request": {"method": "POST", "url": "ImagingStudy", "ifNoneExist": f"identifier={DICOM_UID}|{study_oid}"}},
    ]
    observations = []
    for label, present in labels.items():
        coding = cx.LABELS[label]
        url = _urn(key, "observation", label)
        observation = {
            "resourceType": "Observation", "status": status, "category": [{"coding": [IMAGING]}],
            "code": _concept(coding.finding), "subject": {"reference": patient_url},
            "derivedFrom": [{"reference": study_url}], "issued": when.isoformat(),
            "valueCodeableConcept": _concept(cx.PRESENT if present else cx.ABSENT),
            "device": {"display": f"{result.model_id} ({result.model_revision})"},
        }
        if coding.site is not None:
            observation["bodySite"] = _concept(coding.site)
        if present and label != "No Finding":
            urgent = label in critical
            observation["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "AA" if urgent else "A",
                                                          "display": "Critical abnormal" if urgent else "Abnormal"}]}]
        entries.append({"fullUrl": url, "resource": observation, "request": {"method": "POST", "url": "Observation"}})
        observations.append({"reference": url})
    text = result.images[0].report.text
    report = {
        "resourceType": "DiagnosticReport", "status": status, "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [REPORT_CODE], "text": "Chest X-ray report"},
        "identifier": [{"system": "urn:radvlm:report", "value": key}],
        "subject": {"reference": patient_url}, "issued": when.isoformat(),
        "imagingStudy": [{"reference": study_url}], "result": observations,
        "conclusion": text if final else f"{DRAFT_NOTICE}. {text}",
    }
    if (effective := _date(str(header.get("StudyDate", "") or ""))) is not None:
        report["effectiveDateTime"] = effective
    if interpreter:
        name = PersonName(interpreter)
        report["resultsInterpreter"] = [{"display": " ".join(p for p in (name.given_name, name.family_name) if p)}]
    if critical:
        report["conclusionCode"] = [_concept(cx.LABELS[label].finding) for label in critical]
    entries.append({"fullUrl": report_url, "resource": report,
                    "request": {"method": "POST", "url": "DiagnosticReport"}})
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _headers(fhir: FhirSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if fhir.token is not None:
        headers["Authorization"] = f"Bearer {fhir.token.get_secret_value()}"
    return headers


def fhir_reachable(fhir: FhirSettings, timeout_s: float) -> Attempt:
    """``config check``: does the server answer ``GET [base]/metadata`` with our token?"""
    try:
        rsp = httpx.get(f"{fhir.base_url.rstrip('/')}/metadata", headers=_headers(fhir), timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Attempt(False, True, f"cannot reach {fhir.base_url}: {type(exc).__name__}")
    return Attempt(rsp.is_success, True, f"capability statement: HTTP {rsp.status_code}")


def post_bundle(payload: bytes, fhir: FhirSettings, timeout_s: float) -> Attempt:
    """POST the transaction to the server's base. 2xx: delivered; a refusal of the content (400, 404,
    409, 412, 422) is final; anything else (down, 5xx, 401/403 until the token is fixed, 429) is retried."""
    try:
        rsp = httpx.post(fhir.base_url, content=payload, headers=_headers(fhir), timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Attempt(False, True, f"cannot reach {fhir.base_url}: {type(exc).__name__}")
    if rsp.is_success:
        return Attempt(True, False, f"transaction accepted (HTTP {rsp.status_code})")
    final = rsp.status_code in (400, 404, 409, 412, 422)
    return Attempt(False, not final, f"transaction refused (HTTP {rsp.status_code}): {rsp.text[:200]}")

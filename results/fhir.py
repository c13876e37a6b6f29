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

from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset
from pydicom.valuerep import PersonName

from records.schema import StudyResult
from records.settings import FhirSettings
from results import concepts
from results.authorship import DRAFT_NOTICE

SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "LN": "http://loinc.org", concepts.PRIVATE_SCHEME: "urn:radvlm:codes"}
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
        coding = concepts.LABELS[label]
        url = _urn(key, "observation", label)
        observation = {
            "resourceType": "Observation", "status": status, "category": [{"coding": [IMAGING]}],
            "code": _concept(coding.finding), "subject": {"reference": patient_url},
            "derivedFrom": [{"reference": study_url}], "issued": when.isoformat(),
            "valueCodeableConcept": _concept(concepts.PRESENT if present else concepts.ABSENT),
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
        report["conclusionCode"] = [_concept(concepts.LABELS[label].finding) for label in critical]
    entries.append({"fullUrl": report_url, "resource": report,
                    "request": {"method": "POST", "url": "DiagnosticReport"}})
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})



"""Coded concepts for the CheXpert labels and the anatomy they sit in (see sr-spec.md, "Codes").

Codes marked (D) in the spec are in DICOM PS3.16; the others are SNOMED CT concepts the spec
lists for confirmation. Where no concept exists ("Pleural Other"), a private code of the scheme
``99RADVLM`` is used and declared in the object's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99RADVLM"

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
FINDING = Code("121071", "DCM", "Finding")
IMPRESSION = Code("121073", "DCM", "Impression")
LESION_CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")
ANATOMY_CATEGORY = Code("91723000", "SCT", "Anatomical Structure")
BOUNDED_BY = Code("75958009", "SCT", "Bounded by")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
XR_PROCEDURE = Code("43468-8", "LN", "XR unspecified body region")

LUNG = Code("39607008", "SCT", "Lung")
HEART = Code("80891009", "SCT", "Heart")
MEDIASTINUM = Code("72410000", "SCT", "Mediastinum")
PLEURA = Code("3120008", "SCT", "Pleura")
RIGHT, LEFT, BILATERAL = (Code("24028007", "SCT", "Right"), Code("7771000", "SCT", "Left"),
                          Code("51440002", "SCT", "Bilateral"))


@dataclass(frozen=True)
class LabelCoding:
    """How a CheXpert label is coded in the SR, HL7 and FHIR results: its finding concept, and the anatomy it sits in
    (``site`` None where there is no single one: fractures, devices, no finding)."""

    finding: Code
    site: Code | None


LABELS: dict[str, LabelCoding] = {
    "No Finding": LabelCoding(Code("17621005", "SCT", "Normal"), None),
    "Enlarged Cardiomediastinum": LabelCoding(Code("260376009", "SCT", "Enlarged"), MEDIASTINUM),
    "Cardiomegaly": LabelCoding(Code("8186001", "SCT", "Cardiomegaly"), HEART),
    "Lung Opacity": LabelCoding(Code("112001", "DCM", "Opacity"), LUNG),
    "Lung Lesion": LabelCoding(Code("52988006", "SCT", "Lesion"), LUNG),
    "Edema": LabelCoding(Code("19242006", "SCT", "Pulmonary edema"), LUNG),
    "Consolidation": LabelCoding(Code("95436008", "SCT", "Lung consolidation"), LUNG),
    "Pneumonia": LabelCoding(Code("233604007", "SCT", "Pneumonia"), LUNG),
    "Atelectasis": LabelCoding(Code("46621007", "SCT", "Atelectasis"), LUNG),
    "Pneumothorax": LabelCoding(Code("36118008", "SCT", "Pneumothorax"), PLEURA),
    "Pleural Effusion": LabelCoding(Code("60046008", "SCT", "Pleural effusion"), PLEURA),
    "Pleural Other": LabelCoding(Code("PLEURAL_OTHER", PRIVATE_SCHEME, "Other pleural abnormality"), PLEURA),
    "Fracture": LabelCoding(Code("125605004", "SCT", "Fracture of bone"), None),
    "Support Devices": LabelCoding(Code("49062001", "SCT", "Device"), None),
}

#: anatomical regions RadVLM grounds (Chest ImaGenome names) that have an exact code
REGIONS: dict[str, tuple[Code, Code | None]] = {
    "right lung": (LUNG, RIGHT),
    "left lung": (LUNG, LEFT),
    "cardiac silhouette": (HEART, None),
    "mediastinum": (MEDIASTINUM, None),
}

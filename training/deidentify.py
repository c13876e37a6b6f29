"""What the site's own studies shed before they leave the node as training data (``train export-site``).

The image goes as the model's 8-bit picture in a PNG, so no DICOM header goes with it, and an image
whose header says it carries burned-in text is left out. The signed report keeps its clinical text and
measurements and loses, as MIMIC-CXR's reports show it (``___``), what could name the patient: the
names and identifiers this study's own header holds, and by pattern any date, time, phone number,
e-mail address, long number and the name after a title (Dr., Mrs., ...). A year alone stays.

Presidio and similar tools find names with NER models that a hospital network can rarely fetch; the
header gives the exact identifiers of this patient, which patterns alone would miss.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

REDACTED = "___"

_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                  "NameOfPhysiciansReadingStudy", "RequestingPhysician", "PatientMotherBirthName")
_ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "AdmissionID",
                "MedicalRecordLocator")
_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail
    r"(?<![\d.])\d{1,4}([/.-])\d{1,2}\1\d{2,4}(?![\d])(?!\.\d)",  # 12/03/2024, 2024-03-12, 12.03.24
    rf"\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?\b(?:,?\s+\d{{4}}\b)?",  # March 12, 2024
    rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}(?:,?\s+\d{{4}}\b)?",  # 12 March 2024
    rf"\b{_MONTH}\s+\d{{4}}\b",  # March 2024
    r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\s?[ap]\.?m\b\.?)?",  # 14:30, 2:30 pm
    r"\b\d{1,2}\s?[ap]\.?m\b\.?",  # 3 pm
    r"(?:\+\d{1,3}[ .-]?)?\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b",  # phone
    r"\b\d{6,}\b",  # record and accession numbers, DICOM dates
))
_TITLED_NAME = re.compile(r"\b((?i:dr|doctor|mr|mrs|ms|miss|prof|professor|nurse)\.?\s+)"
                          r"[A-Z][A-Za-z'-]+(?:\s+[A-Z][a-z'-]+)?")


@dataclass(frozen=True)
class Identifiers:
    """The strings of one study that name its patient or staff: removed wherever they appear in text."""

    words: frozenset[str]

    @classmethod
    def of(cls, ds: Dataset, *people: str) -> Identifiers:
        """The names and IDs of ``ds``'s header, plus ``people`` (DICOM person names, e.g. the signer)."""
        names: list[str] = list(people)
        for keyword in _NAME_KEYWORDS:
            names.extend(str(value) for value in _values(ds.get(keyword)))
        words = {part for name in names for part in _name_parts(name) if len(part) >= 2}
        for keyword in _ID_KEYWORDS:
            words.update(value for value in (str(v).strip() for v in _values(ds.get(keyword))) if len(value) >= 3)
        return cls(frozenset(words))


def scrub(text: str, identifiers: Identifiers) -> str:
    """``text`` with the study's identifiers, dates, times, numbers that identify and titled names as ``___``."""
    for word in sorted(identifiers.words, key=len, reverse=True):  # "Smith-Jones" before "Smith"
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", REDACTED, text, flags=re.IGNORECASE)
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return _TITLED_NAME.sub(lambda m: m.group(1) + REDACTED, text)


def burned_in(ds: Dataset) -> bool:
    """The header says the pixels carry text (a name, a date) that no header removal can take out."""
    return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"


def _values(value: object) -> Iterable[object]:
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple, MultiValue)):
        return [v for v in value if v not in (None, "")]
    return (value,)


def _name_parts(name: str) -> list[str]:
    person = PersonName(name)
    parts = [person.family_name, person.given_name, person.middle_name]
    return [word for part in parts for word in re.split(r"[\s,]+", part) if word]

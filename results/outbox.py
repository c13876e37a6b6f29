"""The outbox: each produced object, per destination, until the destination confirms it.

Objects are built once, when a result is stored, with UIDs derived from (study, version, model
revision, kind, image), and their bytes are kept: every retry sends the same instance. A result of
a later study version names the earlier objects as predecessor documents.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, EnhancedSRStorage
from sqlalchemy import select
from sqlalchemy.orm import Session

from records.metrics import OBJECTS_NOT_BUILT
from records.pixels import ModelImage
from records.schema import StudyResult
from records.settings import DeliverySettings, Destination, FhirSettings, HL7Settings, Settings
from records.tables import DeliveryState, Job, KeptObject, OutboxItem
from records.text import one_line
from results.authorship import Device
from results.capture import burned_in_capture
from results.fhir import report_bundle
from results.gsps import presentation_state
from results.hl7 import oru_message
from results.narrative import narrative_report
from results.placement import Placement
from results.sr import measurement_report

log = logging.getLogger(__name__)

SERIES_NUMBERS = {"sr": 9901, "narrative": 9902, "gsps": 9903, "sc": 9904, "verified-sr": 9905}
RIS = "ris"  # the destination name of HL7 results
EHR = "ehr"  # the destination name of FHIR results
SR_CLASSES = {"sr": Comprehensive3DSRStorage, "narrative": EnhancedSRStorage}


try:
    SOFTWARE_VERSION = package_version("radvlm-pacs")
except PackageNotFoundError:  # running from a checkout that was not installed
    SOFTWARE_VERSION = "0+unknown"


Deliver = Callable[[list[int]], None]  # hands outbox item ids to whatever sends them


@dataclass(frozen=True)
class BuiltObject:
    """One encoded result object, ready for the outbox: its ``kind`` (sr, narrative, gsps, sc, hl7, fhir), the UID a
    destination knows it by, and the bytes every retry sends unchanged."""

    kind: str
    sop_instance_uid: str  # or the HL7 message control ID
    sop_class_uid: str | None
    payload: bytes
    series_instance_uid: str | None = None  # DICOM objects


# kind -> (image header, image result, model image, device, placement, earlier SRs of the kind) -> dataset
BUILDERS: dict[str, Callable[..., Dataset]] = {
    "sr": lambda header, image, _, device, place, earlier: measurement_report(header, image, device, place,
                                                                               previous=earlier),
    "narrative": lambda header, image, _, device, place, earlier: narrative_report(header, image, device, place,
                                                                                   previous=earlier),
    "gsps": lambda header, image, _, device, place, earlier: presentation_state(header, image, device, place),
    "sc": lambda header, image, pixels, device, place, earlier: burned_in_capture(header, pixels, image, device,
                                                                                  place),
}


def encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file, preamble and file meta included: the bytes kept and sent."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def placement(result: StudyResult, kind: str, image_uid: str, number: int, when: datetime) -> Placement:
    """Where the ``kind`` object about one image goes: UIDs derived from the job, the same every time."""
    key = [result.study_instance_uid, str(result.study_version), result.model_revision, kind]
    return Placement(series_instance_uid=str(generate_uid(entropy_srcs=[*key, "series"])),
                     sop_instance_uid=str(generate_uid(entropy_srcs=[*key, image_uid])),
                     content_datetime=when, series_number=SERIES_NUMBERS[kind], instance_number=number)


@dataclass
class Built:
    """The objects of a result that could be built, and one line per object that could not."""

    objects: list[BuiltObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def attempt(self, kind: str, what: str, make: Callable[..., BuiltObject], *args: Any) -> None:
        """Build one object, ``make(*args)``; a failure costs that object only, with its reason kept and counted."""
        try:
            self.objects.append(make(*args))
        except Exception as exc:  # a bug or an input this builder cannot take: the other objects still go
            problem = one_line(f"{what} not built: {type(exc).__name__}: {exc}")
            log.error("%s", problem, exc_info=True)
            OBJECTS_NOT_BUILT.labels(kind).inc()
            self.problems.append(problem)


def _dicom_object(kind: str, *args: Any) -> BuiltObject:
    ds = BUILDERS[kind](*args)
    return BuiltObject(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), encode(ds), str(ds.SeriesInstanceUID))


def build_objects(result: StudyResult, headers: dict[str, Dataset], model_images: dict[str, ModelImage],
                  kinds: set[str], device: Device, when: datetime,
                  previous: Sequence[Dataset] = ()) -> Built:
    """The DICOM objects of ``result`` for ``kinds``; ``previous`` are earlier versions' SRs. Each object is
    built on its own: one that fails (highdicom refusing a GSPS) costs neither the SR nor the other images'."""
    built = Built()
    for number, image in enumerate(result.images, start=1):
        header = headers[image.sop_instance_uid]
        for kind in sorted(kinds):
            if kind not in BUILDERS:
                raise ValueError(f"unknown object kind {kind!r}")
            place = placement(result, kind, image.sop_instance_uid, number, when)
            earlier = [p for p in previous if p.SOPClassUID == SR_CLASSES[kind]] if kind in SR_CLASSES else []
            built.attempt(kind, f"{kind} of image {number} ({image.sop_instance_uid})", _dicom_object, kind,
                          header, image, model_images[image.sop_instance_uid], device, place, earlier)
    return built


def previous_reports(session: Session, study_id: int, before_version: int) -> list[Dataset]:
    """The SRs (both kinds) produced for the latest earlier version of the study (for predecessors)."""
    rows = session.execute(
        select(OutboxItem.object_uid, OutboxItem.payload, Job.study_version)
        .join(Job, Job.id == OutboxItem.job_id)
        .where(OutboxItem.study_id == study_id, OutboxItem.kind.in_(SR_CLASSES),
               Job.study_version < before_version)
        .order_by(Job.study_version.desc())
    ).all()
    if not rows:
        return []
    latest = rows[0][2]
    unique = {uid: payload for uid, payload, version in rows if version == latest}
    return [dcmread(io.BytesIO(payload)) for payload in unique.values()]


def hl7_result(result: StudyResult, header: Dataset, hl7: HL7Settings, urgent: Collection[str], when: datetime,
               final: bool = False, interpreter: str | None = None) -> BuiltObject:
    """The study's ORU^R01, with a control ID derived from the job (MSH-10 holds 20 characters);
    ``final``: the signed-off report, which gets a control ID of its own, and names ``interpreter``."""
    control_id = hashlib.sha1(result.identity(final).encode()).hexdigest()[:20]
    er7 = oru_message(header, result, control_id, when, sending_application=hl7.sending_application,
                      sending_facility=hl7.sending_facility, receiving_application=hl7.receiving_application,
                      receiving_facility=hl7.receiving_facility, urgent=set(urgent), final=final,
                      interpreter=interpreter)
    return BuiltObject("hl7", control_id, None, er7.encode())


def fhir_result(result: StudyResult, header: Dataset, fhir: FhirSettings, urgent: Collection[str], when: datetime,
                final: bool = False, interpreter: str | None = None) -> BuiltObject:
    """The study's FHIR transaction Bundle, identified like its HL7 message by the job (and ``final``)."""
    bundle = report_bundle(result, header, fhir, urgent, when, final=final, interpreter=interpreter)
    return BuiltObject("fhir", hashlib.sha1(result.identity(final).encode()).hexdigest()[:40], None,
                       bundle.model_dump_json().encode())


def enqueue(session: Session, job: Job, objects: Sequence[BuiltObject], destinations: Sequence[Destination],
            policy: DeliverySettings, now: datetime) -> list[OutboxItem]:
    """One row per object and destination that takes it; the HL7 result goes to the RIS."""
    targets = [(obj, dest.name) for dest in destinations for obj in objects if obj.kind in dest.objects]
    targets += [(obj, RIS) for obj in objects if obj.kind == "hl7"]
    targets += [(obj, EHR) for obj in objects if obj.kind == "fhir"]
    items = [OutboxItem(job_id=job.id, study_id=job.study_id, kind=obj.kind, destination=name,
                        object_uid=obj.sop_instance_uid, sop_class_uid=obj.sop_class_uid, payload=obj.payload,
                        state=DeliveryState.pending, attempts=0, created_at=now, next_attempt_at=now,
                        deliver_by=now + timedelta(seconds=policy.deliver_for_s))
             for obj, name in targets]
    session.add_all(items)
    session.flush()
    return items


@dataclass(frozen=True)
class Routing:
    """Where results go: the destinations, their retry policy, and the device that signs them."""

    destinations: Sequence[Destination] = ()
    policy: DeliverySettings = field(default_factory=DeliverySettings)
    station_name: str = "RADVLM"
    hl7: HL7Settings | None = None
    fhir: FhirSettings | None = None
    kept: Sequence[str] = ()  # kinds kept for the node's own DICOMweb service

    @classmethod
    def of(cls, settings: Settings) -> Routing:
        return cls(destinations=settings.destinations, policy=settings.delivery, station_name=settings.node.ae_title,
                   hl7=settings.hl7, fhir=settings.fhir, kept=settings.dicomweb.results)

    def kinds(self) -> set[str]:
        return {kind for destination in self.destinations for kind in destination.objects} | set(self.kept)


def keep(session: Session, job: Job, objects: Sequence[BuiltObject], kinds: Sequence[str], now: datetime) -> None:
    """Keep the objects of ``kinds`` for the node's DICOMweb service (QIDO-RS, WADO-RS)."""
    session.add_all(KeptObject(job_id=job.id, study_id=job.study_id, kind=obj.kind,
                               series_instance_uid=obj.series_instance_uid, sop_instance_uid=obj.sop_instance_uid,
                               sop_class_uid=obj.sop_class_uid, payload=obj.payload, created_at=now)
                    for obj in objects if obj.kind in kinds and obj.series_instance_uid)

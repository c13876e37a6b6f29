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
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, EnhancedSRStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.pixels import ModelImage
from records.audit import PROCESS_USER, Outcome, process_host, record
from records.metrics import DELIVERIES, DELIVERY_LATENCY, OBJECTS_NOT_BUILT
from records.schema import StudyResult
from records.settings import DeliverySettings, Destination, FhirSettings, HL7Settings
from records.tables import DeliveryState, Job, OutboxItem, Study
from records.text import one_line
from worker.delivery.capture import burned_in_capture
from worker.delivery.equipment import Device, Placement
from worker.delivery.fhir import post_bundle, report_bundle
from worker.delivery.gsps import presentation_state
from worker.delivery.hl7 import mllp_send, oru_message
from worker.delivery.narrative import narrative_report
from worker.delivery.send import Attempt, c_store
from worker.delivery.sr import measurement_report
from worker.delivery.stow import stow

log = logging.getLogger(__name__)

SERIES_NUMBERS = {"sr": 9901, "narrative": 9902, "gsps": 9903, "sc": 9904, "verified-sr": 9905}
RIS = "ris"  # the destination name of HL7 results
EHR = "ehr"  # the destination name of FHIR results
SR_CLASSES = {"sr": Comprehensive3DSRStorage, "narrative": EnhancedSRStorage}
LEASE = timedelta(minutes=5)  # an attempt in flight keeps others off the item this long


@dataclass(frozen=True)
class BuiltObject:
    kind: str
    sop_instance_uid: str  # or the HL7 message control ID
    sop_class_uid: str | None
    payload: bytes
    series_instance_uid: str | None = None  # DICOM objects


Send = Callable[[str, str, bytes], Attempt]  # (kind, destination name, payload) -> outcome


def sender(destinations: Sequence[Destination], hl7: HL7Settings | None, calling_ae: str,
           policy: DeliverySettings, fhir: FhirSettings | None = None) -> Send:
    """How each kind of object travels: DICOM by C-STORE or STOW-RS to its destination, HL7 by MLLP to the
    RIS, FHIR by a transaction POST to the EHR."""
    by_name = {d.name: d for d in destinations}

    def send(kind: str, name: str, payload: bytes) -> Attempt:
        if kind == "fhir":
            if fhir is None:
                return Attempt(False, False, "no FHIR endpoint is configured any more")
            return post_bundle(payload, fhir, policy.timeout_s)
        if kind == "hl7":
            if hl7 is None:
                return Attempt(False, False, "no HL7 endpoint is configured any more")
            return mllp_send(payload, hl7.host, hl7.port, policy.timeout_s)
        if name not in by_name:
            return Attempt(False, False, f"destination {name!r} is no longer configured")
        if by_name[name].stow_url:
            return stow(payload, by_name[name], policy.timeout_s)
        return c_store(payload, by_name[name], calling_ae, policy.timeout_s)

    return send


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


def _backoff(policy: DeliverySettings, attempts: int) -> timedelta:
    return timedelta(seconds=min(policy.max_backoff_s, policy.retry_backoff_s * 2 ** max(0, attempts - 1)))


def deliver_item(sessions: sessionmaker[Session], item_id: int, send: Send, policy: DeliverySettings,
                 clock: Callable[[], datetime]) -> float | None:
    """One attempt at one item. Return None when it is settled, else seconds until it is due again."""
    now = clock()
    with sessions() as session, session.begin():
        item = session.get(OutboxItem, item_id, with_for_update=True)
        if item is None or item.state is not DeliveryState.pending:
            return None
        if item.next_attempt_at > now:
            return (item.next_attempt_at - now).total_seconds()
        item.next_attempt_at = now + LEASE  # claimed: a second deliverer waits
        item.attempts += 1
        payload, name, kind, uid = item.payload, item.destination, item.kind, item.object_uid
    outcome = send(kind, name, payload)
    attempt_detail, delivered, retry = outcome.detail, outcome.delivered, outcome.retry
    now = clock()  # a send can take up to the timeout
    with sessions() as session, session.begin():
        item = session.get_one(OutboxItem, item_id, with_for_update=True)
        item.last_error = None if delivered else attempt_detail

        def audit(detail: str, outcome: Outcome = Outcome.success) -> None:  # settled: sent or given up
            action = "export" if kind in ("hl7", "fhir") else "deliver"
            record(session, action, at=now, user=PROCESS_USER, role="delivery",
                   client=process_host(), study_uid=session.get_one(Study, item.study_id).study_instance_uid,
                   detail=detail, outcome=outcome)

        if delivered:
            audit(detail=f"{kind} {uid} to {name}")
            item.state, item.sent_at = DeliveryState.sent, now
            log.info("%s %s delivered to %s", kind, uid, name)
            DELIVERIES.labels(kind, "sent").inc()
            DELIVERY_LATENCY.labels(kind).observe(max(0.0, (now - item.created_at).total_seconds()))
            return None
        due = now + _backoff(policy, item.attempts)
        if not retry or due > item.deliver_by:
            audit(detail=f"{kind} {uid} to {name} given up after {item.attempts} attempt(s): {attempt_detail}",
                  outcome=Outcome.serious_failure)
            item.state = DeliveryState.failed
            DELIVERIES.labels(kind, "failed").inc()
            log.error("%s %s to %s failed for good after %d attempt(s): %s", kind, uid, name, item.attempts,
                      attempt_detail)
            return None
        item.next_attempt_at = due
        DELIVERIES.labels(kind, "retry").inc()
        log.warning("%s %s to %s not delivered (%s); next attempt in %.0f s", kind, uid, name, attempt_detail,
                    (due - now).total_seconds())
        return (due - now).total_seconds()


def due_items(session: Session, now: datetime) -> list[int]:
    """Pending items whose time has come: the sweep after a restart or a lost message."""
    return list(session.scalars(select(OutboxItem.id).where(OutboxItem.state == DeliveryState.pending,
                                                            OutboxItem.next_attempt_at <= now)
                                .order_by(OutboxItem.id)))

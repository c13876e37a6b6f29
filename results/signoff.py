"""A radiologist's sign-off: the draft as accepted or edited becomes a verified SR, sent as a new version.

The verified SR (COMPLETE, FINAL, VERIFIED; the radiologist as verifying observer) names the
AI draft SR of the same image as its predecessor and goes wherever the drafts go; the RIS gets a
final ORU. The draft's UIDs are derived from the job, so the draft is rebuilt here to be
referenced, whether or not a destination ever took it. One sign-off per analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from records.clock import Clock
from records.findings import CHEXPERT_LABELS, FINDINGS, labels_of
from records.latest import latest_job
from records.schema import ImageResult, StudyResult
from records.storage import InstanceStore, removed
from records.tables import Job, SignOff, Study, StudyState
from results.agreement import count_sign_off, drafted_findings
from results.authorship import Device, Verifier
from results.outbox import (
    SOFTWARE_VERSION,
    BuiltObject,
    Routing,
    encode,
    enqueue,
    fhir_result,
    hl7_result,
    keep,
    placement,
)
from results.sr import measurement_report


class SignOffRefused(Exception):
    """The sign-off cannot be taken; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


@dataclass(frozen=True)
class Signed:
    """What the radiologist signs: the report text and the CheXpert labels present."""

    report: str
    findings: frozenset[str]

    def labels(self) -> dict[str, bool]:
        return labels_of(self.findings)


def signed_image(draft: ImageResult, signed: Signed) -> ImageResult:
    """The draft with the signed text and labels; boxes only for findings the radiologist kept."""
    labels = signed.labels()
    groundings = [g for g in draft.groundings if g.kind != "abnormality" or labels.get(g.label)]
    return draft.model_copy(update={"report": draft.report.model_copy(update={"text": signed.report}),
                                    "labels": labels, "groundings": groundings})


def is_edited(draft: StudyResult, signed: Signed) -> bool:
    """Whether the radiologist changed the draft: its report text (surrounding whitespace aside) or the findings of its
    first image, the ones the page showed."""
    return signed.report.strip() != draft.images[0].report.text.strip() or drafted_findings(draft) != signed.findings


def _latest_job(session: Session, study: Study) -> Job:
    job = latest_job(session, study, current_version=True, lock=True)
    if job is None or job.result is None:
        raise SignOffRefused(409, "no draft to sign off", f"study {study.study_instance_uid} is {study.state.value}")
    return job


def sign_off(sessions: sessionmaker[Session], store: InstanceStore, study_uid: str, user_name: str,
             verifier: Verifier, signed: Signed, outputs: Routing, clock: Clock) -> list[int]:
    """Record the sign-off and queue the verified objects; returns the new outbox items to deliver."""
    unknown = sorted(set(signed.findings) - set(FINDINGS))
    if unknown:
        raise SignOffRefused(422, "unknown finding", f"not a CheXpert finding label: {', '.join(unknown)}")
    if not signed.report.strip():
        raise SignOffRefused(422, "empty report", "the signed report has no text")
    try:
        items, drafted, edited = _sign_off(sessions, store, study_uid, user_name, verifier, signed, outputs, clock)
    except IntegrityError as exc:  # a second radiologist signed the same draft at the same moment
        raise SignOffRefused(409, "already signed off", "another sign-off of this draft was just stored") from exc
    count_sign_off(drafted, signed.findings, edited)  # once stored: a refused sign-off counts nowhere
    return items


def _sign_off(sessions: sessionmaker[Session], store: InstanceStore, study_uid: str, user_name: str,
              verifier: Verifier, signed: Signed, outputs: Routing,
              clock: Clock) -> tuple[list[int], frozenset[str], bool]:
    """The new outbox items, the findings the draft named and whether the radiologist changed it."""
    with sessions() as session, session.begin():
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid).with_for_update())
        if study is None:
            raise SignOffRefused(404, "unknown study", f"no study {study_uid} has been received")
        job = _latest_job(session, study)
        earlier = session.scalar(select(SignOff).where(SignOff.job_id == job.id))
        if earlier is not None:
            raise SignOffRefused(409, "already signed off",
                                 f"signed off by {earlier.user_name} at {earlier.signed_at.isoformat()}")
        draft = StudyResult.model_validate(job.result.payload)
        instances = {i.sop_instance_uid: i for i in study.instances}
        gone = [instances[image.sop_instance_uid].removed_at for image in draft.images
                if instances[image.sop_instance_uid].removed_at]
        if gone:  # the verified SR copies the image's header
            raise SignOffRefused(410, "images removed", f"study {study_uid}: {removed(max(gone))}; sign it off there")
        now = clock()
        device = Device(model_id=job.model_id, model_revision=job.model_revision, software_version=SOFTWARE_VERSION,
                        station_name=outputs.station_name)
        objects, final_images, headers = [], [], []
        for number, image in enumerate(draft.images, start=1):
            header = dcmread(store.path(instances[image.sop_instance_uid].path), stop_before_pixels=True)
            headers.append(header)
            predecessor = measurement_report(header, image, device, placement(draft, "sr", image.sop_instance_uid,
                                                                              number, job.finished_at or now))
            final = signed_image(image, signed)
            final_images.append(final)
            verified = measurement_report(header, final, device,
                                          placement(draft, "verified-sr", image.sop_instance_uid, number, now),
                                          previous=[predecessor], verifier=verifier)
            objects.append(BuiltObject("sr", str(verified.SOPInstanceUID), str(verified.SOPClassUID),
                                       encode(verified), str(verified.SeriesInstanceUID)))
        final_result = draft.model_copy(update={"images": final_images})
        urgent = outputs.policy.urgent_findings
        if outputs.hl7 is not None:
            objects.append(hl7_result(final_result, headers[0], outputs.hl7, urgent, now, final=True,
                                      interpreter=verifier.observer_name))
        if outputs.fhir is not None:
            objects.append(fhir_result(final_result, headers[0], outputs.fhir, urgent, now, final=True,
                                       interpreter=verifier.observer_name))
        items = enqueue(session, job, objects, outputs.destinations, outputs.policy, now)
        keep(session, job, objects, outputs.kept, now)
        drafted, edited = drafted_findings(draft), is_edited(draft, signed)
        session.add(SignOff(study_id=study.id, job_id=job.id, user_name=user_name,
                            observer_name=verifier.observer_name, report=signed.report,
                            findings=sorted(signed.findings), drafted=sorted(drafted), edited=edited,
                            sr_uid=objects[0].sop_instance_uid, signed_at=now))
        study.state, study.state_reason = StudyState.signed_off, f"signed off by {user_name}"
        study.findings = [label for label in CHEXPERT_LABELS if label in signed.findings]
        return [item.id for item in items], drafted, edited

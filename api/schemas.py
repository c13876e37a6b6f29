"""What the API returns: public views of studies, built from the tables and the stored result."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from records.audit import EVENT_TYPES
from records.findings import FINDINGS
from records.schema import Box
from records.tables import AuditEvent, Conversation, Exchange, SignOff
from records.text import plain_text

PlainText = Annotated[str, AfterValidator(plain_text)]  # what a person types, as the database and DICOM hold it

Finding = Literal[FINDINGS]  # type: ignore[valid-type]


class StudyPublic(BaseModel):
    """A study on the worklist: its state and why (reason), its patient and accession as the images name them, its
    priority (0 STAT, 5 routine) and its version (a new one when images arrive after completion, or on reanalysis)."""

    study_instance_uid: str
    state: str
    reason: str | None
    version: int
    priority: int
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    last_received_at: datetime
    findings: list[str] | None = Field(description="CheXpert findings of the newest draft (any image), or those "
                                                   "signed once signed off; null before the first analysis")
    urgent: list[str] = Field(description="those of the findings the site counts as urgent "
                                          "(delivery.urgent_findings)")


class StudiesPublic(BaseModel):
    """A page of the studies you may see; count is how many match the filters in all, whatever the limit and offset."""

    data: list[StudyPublic]
    count: int


class InstancePublic(BaseModel):
    """One received image of the study: the study version it arrived in, whether it was chosen for analysis (null until
    the study is complete) and why, and why its pixels could not be read, if so."""

    sop_instance_uid: str
    series_instance_uid: str
    version: int
    selected: bool | None
    reason: str | None
    pixel_error: str | None
    removed_at: datetime | None = Field(description="its file was removed then (node.keep_images_days)")


class DeliveryPublic(BaseModel):
    """One produced object (kind sr, narrative, gsps, sc, hl7 or fhir) for one destination: pending until the
    destination confirms it (sent); failed once refused for good or not delivered in time."""

    kind: str
    destination: str
    object_uid: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class SignOffIn(BaseModel):
    """The report as the radiologist signs it: the draft's text and findings, accepted or edited."""

    report: PlainText = Field(min_length=1, max_length=10000)
    findings: list[Finding] = Field(description="the CheXpert labels present; none means No Finding")


class SignOffPublic(BaseModel):
    """A radiologist's sign-off of the draft: the report and findings as signed, whether they differ from the draft
    (edited), and the UID of the verified SR sent out."""

    user_name: str
    observer_name: str
    report: str
    findings: list[str]
    edited: bool
    sr_uid: str
    signed_at: datetime

    @classmethod
    def of(cls, row: SignOff) -> SignOffPublic:
        return cls(user_name=row.user_name, observer_name=row.observer_name, report=row.report,
                   findings=row.findings, edited=row.edited, sr_uid=row.sr_uid, signed_at=row.signed_at)


class SignOffResult(SignOffPublic):
    """The sign-off just recorded, with how many objects it queued for delivery."""

    deliveries: int = Field(description="objects queued for the destinations and the RIS")


class StudyDetail(StudyPublic):
    """A study with its images, the result of its newest finished analysis (null before one), where the delivery of each
    object stands, and its sign-off (null until signed)."""

    instances: list[InstancePublic]
    result: dict[str, Any] | None  # records.schema.StudyResult of the newest finished job
    problems: list[str] = Field(default_factory=list,
                                description="that job's result objects (SR, GSPS, HL7, ...) that could not be built, "
                                            "one line each with the reason; the others were delivered")
    deliveries: list[DeliveryPublic]
    sign_off: SignOffPublic | None


class ConversationIn(BaseModel):
    """Which analysed image of the study a new conversation is about."""

    sop_instance_uid: str | None = Field(default=None, max_length=64,
                                         description="the image to talk about; default: the first analysed one")


class QuestionIn(BaseModel):
    """A question about the conversation's image (control characters dropped); the model answers it with the
    conversation's earlier questions and answers as history."""

    text: PlainText = Field(min_length=1, max_length=2000, pattern=r"\S")


class ExchangePublic(BaseModel):
    """One question and the model's answer: state queued, answering, answered or failed (error says why); malformed says
    what in the answer was bracketed but is not a valid box."""

    id: int
    position: int
    question: str
    answer: str | None
    boxes: list[Box] = Field(description="boxes in the answer, normalised and in pixels of the original image")
    malformed: str | None
    state: str
    error: str | None
    asked_at: datetime
    answered_at: datetime | None

    @classmethod
    def of(cls, row: Exchange) -> ExchangePublic:
        return cls(id=row.id, position=row.position, question=row.question, answer=row.answer,
                   boxes=[Box.model_validate(b) for b in row.boxes or []], malformed=row.malformed,
                   state=row.state.value, error=row.error, asked_at=row.asked_at, answered_at=row.answered_at)


class ConversationPublic(BaseModel):
    """A radiologist's conversation with the model about one image of a study, its questions and answers in the order
    asked."""

    id: int
    study_instance_uid: str
    sop_instance_uid: str
    user_name: str
    created_at: datetime
    exchanges: list[ExchangePublic]

    @classmethod
    def of(cls, row: Conversation, study_uid: str) -> ConversationPublic:
        return cls(id=row.id, study_instance_uid=study_uid, sop_instance_uid=row.sop_instance_uid,
                   user_name=row.user_name, created_at=row.created_at,
                   exchanges=[ExchangePublic.of(e) for e in row.exchanges])


class UserPublic(BaseModel):
    """The user a token belongs to: role radiologist, admin or sender, and person_name the DICOM name (Family^Given)
    that the reports they sign off carry."""

    name: str
    role: str
    person_name: str


class FindingAgreementPublic(BaseModel):
    """How the drafts fared at sign-off for one CheXpert finding: each sign-off counted once, by whether the draft and
    the signed report named the finding."""

    label: str = Field(description="a CheXpert finding")
    kept: int = Field(description="drafted and signed")
    removed: int = Field(description="drafted, not signed")
    added: int = Field(description="signed, not drafted")
    absent: int = Field(description="in neither")
    ppv: float | None = Field(description="kept / drafted; null when no draft named it")
    sensitivity: float | None = Field(description="kept / signed; null when no sign-off had it")
    f1: float | None


class AgreementPublic(BaseModel):
    """How one model revision's drafts fared at sign-off: how many were signed off and edited, and for each finding."""

    model_id: str
    model_revision: str
    sign_offs: int
    edited: int = Field(description="sign-offs whose report text or findings differ from the draft")
    findings: list[FindingAgreementPublic]


class AuditEventPublic(BaseModel):
    """One audit event (IHE ATNA): who did what to which study, when, from which address (client), and how it ended."""

    at: datetime
    user_name: str = Field(description="an API user, or the calling AE title / process of the node and workers")
    role: str
    action: str
    event_id: str = Field(description="DCM code of the event (PS3.16 CID 400), e.g. 110103 Instances Accessed")
    event_action_code: str = Field(description="C create, R read, U update, D delete, E execute")
    outcome: int = Field(description="0 success, 4 minor, 8 serious, 12 major failure")
    study_instance_uid: str | None
    detail: str | None
    client: str | None

    @classmethod
    def of(cls, row: AuditEvent) -> AuditEventPublic:
        kind = EVENT_TYPES[row.action]
        return cls(at=row.at, user_name=row.user_name, role=row.role, action=row.action, event_id=kind.code,
                   event_action_code=kind.action_code, outcome=row.outcome,
                   study_instance_uid=row.study_instance_uid, detail=row.detail, client=row.client)

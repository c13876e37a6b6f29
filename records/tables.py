"""Database tables. The caller owns every transaction: nothing here commits."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, also on SQLite (which drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    """The tables' declarative base: every ``datetime`` column is a ``UTCDateTime`` (aware UTC in and out)."""

    type_annotation_map = {datetime: UTCDateTime()}


class StudyState(str, enum.Enum):
    """Where a study stands. ``receiving`` until it has been quiet for the stable age."""

    receiving = "receiving"
    ready = "ready"  # complete, has at least one frontal chest image: to be analysed
    nothing_to_analyse = "nothing_to_analyse"  # complete, but no usable frontal chest image
    analysing = "analysing"
    analysed = "analysed"
    signed_off = "signed_off"  # a radiologist verified the draft; the verified SR went out
    failed = "failed"  # analysis failed for good; the reason says why


class DeliveryState(str, enum.Enum):
    """Where an outbox item stands: only a pending one is sent (again); a requested resend makes one pending anew."""

    pending = "pending"  # waiting for its first or next attempt
    sent = "sent"  # the destination confirmed it
    failed = "failed"  # refused for good, or not delivered within the configured time


class JobState(str, enum.Enum):
    """Where an analysis job stands. done, failed and superseded are final: a task delivered again for such a job does
    nothing; a reanalysis is a new study version, hence a new job."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    superseded = "superseded"  # a newer version of the study arrived before this one ran


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


# A study's priority, as the gpu queue serves it (Redis transport: a lower number first). The node records it
# at completion from the study's headers (STAT rules); dispatch queues the study with it.
STAT_PRIORITY, ROUTINE_PRIORITY = 1, 5


class Study(Base):
    """A study as received. ``version`` grows by one each time an instance reopens it after completion."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.receiving, index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime] = mapped_column(index=True)

    instances: Mapped[list[Instance]] = relationship(back_populates="study", order_by="Instance.id")
    versions: Mapped[list[StudyVersion]] = relationship(back_populates="study", order_by="StudyVersion.version")
    priority: Mapped[int] = mapped_column(Integer, default=ROUTINE_PRIORITY, doc="1 = STAT (first), 5 = routine")
    findings: Mapped[list | None] = mapped_column(JSON, doc="CheXpert findings of the newest draft (any image), "
                                                             "or those signed once signed off; None before")


class Instance(Base):
    """One stored SOP instance: where its bytes are, and whether it is a frontal chest image."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer, doc="the study version this instance arrived in")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="relative to the storage folder")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    calling_host: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]
    selected: Mapped[bool | None] = mapped_column(doc="None until the study completes")
    selection_reason: Mapped[str | None] = mapped_column(Text)
    pixel_error: Mapped[str | None] = mapped_column(Text)
    removed_at: Mapped[datetime | None] = mapped_column(doc="the file was removed then (node.keep_images_days); "
                                                            "the row stays for the study's history")

    study: Mapped[Study] = relationship(back_populates="instances")

    @property
    def usable(self) -> bool:
        """A frontal chest image that decodes and is still on disk: what an analysis reads."""
        return bool(self.selected) and not self.pixel_error and self.removed_at is None


class StudyVersion(Base):
    """A completed version of a study: the persisted "study ready" event, made once per version.

    ``dispatched_at`` stays empty until the consumer (the analysis queue) has taken the event,
    so a restart re-sends what was never taken and nothing that was.
    """

    __tablename__ = "study_versions"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    completed_at: Mapped[datetime]
    outcome: Mapped[StudyState] = mapped_column(_enum(StudyState))
    reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer)
    selected_count: Mapped[int] = mapped_column(Integer)
    dispatched_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="versions")


class Job(Base):
    """One analysis of one study version by one model revision: the key that makes results unique."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "study_version", "model_revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(200))
    model_revision: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200), doc="the GPU worker (its name in worker.presence) "
                                                                 "that claimed it last; None in serve")

    result: Mapped[Result | None] = relationship(back_populates="job")


class Result(Base):
    """The stored ``records.schema.StudyResult`` of a job: at most one per job."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    schema_version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime]

    job: Mapped[Job] = relationship(back_populates="result")


class OutboxItem(Base):
    """One object for one destination, kept until the destination confirms it.

    The encoded object is stored, with its SOP Instance UID (or HL7 control ID), so every retry
    sends the same bytes and a destination that got it twice sees the same instance twice.
    """

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("object_uid", "destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), doc="sr, narrative, gsps, sc or hl7")
    destination: Mapped[str] = mapped_column(String(64))
    object_uid: Mapped[str] = mapped_column(String(64), doc="SOP Instance UID or HL7 message control ID")
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.pending, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime] = mapped_column(index=True)
    deliver_by: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class KeptObject(Base):
    """A DICOM object the node produced and keeps for its own DICOMweb service (QIDO-RS, WADO-RS),
    whatever the destinations: its bytes as sent, and the UIDs a query names it by."""

    __tablename__ = "kept_objects"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), doc="sr, narrative, gsps or sc")
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class ExchangeState(str, enum.Enum):
    """Where a question stands. A queued or answering one holds back the conversation's next question until
    ``api.chat_timeout_s`` has passed; then it counts as lost."""

    queued = "queued"  # asked, waiting for the model
    answering = "answering"
    answered = "answered"
    failed = "failed"  # the model could not answer; the error says why


class Conversation(Base):
    """A radiologist's conversation with the model about one analysed image of a study."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), doc="the image the conversation is about")
    user_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]

    exchanges: Mapped[list[Exchange]] = relationship(back_populates="conversation", order_by="Exchange.position")


class Exchange(Base):
    """One question and the model's answer: the rows of a conversation, in order, are its history."""

    __tablename__ = "exchanges"
    __table_args__ = (UniqueConstraint("conversation_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    boxes: Mapped[list | None] = mapped_column(JSON, doc="records.schema.Box list parsed from the answer")
    malformed: Mapped[str | None] = mapped_column(Text)
    state: Mapped[ExchangeState] = mapped_column(_enum(ExchangeState), default=ExchangeState.queued)
    error: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(200))
    model_revision: Mapped[str | None] = mapped_column(String(64))
    asked_at: Mapped[datetime]
    answered_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200), doc="the GPU worker answering it (worker.presence); "
                                                                 "None in serve")

    conversation: Mapped[Conversation] = relationship(back_populates="exchanges")


class SignOff(Base):
    """A radiologist's verification of a job's draft: the text and findings as signed, and the SR made."""

    __tablename__ = "sign_offs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True, unique=True)
    user_name: Mapped[str] = mapped_column(String(64))
    observer_name: Mapped[str] = mapped_column(String(324), doc="DICOM PN of the verifying observer")
    report: Mapped[str] = mapped_column(Text)
    findings: Mapped[list] = mapped_column(JSON, doc="CheXpert labels present, as signed")
    drafted: Mapped[list] = mapped_column(JSON, doc="CheXpert labels present in the draft's first image, as shown")
    edited: Mapped[bool]
    sr_uid: Mapped[str] = mapped_column(String(64), unique=True)
    signed_at: Mapped[datetime]


class AuditEvent(Base):
    """Who did what to which study, when, from where (records.audit: what each action means in DICOM)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[str | None] = mapped_column(Text)
    client: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0",
                                         doc="EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure")

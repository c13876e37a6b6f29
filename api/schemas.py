"""What the API returns: public views of studies, built from the tables and the stored result."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class StudyPublic(BaseModel):
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


class StudiesPublic(BaseModel):
    data: list[StudyPublic]
    count: int


class InstancePublic(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    version: int
    selected: bool | None
    reason: str | None
    pixel_error: str | None


class DeliveryPublic(BaseModel):
    kind: str
    destination: str
    object_uid: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class StudyDetail(StudyPublic):
    instances: list[InstancePublic]
    result: dict[str, Any] | None  # records.schema.StudyResult of the newest finished job
    deliveries: list[DeliveryPublic]

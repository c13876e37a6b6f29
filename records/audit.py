"""The audit trail in IHE ATNA style: who did what to which study, when, from where, and how it ended.

Every event is a row of ``audit_events`` (written in the caller's transaction) and, when a syslog
collector is configured, a DICOM audit message (PS3.15 A.5) in an RFC 5424 frame over UDP (RFC 5426).
What an action means in DICOM terms (event ID, action code) follows from its name, so the table
stores only the name. Patient names and IDs are never part of an event: the study is named by UID.
"""

from __future__ import annotations

import enum
import logging
import logging.handlers
import os
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from records.tables import AuditEvent

AUDIT_LOGGER = "radvlm.audit"


@dataclass(frozen=True)
class EventType:
    """DCM code of the event (PS3.16 CID 400) and its EventActionCode: Create, Read, Update, Delete, Execute."""

    code: str
    meaning: str
    action_code: str


_ACCESSED, _TRANSFERRED = ("110103", "DICOM Instances Accessed"), ("110104", "DICOM Instances Transferred")
EVENT_TYPES: dict[str, EventType] = {
    "receive": EventType(*_TRANSFERRED, "C"),  # instances of one study stored from one association
    "association_refused": EventType("110113", "Security Alert", "E"),
    "analyse": EventType(*_ACCESSED, "R"),
    "remove_images": EventType(*_ACCESSED, "D"),  # a study's received files deleted (node.keep_images_days)
    "deliver": EventType(*_TRANSFERRED, "R"),  # a result object sent to a DICOM peer
    "export": EventType("110106", "Export", "R"),  # a result sent as HL7 to the RIS
    "export_training": EventType("110106", "Export", "R"),  # a signed-off study, de-identified, to a training set
    "login_failed": EventType("110114", "User Authentication", "E"),
    "list_studies": EventType("110112", "Query", "E"),
    "read_study": EventType(*_ACCESSED, "R"),
    "read_image": EventType(*_ACCESSED, "R"),
    "read_conversations": EventType(*_ACCESSED, "R"),
    "read_conversation": EventType(*_ACCESSED, "R"),
    "start_conversation": EventType(*_ACCESSED, "R"),
    "ask": EventType(*_ACCESSED, "R"),
    "sign_off": EventType(*_ACCESSED, "C"),
    "read_audit": EventType("110101", "Audit Log Used", "R"),
    "read_agreement": EventType("110112", "Query", "E"),  # counts over sign-offs, no study named
}


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    success = 0
    minor_failure = 4  # e.g. some instances of an association refused, an API request refused (4xx)
    serious_failure = 8  # e.g. an analysis that failed, a delivery given up, an API request that failed (5xx)
    major_failure = 12


PROCESS_USER = "radvlm-pacs"  # the ActiveParticipant of what the service does on its own (analyse, deliver)


def process_host() -> str:
    """This machine's host name: the client recorded for what the service does on its own (analyses, deliveries, image
    removal, training exports)."""
    return socket.gethostname()


def record(session: Session, action: str, *, at: datetime, user: str, role: str, client: str | None = None,
           study_uid: str | None = None, detail: str | None = None,
           outcome: Outcome = Outcome.success, send: bool = True) -> AuditEvent:
    """Add the event to the session (the caller commits) and hand it to the syslog collector, if any.

    ``send=False``: the outcome is not known yet (an API request still running); the caller calls
    ``send_event`` once it is, since a message sent cannot be corrected.
    """
    if action not in EVENT_TYPES:
        raise ValueError(f"unknown audit action {action!r}")
    event = AuditEvent(at=at, user_name=user[:64], role=role, action=action, study_instance_uid=study_uid,
                       detail=detail, client=client, outcome=int(outcome))
    session.add(event)
    if send:
        send_event(event)
    return event


def send_event(event: AuditEvent) -> None:
    """Hand the event to the syslog collector, if one is configured."""
    collector = logging.getLogger(AUDIT_LOGGER)
    if collector.handlers:
        collector.info("%s", event.action, extra={"audit_event": event})


def audit_message(event: AuditEvent, source_id: str) -> str:
    """The DICOM audit message of one event (PS3.15 A.5.1)."""
    kind = EVENT_TYPES[event.action]
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(root, "EventIdentification", EventActionCode=kind.action_code,
                                   EventDateTime=event.at.isoformat(), EventOutcomeIndicator=str(event.outcome))
    ET.SubElement(identification, "EventID", {"csd-code": kind.code, "codeSystemName": "DCM",
                                              "originalText": kind.meaning})
    participant = {"UserID": event.user_name, "UserIsRequestor": "true", "AlternativeUserID": event.role}
    if event.client:
        participant |= {"NetworkAccessPointID": event.client, "NetworkAccessPointTypeCode": "2"}
    ET.SubElement(root, "ActiveParticipant", participant)
    source = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source_id)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "DCM",
                                                  "originalText": "Application Server Process"})
    if event.study_instance_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=event.study_instance_uid,
                              ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="3")
        ET.SubElement(study, "ParticipantObjectIDTypeCode", {"csd-code": "110180", "codeSystemName": "DCM",
                                                             "originalText": "Study Instance UID"})
    return ET.tostring(root, encoding="unicode")


class Rfc5424Formatter(logging.Formatter):
    """The part of an RFC 5424 syslog message after <PRI>: header, no structured data, the XML."""

    def __init__(self, source_id: str, app_name: str = "radvlm-pacs") -> None:
        super().__init__()
        self.source_id, self.app_name, self.host = source_id, app_name, socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        event: AuditEvent = record.audit_event  # type: ignore[attr-defined]
        stamp = event.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return (f"1 {stamp} {self.host} {self.app_name} {os.getpid()} IHE+RFC-3881 - "
                f"{audit_message(event, self.source_id)}")


def send_to_syslog(host: str, port: int, source_id: str) -> logging.Handler:
    """Also send every audit event to a syslog collector (facility authpriv, as IHE ATNA asks)."""
    handler = logging.handlers.SysLogHandler((host, port), facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV,
                                             socktype=socket.SOCK_DGRAM)
    handler.append_nul = False
    handler.setFormatter(Rfc5424Formatter(source_id))
    logger = logging.getLogger(AUDIT_LOGGER)
    logger.setLevel(logging.INFO)  # whatever the log level of the service
    logger.propagate = False  # audit messages go to the collector, not into the service's log
    logger.addHandler(handler)
    return handler

"""Sending what the outbox holds: each item to its destination by its transport, retried with backoff
until it is confirmed or its time is out, and audited when it settles."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from records.audit import PROCESS_USER, Outcome, process_host, record
from records.backoff import backoff
from records.clock import Clock
from records.metrics import DELIVERIES, DELIVERY_LATENCY
from records.settings import DeliverySettings, Destination, FhirSettings, HL7Settings
from records.tables import DeliveryState, OutboxItem, Study
from worker.delivery.attempt import Attempt
from worker.delivery.dicomweb import stow
from worker.delivery.dimse import c_store
from worker.delivery.fhir_rest import post_bundle
from worker.delivery.mllp import mllp_send

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)  # an attempt in flight keeps others off the item this long
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


def deliver_item(sessions: sessionmaker[Session], item_id: int, send: Send, policy: DeliverySettings,
                 clock: Clock) -> float | None:
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
        due = now + timedelta(seconds=backoff(item.attempts, first=1, base=policy.retry_backoff_s,
                                              cap=policy.max_backoff_s))
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

"""Administration of what is stored: the schema, the studies (list, show, reanalyse, resend), the agreement at
sign-off, API tokens, and a tiny test checkpoint. Each command runs once and exits, beside the running
service or without it."""

from __future__ import annotations

import argparse
import json
import sys

from radvlm_pacs.common import open_sessions, settings_of, upgrade_database
from records.clock import utcnow


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply the migrations, for a deployment that upgrades the schema before it starts the new processes."""
    settings = settings_of(args)
    upgrade_database(settings)
    print(f"database at revision head: {settings.effective_database_url.split('@')[-1]}")
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    """A tiny checkpoint with random weights, so that tests and demonstrations run the real model code
    without downloading the model."""
    from radvlm.tiny_checkpoint import make_test_model

    path = make_test_model(args.folder, seed=args.seed)
    print(f"tiny LLaVA-OneVision checkpoint (random weights) written to {path}")
    return 0


STUDY_COLUMNS = ("study_instance_uid", "version", "state", "instances", "reason")


def cmd_studies_list(args: argparse.Namespace) -> int:
    """The studies as a table under a header line; none: "no studies" on stderr, so stdout holds only the table."""
    from sqlalchemy import select

    from records.tables import Study, StudyState

    query = select(Study).order_by(Study.id)
    if args.state:
        query = query.where(Study.state == StudyState(args.state))
    with open_sessions(settings_of(args))() as session:
        rows = [(s.study_instance_uid, f"v{s.version}", s.state.value, f"{len(s.instances):3d} inst",
                 s.state_reason or "") for s in session.scalars(query)]
    if not rows:
        print(f"no studies{f' in state {args.state}' if args.state else ''}", file=sys.stderr)
        return 0
    table = [STUDY_COLUMNS, *rows]
    width = max(len(row[0]) for row in table)
    for uid, version, state, instances, reason in table:
        print(f"{uid:{width}s}  {version:7s}  {state:20s} {instances:9s}  {reason}".rstrip())
    return 0


def cmd_studies_show(args: argparse.Namespace) -> int:
    """One study as JSON: its versions, instances (and why each was selected or not), jobs and deliveries,
    what an administrator needs to tell why a study's results did or did not arrive."""
    from sqlalchemy import select

    from records.tables import Job, OutboxItem, Study

    with open_sessions(settings_of(args))() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == args.uid))
        jobs = [] if study is None else session.scalars(select(Job).where(Job.study_id == study.id)
                                                        .order_by(Job.id)).all()
        outbox = [] if study is None else session.scalars(select(OutboxItem).where(OutboxItem.study_id == study.id)
                                                          .order_by(OutboxItem.id)).all()
        if study is None:
            print(f"no study {args.uid}", file=sys.stderr)
            return 1
        print(json.dumps({
            "study_instance_uid": study.study_instance_uid,
            "state": study.state.value,
            "reason": study.state_reason,
            "version": study.version,
            "versions": [{"version": v.version, "outcome": v.outcome.value, "reason": v.reason,
                          "completed_at": v.completed_at.isoformat(),
                          "dispatched_at": v.dispatched_at.isoformat() if v.dispatched_at else None}
                         for v in study.versions],
            "instances": [{"sop_instance_uid": i.sop_instance_uid, "version": i.study_version,
                           "selected": i.selected, "reason": i.selection_reason, "pixel_error": i.pixel_error,
                           "transfer_syntax": i.transfer_syntax_uid, "calling_ae": i.calling_ae,
                           "removed_at": i.removed_at.isoformat() if i.removed_at else None}
                          for i in study.instances],
            "priority": study.priority,
            "jobs": [{"version": j.study_version, "model": j.model_id, "revision": j.model_revision,
                      "state": j.state.value, "attempts": j.attempts, "error": j.error, "worker": j.worker,
                      "result": j.result.payload if j.result else None} for j in jobs],
            "deliveries": [{"kind": o.kind, "destination": o.destination, "uid": o.object_uid,
                            "state": o.state.value, "attempts": o.attempts, "last_error": o.last_error,
                            "sent_at": o.sent_at.isoformat() if o.sent_at else None} for o in outbox],
        }, indent=2))
    return 0


def _chosen_studies(session, uids: list[str], state: str | None) -> list[str]:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from records.tables import Study, StudyState

    if state:
        uids = [*uids, *session.scalars(select(Study.study_instance_uid).where(Study.state == StudyState(state))
                                        .order_by(Study.id))]
    if not uids:
        raise SystemExit("radvlm-pacs: name at least one Study Instance UID, or --state")
    return list(dict.fromkeys(uids))


def _each_study(args: argparse.Namespace, sessions, what: str, operation) -> bool:  # type: ignore[no-untyped-def]
    """Run ``operation(session, uid)`` on each chosen study in its own transaction, with a progress bar;
    report the studies it refused. True when it applied to every one."""
    from tqdm import tqdm

    from worker.reruns import Refused

    with sessions() as session:
        uids = _chosen_studies(session, args.uids, args.state)
    done, refused = [], []
    for uid in tqdm(uids, desc=what, unit="study", disable=None):
        try:
            with sessions() as session, session.begin():
                operation(session, uid)
            done.append(uid)
        except Refused as exc:
            refused.append(f"{uid}: {exc}")
    for line in refused:
        print(f"not {what}: {line}", file=sys.stderr)
    print(f"{what}: {len(done)} of {len(uids)} stud{'y' if len(uids) == 1 else 'ies'}")
    return not refused


def cmd_reanalyse(args: argparse.Namespace) -> int:
    """A new version of each study, analysed by whatever takes ready studies: the Celery queue now when a
    broker is configured, else the running ``serve``'s node."""
    from worker.reruns import reanalyse

    settings = settings_of(args)
    sessions = open_sessions(settings)
    every = _each_study(args, sessions, "reanalysed",
                        lambda session, uid: reanalyse(session, uid, args.reason, utcnow()))
    if settings.broker_url:
        from dicom_node.completion import dispatch_ready
        from worker.app import make_celery
        from worker.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher(make_celery(settings), sessions)
        print(f"queued {dispatch_ready(sessions, dispatcher, utcnow())} for analysis")
    else:
        print("the running service's node queues them within a second (no broker configured)")
    return 0 if every else 1


def cmd_resend(args: argparse.Namespace) -> int:
    """The latest results of each study back in the outbox, due now."""
    from datetime import timedelta

    from worker.reruns import resend

    settings = settings_of(args)
    items: list[int] = []
    deliver_for = timedelta(seconds=settings.delivery.deliver_for_s)
    every = _each_study(args, open_sessions(settings), "resent", lambda session, uid: items.extend(
        resend(session, uid, utcnow(), deliver_for, destination=args.destination, failed_only=args.failed_only)))
    if settings.broker_url:
        from worker.app import make_celery, send_deliveries

        send_deliveries(make_celery(settings), items)
        print(f"{len(items)} object(s) handed to the io workers")
    else:
        print(f"{len(items)} object(s) due now: the running service sends them within a second")
    return 0 if every else 1


def cmd_agreement(args: argparse.Namespace) -> int:
    """How the model's drafts fare at sign-off: per finding, what the radiologists kept, removed and added, per
    model revision, so a site can compare revisions without the API (the same figures as GET /agreement)."""
    from results.agreement import agreement

    with open_sessions(settings_of(args))() as session:
        found = agreement(session, since=args.since, until=args.until)
    if args.json:
        print(json.dumps([entry.as_dict() for entry in found], indent=2))
    else:
        print("\n\n".join(entry.table() for entry in found) or "no sign-offs in that period")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """A new API token: printed once, with the settings entry that holds only its hash."""
    import hashlib
    import secrets
    from datetime import timedelta

    from records.settings import ApiUser

    missing = {"radiologist": None if args.person_name else "--person-name Family^Given (DICOM PN): the verifying "
                                                            "observer their sign-offs name",
               "sender": None if args.ae_title else "--ae-title AE: the calling AE title its studies are recorded "
                                                    "under"}.get(args.role)
    if missing:
        print(f"radvlm-pacs token: a {args.role} needs {missing}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    user = ApiUser(name=args.name, role=args.role, sources=args.sources or [], person_name=args.person_name,
                   ae_title=args.ae_title, token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                   expires=utcnow() + timedelta(days=args.days) if args.days else None)
    entry = user.model_dump(mode="json", exclude_defaults=True)
    entry.setdefault("role", user.role)
    fields = ", ".join(f"{key} = {json.dumps(value)}" for key, value in entry.items())
    print(f"token (give it to {user.name}; it is not stored anywhere): {token}", file=sys.stderr)
    print(f"{{ {fields} }},")
    return 0

"""``config check`` and ``health``: whether this installation's settings, peers and processes work, asked
before going live and by the container runtime while it runs."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable

from radvlm_pacs.common import close_sessions, open_sessions, settings_of


def _masked(settings) -> dict:  # type: ignore[no-untyped-def]
    """The effective settings as JSON, passwords in URLs hidden (API keys are SecretStr: masked by pydantic), and
    of each token hash its first 8 digits: enough to tell users apart, too few to test guesses offline."""
    from sqlalchemy.engine import make_url

    data = settings.model_dump(mode="json")
    data["database_url"] = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    data["storage_dir"] = str(settings.effective_storage_dir)
    if settings.broker_url:
        data["broker_url"] = make_url(settings.broker_url).render_as_string(hide_password=True)
    for user in data["api"]["users"]:
        user["token_sha256"] = user["token_sha256"][:8] + "…"
    return data


VISIBILITY_FACTOR = 4  # visibility timeouts above this many task time limits are worth a warning


def cmd_config_check(args: argparse.Namespace) -> int:
    """Print the effective configuration, then check each peer it names; exit 1 if one does not answer.
    Warnings (``warn`` lines, last) name what works now but may lose or delay work: they leave the exit 0."""
    from sqlalchemy import text
    from tqdm import tqdm

    from worker.delivery.attempt import Attempt
    from worker.delivery.dicomweb import qido_reachable
    from worker.delivery.dimse import echo_destination
    from worker.delivery.fhir_rest import fhir_reachable
    from worker.delivery.mllp import mllp_reachable

    settings = settings_of(args)
    print(json.dumps(_masked(settings), indent=2, ensure_ascii=False))
    warnings: list[str] = []  # what works now but loses or delays work later: said, not failed
    worker = settings.worker
    if settings.broker_url and worker.visibility_timeout_s > VISIBILITY_FACTOR * worker.task_time_limit_s:
        warnings.append(f"worker.visibility_timeout_s ({worker.visibility_timeout_s:g} s) is more than "
                        f"{VISIBILITY_FACTOR}x worker.task_time_limit_s ({worker.task_time_limit_s:g} s): an analysis "
                        "whose worker died waits that long before Redis hands it to another worker")

    def database() -> Attempt:
        sessions = open_sessions(settings)
        try:
            with sessions() as session:
                session.execute(text("select 1"))
            return Attempt(True, False, "connected")
        except Exception as exc:
            return Attempt(False, True, f"{type(exc).__name__}: {exc}")
        finally:
            close_sessions(sessions)

    def broker() -> Attempt:
        import redis

        client = redis.Redis.from_url(settings.broker_url or "", socket_timeout=settings.delivery.timeout_s)
        try:
            client.ping()
        except redis.RedisError as exc:
            return Attempt(False, True, str(exc))
        try:
            appendonly = client.config_get("appendonly").get("appendonly")
        except redis.RedisError as exc:  # a managed Redis may refuse CONFIG
            warnings.append(f"broker: cannot tell whether Redis keeps an append-only file ({exc})")
        else:
            if appendonly != "yes":
                warnings.append("broker: Redis runs without appendonly: the queued analyses and deliveries are lost "
                                "when it restarts (run it with --appendonly yes)")
        return Attempt(True, False, "PONG")

    def storage() -> Attempt:  # the folder, or the nearest parent it will be created in
        folder = settings.effective_storage_dir
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        writable = existing.is_dir() and os.access(existing, os.W_OK)
        return Attempt(writable, False, f"{folder} {'writable' if writable else 'not writable'}")

    checks: list[tuple[str, Callable[[], Attempt]]] = [("database", database), ("storage", storage)]
    if settings.broker_url:
        checks.append(("broker", broker))
    for destination in settings.destinations:
        if destination.stow_url:
            checks.append((f"destination {destination.name} ({destination.address}) QIDO-RS",
                           lambda d=destination: qido_reachable(d, settings.delivery.timeout_s)))
            continue
        checks.append((f"destination {destination.name} ({destination.address}) C-ECHO",
                       lambda d=destination: echo_destination(d, settings.node.ae_title, settings.delivery.timeout_s)))
    if settings.fhir:
        checks.append((f"EHR {settings.fhir.base_url} (FHIR capability statement)",
                       lambda: fhir_reachable(settings.fhir, settings.delivery.timeout_s)))
    if settings.hl7:
        checks.append((f"RIS {settings.hl7.host}:{settings.hl7.port} (MLLP)",
                       lambda: mllp_reachable(settings.hl7.host, settings.hl7.port, settings.delivery.timeout_s)))
    failed = 0
    lines = []
    for name, check in tqdm(checks, desc="checking", unit="peer", disable=None):
        outcome = check()
        failed += not outcome.delivered
        lines.append(f"{'ok  ' if outcome.delivered else 'FAIL'}  {name}: {outcome.detail}")
    print("\n".join(lines + [f"warn  {warning}" for warning in warnings]))
    return 1 if failed else 0


HEALTH_AE = "RADVLM-HEALTH"


def cmd_health(args: argparse.Namespace) -> int:
    """A container health check: 0 when this host's node, API or worker answers, else 1 with why."""
    import ssl
    import urllib.request

    settings = settings_of(args)
    loopback = "127.0.0.1"
    # liveness on loopback: a certificate names the public host, not 127.0.0.1, so it is not verified
    unverified = ssl._create_unverified_context()
    try:
        if args.part == "node":
            from worker.delivery.dimse import c_echo

            port, tls, node_tls = settings.node.port, None, settings.node.tls
            if node_tls is not None and not node_tls.plain_listener:  # TLS only: present the node's own certificate
                unverified.load_cert_chain(node_tls.cert_file, node_tls.key_file)
                port, tls = node_tls.port, (unverified, loopback)
            outcome = c_echo(loopback, port, settings.node.ae_title, HEALTH_AE, 5, tls)
            if not outcome.delivered:
                raise RuntimeError(f"node: {outcome.detail}")
        elif args.part == "api":
            with urllib.request.urlopen(f"{settings.api.scheme}://{loopback}:{settings.api.port}/health",
                                        timeout=5, context=unverified) as rsp:
                rsp.read()
        else:
            import redis

            from worker.presence import PREFIX

            metrics_port = settings.worker.metrics_port if args.metrics_port is None else args.metrics_port
            if metrics_port:
                with urllib.request.urlopen(f"http://{loopback}:{metrics_port}/metrics", timeout=5) as rsp:
                    page = rsp.read().decode("utf-8", "replace")
                if args.gpu and any(line.split()[1:2] == ["0.0"] for line in page.splitlines()
                                    if line.startswith("radvlm_engine_compiled ")):
                    raise RuntimeError("the model engine decodes uncompiled, several times slower "
                                       "(radvlm_engine_compiled 0): the worker's log says why")
            client = redis.Redis.from_url(settings.broker_url or "", socket_timeout=5)
            client.ping()
            if args.gpu and not list(client.scan_iter(f"{PREFIX}*@{socket.gethostname()}-*")):
                raise RuntimeError("no GPU worker of this host announces itself in Redis")
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0

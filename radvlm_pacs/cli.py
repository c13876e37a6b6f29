"""The ``radvlm-pacs`` command line: its parser, and ``main``, which runs the command chosen. The commands
themselves are in ``composition`` (the long-running processes), ``admin`` and ``checks``; ``train`` is
``training.cli``'s, imported only when ``train`` is parsed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from radvlm_pacs import admin, checks, composition
from records.clock import as_utc
from training import COMMAND_HELP

DESCRIPTION = "The ``radvlm-pacs`` command: the composition root that wires settings, database, node and jobs."


class _CommandParser(argparse.ArgumentParser):
    """A command's parser, whose arguments ``build`` adds when the command is parsed (or its help shown)
    rather than when the parser is made: ``train`` imports ``training.cli`` only then."""

    def __init__(self, *args, build: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._build = build

    def _built(self) -> None:
        build, self._build = self._build, None
        if build is not None:
            build(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._built()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._built()
        return super().format_help()

    def format_usage(self) -> str:
        self._built()
        return super().format_usage()


class _Into:
    """What ``training.cli.add_commands`` adds its ``train`` parser to: it hands back the parser made already."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        return self.parser


def _add_training(parser: argparse.ArgumentParser) -> None:
    from training.cli import add_commands

    add_commands(_Into(parser))


def _day(text: str) -> datetime:
    return as_utc(datetime.fromisoformat(text))


def _parser() -> argparse.ArgumentParser:
    """Every command's arguments, checked before any runs: a mistyped command or flag costs no settings, no
    database and no model load."""
    from records.tables import StudyState

    parser = argparse.ArgumentParser(prog="radvlm-pacs", description=DESCRIPTION)
    parser.add_argument("--config", type=Path, help="TOML settings file (else RADVLM_CONFIG_FILE)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    sub.add_parser("serve", help="run the whole service in one process (embedded default)").set_defaults(
        func=composition.cmd_serve)
    sub.add_parser("node", help="run the DICOM node alone; analyses go to Celery").set_defaults(
        func=composition.cmd_node)
    sub.add_parser("api", help="run the HTTP API alone").set_defaults(func=composition.cmd_api)
    worker = sub.add_parser("worker", help="run a GPU worker (Celery, Redis)")
    worker.add_argument("--queues", help="comma-separated queues: gpu (model work, the default), io (delivery)")
    worker.add_argument("--metrics-port", type=int, help="Prometheus port of this worker (default worker.metrics_port; "
                                                         "0: off); give each worker on one host its own")
    worker.add_argument("--concurrency", type=int, help="tasks at once (default worker.concurrency); on a GPU worker "
                                                        "they share the model's decode steps")
    worker.set_defaults(func=composition.cmd_worker)
    tiny = sub.add_parser("make-test-model", help="write a tiny random LLaVA-OneVision checkpoint for tests")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=admin.cmd_make_test_model)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=admin.cmd_db_upgrade)
    studies = sub.add_parser("studies", help="received studies").add_subparsers(dest="studies_command", required=True)
    listing = studies.add_parser("list")
    listing.add_argument("--state", choices=[s.value for s in StudyState])
    listing.set_defaults(func=admin.cmd_studies_list)
    show = studies.add_parser("show")
    show.add_argument("uid", help="Study Instance UID")
    show.set_defaults(func=admin.cmd_studies_show)
    for name, func, help_text in (
            ("reanalyse", admin.cmd_reanalyse, "analyse studies again, as a new version of each"),
            ("resend", admin.cmd_resend, "send the latest results of studies again")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("uids", nargs="*", metavar="UID", help="Study Instance UIDs")
        command.add_argument("--state", choices=[s.value for s in StudyState], help="and every study in this state")
        command.set_defaults(func=func)
    sub.choices["reanalyse"].add_argument("--reason", default="requested by an administrator",
                                          help="recorded with the new version")
    sub.choices["resend"].add_argument("--destination", help="only to this destination (its name; the RIS is \"ris\")")
    sub.choices["resend"].add_argument("--failed-only", action="store_true", help="only objects that failed")
    agree = sub.add_parser("agreement", help="how the drafts fare at sign-off: per finding kept, removed and added "
                                             "by the radiologists, per model revision")
    agree.add_argument("--since", type=_day, help="sign-offs from this date (YYYY-MM-DD, UTC) on")
    agree.add_argument("--until", type=_day, help="and before this date")
    agree.add_argument("--json", action="store_true", help="as JSON, as GET /agreement answers")
    agree.set_defaults(func=admin.cmd_agreement)
    config = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    config.add_parser("check", help="print the effective settings; C-ECHO each destination, reach the RIS, "
                                    "database and broker").set_defaults(func=checks.cmd_config_check)
    health = sub.add_parser("health", help="container health check of this host's node, API or worker")
    health.add_argument("part", choices=["node", "api", "worker"])
    health.add_argument("--gpu", action="store_true", help="worker: also require a live GPU worker on this host")
    health.add_argument("--metrics-port", type=int, help="worker: the Prometheus port to ask (default "
                                                         "worker.metrics_port; 0: none), as given to its worker "
                                                         "--metrics-port")
    health.set_defaults(func=checks.cmd_health)
    token = sub.add_parser("token", help="make an API token: prints it once, and the api.users entry with its hash")
    token.add_argument("name", help="user name (audit log, sign-offs)")
    token.add_argument("--role", choices=["radiologist", "admin", "sender"], default="radiologist",
                       help="radiologist: read, ask, sign off; admin: every study and the audit log; sender: store "
                            "studies by STOW-RS")
    token.add_argument("--person-name", help="DICOM PN, e.g. House^Gregory: the verifying observer of the user's "
                                             "sign-offs (required for a radiologist)")
    token.add_argument("--ae-title", help="the calling AE title a sender's studies are recorded under (required "
                                          "for a sender)")
    token.add_argument("--days", type=int, default=90, help="valid for this many days (0: until removed)")
    token.add_argument("--sources", nargs="*", metavar="AE", help="calling AE titles whose studies the user sees")
    token.set_defaults(func=admin.cmd_token)
    sub.add_parser("train", help=COMMAND_HELP, build=_add_training)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; what the user can fix (a settings file, a port, a model folder) is one line on stderr
    and exit status 2, not a traceback."""
    from pydantic import ValidationError

    from radvlm.backends.base import ModelLoadError

    composition.limit_malloc_arenas()
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValidationError, OSError) as exc:  # what the user can fix (files, ports): no traceback
        print(f"radvlm-pacs: {exc}", file=sys.stderr)
        return 2

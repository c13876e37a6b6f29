"""How the model's drafts fare with this site's radiologists: for each CheXpert finding, how often a
finding the draft named was kept or removed at sign-off and how often one was added, per model revision.

The radiologist's sign-off is the reference, so "kept" is a true positive, "removed" a false positive
and "added" a false negative of the draft. A fall in agreement after a new X-ray room or a new model
revision is the first sign that the drafts want a look; the same counts go to Prometheus at each
sign-off (``radvlm_signed_findings_total``) for an alert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from records.findings import FINDINGS, precision_recall_f1
from records.metrics import SIGN_OFFS, SIGNED_FINDINGS
from records.schema import StudyResult
from records.tables import Job, SignOff


def drafted_findings(draft: StudyResult) -> frozenset[str]:
    """The findings the draft names on its first image: what the radiologist's page shows and offers to sign."""
    return frozenset(label for label, present in draft.images[0].labels.items() if present and label in FINDINGS)


def count_sign_off(drafted: frozenset[str], signed: Iterable[str], edited: bool) -> None:
    """One sign-off in the Prometheus counters (records.metrics), for alerts on a fall in agreement."""
    signed = set(signed)
    SIGN_OFFS.labels(edited=str(edited).lower()).inc()
    for label in FINDINGS:
        SIGNED_FINDINGS.labels(label=label, drafted=str(label in drafted).lower(),
                               signed=str(label in signed).lower()).inc()


@dataclass
class LabelAgreement:
    """One finding's counts over the sign-offs; the scores take the radiologist as reference."""

    label: str
    kept: int = 0  # drafted and signed
    removed: int = 0  # drafted, not signed
    added: int = 0  # signed, not drafted
    absent: int = 0  # in neither

    def add(self, drafted: bool, signed: bool) -> None:
        if drafted and signed:
            self.kept += 1
        elif drafted:
            self.removed += 1
        elif signed:
            self.added += 1
        else:
            self.absent += 1

    def scores(self) -> dict[str, float | None]:
        """Positive predictive value, sensitivity and F1; None where no draft or sign-off had the finding."""
        scores = precision_recall_f1(self.kept, self.removed, self.added)
        return {"ppv": scores["precision"] if self.kept + self.removed else None,
                "sensitivity": scores["recall"] if self.kept + self.added else None,
                "f1": scores["f1"] if self.kept + self.removed + self.added else None}


@dataclass
class Agreement:
    """The sign-offs of one model revision in a period: how many, how many edited, and each finding's counts."""

    model_id: str
    model_revision: str
    sign_offs: int = 0
    edited: int = 0  # the report text or the findings changed
    labels: dict[str, LabelAgreement] = field(default_factory=lambda: {label: LabelAgreement(label)
                                                                        for label in FINDINGS})

    def add(self, drafted: frozenset[str], signed: Iterable[str], edited: bool) -> None:
        signed = set(signed)
        self.sign_offs += 1
        self.edited += edited
        for label, counts in self.labels.items():
            counts.add(label in drafted, label in signed)

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_revision": self.model_revision, "sign_offs": self.sign_offs,
                "edited": self.edited,
                "findings": [{"label": c.label, "kept": c.kept, "removed": c.removed, "added": c.added,
                              "absent": c.absent, **c.scores()} for c in self.labels.values()]}

    def table(self) -> str:
        """For a terminal: the revision, the share of drafts edited, and one line per finding."""
        share = f" ({self.edited / self.sign_offs:.0%})" if self.sign_offs else ""
        lines = [f"{self.model_id} @ {self.model_revision}: {self.sign_offs} sign-offs, {self.edited} edited{share}",
                 f"{'finding':28} {'kept':>6} {'removed':>8} {'added':>6} {'PPV':>6} {'sens.':>6} {'F1':>6}"]
        for c in self.labels.values():
            shown = [" " * 5 + "-" if value is None else f"{value:6.2f}" for value in c.scores().values()]
            lines.append(f"{c.label:28} {c.kept:6d} {c.removed:8d} {c.added:6d} {' '.join(shown)}")
        return "\n".join(lines)


def agreement(session: Session, studies: Select | None = None, since: datetime | None = None,
              until: datetime | None = None) -> list[Agreement]:
    """One ``Agreement`` per model revision over the sign-offs from ``since`` until before ``until``, of the
    studies ``studies`` selects (a query of ``Study.id``; None: all), oldest revision first."""
    query = (select(SignOff.drafted, SignOff.findings, SignOff.edited, Job.model_id, Job.model_revision)
             .join(Job, SignOff.job_id == Job.id).order_by(SignOff.id))
    if studies is not None:
        query = query.where(SignOff.study_id.in_(studies))
    if since is not None:
        query = query.where(SignOff.signed_at >= since)
    if until is not None:
        query = query.where(SignOff.signed_at < until)
    found: dict[tuple[str, str], Agreement] = {}
    for drafted, signed, edited, model_id, revision in session.execute(query):
        entry = found.setdefault((model_id, revision), Agreement(model_id, revision))
        entry.add(frozenset(drafted), signed, edited)
    return list(found.values())


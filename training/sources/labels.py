"""CheXpert-style label columns to the labels a datapoint lists.

1.0 is present; 0.0 and blank are absent; -1.0 (uncertain) is absent, as the paper says
(RadVLM's released code counted it present: ``uncertain="present"`` reproduces that).
"No Finding" is never listed: an empty list is what says it.
"""

from __future__ import annotations

from collections.abc import Mapping

from records.findings import FINDINGS
from training.sources.files import number

UNCERTAIN_CHOICES = ("absent", "present")


def present(row: Mapping[str, str], uncertain: str = "absent") -> list[str]:
    """The pathologies a row marks present."""
    if uncertain not in UNCERTAIN_CHOICES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_CHOICES}, not {uncertain!r}")
    found = []
    for label in FINDINGS:
        value = number(row.get(label))
        if value == 1.0 or (value == -1.0 and uncertain == "present"):
            found.append(label)
    if number(row.get("No Finding")) == 1.0:
        # CheXpert's labeler marks "No Finding" only when nothing but support devices is present.
        found = [label for label in found if label == "Support Devices"]
    return found

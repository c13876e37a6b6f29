"""The CheXpert labels RadVLM names, in one place: every part that lists, parses, codes, signs or scores
findings takes them from here.

"No Finding" is one of the 14 labels but never a finding: it is what an image with none of the other 13
reads as, so it is derived, never chosen.
"""

from __future__ import annotations

from collections.abc import Collection

#: The 14 CheXpert labels, in CheXpert's order.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
NO_FINDING = "No Finding"
#: The 13 labels that can be present, in CheXpert's order.
FINDINGS: tuple[str, ...] = tuple(label for label in CHEXPERT_LABELS if label != NO_FINDING)


def labels_of(present: Collection[str]) -> dict[str, bool]:
    """All 14 labels for the findings ``present``: "No Finding" is true exactly when none is."""
    found = {label: label in present for label in FINDINGS}
    return {NO_FINDING: not any(found.values()), **found}


def precision_recall_f1(tp: int, fp: int, fn: int) -> dict[str, float]:
    """The three scores from counts; 0 where a ratio has nothing to divide (no prediction, no truth)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}

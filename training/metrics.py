"""The paper's metrics (``radvlm/evaluation/compute_metrics_tasks.py``), computed our way.

- Abnormalities: the 13 label names matched as lower-case substrings of the answer and of the
  reference (``radvlm.parsing.labels_as_radvlm_evaluates``), then precision, recall and F1 per
  label, micro and macro. Macro averages all 13 labels as RadVLM's code does: a label that neither
  side names scores 0, so macro reaches 1 only on a test set whose references name every label.
- Grounding and detection: every ``[x1, y1, x2, y2]`` of the answer, in the order written, matched
  greedily to the unmatched reference box it overlaps most, at IoU >= 0.5; the average precision of
  each datapoint (VOC's all-point interpolation), and their mean. A datapoint whose reference has
  boxes scores 0 when the answer has none. One whose reference has none (detection on an image
  without findings) scores 1 when the answer has none either (a true negative) and 0 when it draws
  any. RadVLM's code scores every datapoint with an empty side 0, a correct "no lesion" included;
  the grounding tasks' references always have boxes, so their mAP (the paper's figures) is the
  same either way. ``interpolation="101-point"`` gives COCO's, which the tests compare with
  torchmetrics.
- Reports: ROUGE-L (Google's ``rouge-score``) and BERTScore (``bert-score``, any local or hub model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radvlm.parsing import BOX_PATTERN, labels_as_radvlm_evaluates
from records.findings import FINDINGS, precision_recall_f1
from training.boxes import NormBox

INTERPOLATIONS = ("all-point", "101-point")


def boxes_in(text: str) -> list[NormBox]:
    """Every box written in ``text``, in order (RadVLM's pattern; values as written)."""
    return [tuple(float(v) for v in m.groups()) for m in BOX_PATTERN.finditer(text)]  # type: ignore[misc]


def iou(a: NormBox, b: NormBox) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0 when they do not overlap or have no area."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matches(predicted: Sequence[NormBox], reference: Sequence[NormBox], threshold: float = 0.5) -> list[bool]:
    """For each predicted box in order: does it take a reference box not taken before it?"""
    taken = [False] * len(reference)
    hits = []
    for box in predicted:
        best, best_iou = -1, threshold
        for index, ref in enumerate(reference):
            overlap = iou(box, ref)
            if not taken[index] and overlap >= best_iou:
                best, best_iou = index, overlap
        if best >= 0:
            taken[best] = True
        hits.append(best >= 0)
    return hits


def average_precision(predicted: Sequence[NormBox], reference: Sequence[NormBox], threshold: float = 0.5,
                      interpolation: str = "all-point") -> float:
    """AP of ``predicted`` (in the order written) against ``reference`` at IoU >= ``threshold``.

    No reference box: 1.0 when nothing is predicted either (a true negative), else 0.0. Reference
    boxes but none predicted: 0.0.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
    if not reference:
        return 0.0 if predicted else 1.0
    if not predicted:
        return 0.0
    hits = np.array(matches(predicted, reference, threshold), dtype=float)
    true_positives = np.cumsum(hits)
    recall = true_positives / len(reference)
    precision = true_positives / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    if interpolation == "101-point":
        points = np.linspace(0.0, 1.0, 101)
        at = np.searchsorted(recall, points, side="left")
        return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in at]))
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def mean_average_precision(pairs: Sequence[tuple[str, str]], threshold: float = 0.5) -> float:
    """Mean over datapoints of (answer, reference answer) of the AP of the answer's boxes."""
    if not pairs:
        return 0.0
    return float(np.mean([average_precision(boxes_in(answer), boxes_in(reference), threshold)
                          for answer, reference in pairs]))


@dataclass(frozen=True)
class LabelScores:
    """Precision, recall and F1 per label (with support: the references naming it), micro over the 13 labels' pooled
    counts, and macro their mean."""

    per_label: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    micro: dict[str, float]
    macro: dict[str, float]


def label_matrix(texts: Sequence[str]) -> np.ndarray:
    """(datapoints, 13) booleans: which pathology each text names."""
    rows = []
    for text in texts:
        found = labels_as_radvlm_evaluates(text)
        rows.append([found[label] for label in FINDINGS])
    return np.array(rows, dtype=bool).reshape(len(texts), len(FINDINGS))


def label_scores(answers: Sequence[str], references: Sequence[str]) -> LabelScores:
    """The abnormality scores of ``answers`` against ``references`` (paired in order), the labels matched as RadVLM's
    evaluation matches them."""
    predicted, truth = label_matrix(answers), label_matrix(references)
    per_label = {}
    totals = np.zeros(3, dtype=int)
    for index, label in enumerate(FINDINGS):
        p, t = predicted[:, index], truth[:, index]
        counts = np.array([np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)])
        totals += counts
        per_label[label] = {**precision_recall_f1(*counts), "support": float(np.sum(t))}
    macro = {key: float(np.mean([scores[key] for scores in per_label.values()]))
             for key in ("precision", "recall", "f1")}
    return LabelScores(per_label, precision_recall_f1(*totals), macro)


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> float:
    """The mean ROUGE-L F-measure of each answer against its reference (no stemming); 0.0 for no pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    values = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    return float(np.mean(values)) if values else 0.0


def bert_score_f1(answers: Sequence[str], references: Sequence[str], model: str, num_layers: int | None = None,
                  device: str | None = None) -> float:
    """Mean BERTScore F1; ``model`` a hub id (offline: a local folder) and the layer to read."""
    from bert_score import score

    if not answers:
        return 0.0
    _, _, f1 = score(list(answers), list(references), model_type=model, num_layers=num_layers, device=device,
                     verbose=False)
    return float(f1.mean())

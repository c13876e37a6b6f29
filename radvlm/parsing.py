"""From RadVLM's answers to labels and boxes.

Labels: RadVLM's evaluation matches the 13 lower-case label names as substrings, with no
negation, and reads "none named" as No Finding. This parser matches the same names but skips a
mention inside a negated clause ("no pneumothorax", "without pleural effusion"), which the
paper's matching would count as present.

Boxes: every ``[x1, y1, x2, y2]`` (RadVLM's own pattern), validated as 0 <= x1 < x2 <= 1 and the
same for y, and mapped to pixels of the original image: x * Columns, y * Rows.

Writing: ``box_text`` and ``join_words`` write boxes and lists as RadVLM's answers do (each value
``round(v, 2)`` in Python's repr, "a, b and c"), for the training data and the scripted model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from records.findings import CHEXPERT_LABELS, FINDINGS, labels_of
from records.schema import Box

BOX_PATTERN = re.compile(r"\[([\d\.]+),\s*([\d\.]+),\s*([\d\.]+),\s*([\d\.]+)\]")
ANY_BRACKET = re.compile(r"\[[^\[\]]*\]")
NEGATION = re.compile(r"\b(no|not|without|negative for|free of|absence of|absent|rule out|ruled out|resolved)\b")
CLAUSE_BREAK = re.compile(r"[.;:\n]|\bbut\b|\bhowever\b|\bwith\b")

#: lower-case names longest first, so that no name is matched inside a longer one
_NAMES = sorted(((label.lower(), label) for label in FINDINGS),
                key=lambda item: -len(item[0]))


def labels_from_answer(text: str) -> dict[str, bool]:
    """Each CheXpert label present or not, from an abnormality answer or report."""
    found = {label: False for label in CHEXPERT_LABELS}
    lowered = text.lower()
    for clause in CLAUSE_BREAK.split(lowered):
        negated_from = None
        match = NEGATION.search(clause)
        if match:
            negated_from = match.start()
        for name, label in _NAMES:
            position = clause.find(name)
            if position < 0:
                continue
            if negated_from is not None and negated_from < position:
                continue
            found[label] = True
    found["No Finding"] = not any(found[label] for label in FINDINGS)
    return found


def labels_as_radvlm_evaluates(text: str) -> dict[str, bool]:
    """The paper's matching: plain lower-case substrings, no negation (kept for evaluation)."""
    lowered = text.lower()
    return labels_of([label for label in FINDINGS if label.lower() in lowered])


@dataclass(frozen=True)
class ParsedBoxes:
    """The valid boxes of an answer, and what else in it was bracketed (None when nothing was): stored with the answer
    as ``malformed``."""

    boxes: list[Box]
    malformed: str | None


def boxes_from_answer(text: str, columns: int, rows: int) -> ParsedBoxes:
    """Every valid box in ``text``; anything bracketed that is not one is reported as malformed."""
    boxes: list[Box] = []
    problems: list[str] = []
    for match in BOX_PATTERN.finditer(text):
        try:
            x1, y1, x2, y2 = (float(v) for v in match.groups())
        except ValueError:
            problems.append(f"not numbers: {match.group(0)}")
            continue
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            problems.append(f"out of range or unordered: {match.group(0)}")
            continue
        boxes.append(Box(x1=x1, y1=y1, x2=x2, y2=y2,
                         px=(x1 * columns, y1 * rows, x2 * columns, y2 * rows)))
    matched = {m.group(0) for m in BOX_PATTERN.finditer(text)}
    for bracket in ANY_BRACKET.findall(text):
        if bracket not in matched:
            problems.append(f"not a box: {bracket[:40]}")
    return ParsedBoxes(boxes, "; ".join(problems) or None)


def box_text(box: Sequence[float]) -> str:
    """``[0.1, 0.23, 0.5, 0.6]``: four fractions at two decimals."""
    return "[" + ", ".join(repr(round(v, 2)) for v in box) + "]"


def join_words(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: how RadVLM lists labels and boxes."""
    if not items:
        raise ValueError("nothing to join")
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]

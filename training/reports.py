"""Report text for report generation: the section to learn, with mentions of earlier studies
taken out (the model sees one image and cannot know what changed since the last one).

``LLMCleaner`` asks a chat model, as RadVLM did with GPT-4o; ``RuleCleaner`` drops the sentences
that compare or refer to other studies. The LLM's answers are kept in a folder, one file per
study, so an interrupted build resumes without asking again; when the endpoint fails, the rule
cleaner answers and the log says so.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol

from training.llm import ChatLLM, LLMError

log = logging.getLogger(__name__)

SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)

#: words that tie a sentence to another study (RadVLM's list, and their obvious relatives)
PRIOR = re.compile(
    r"\b(prior|previous|previously|comparison|compared|unchanged|change|changes|changed|since|interval|"
    r"again|stable|increased|decreased|increasing|decreasing|improved|improving|worsened|worsening|"
    r"resolved|new|newly|persistent|persists|remains|redemonstrat\w*|re-demonstrat\w*|removed|"
    r"recent|earlier|before)\b", re.IGNORECASE)

CLEANING_PROMPT = """You rewrite chest X-ray reports for training a model that sees only the current image.

Rules:
- Keep only findings that can be seen on this chest X-ray.
- Remove anything about earlier studies: comparisons, changes, words such as "unchanged", "stable",
  "increased", "since", "prior", "previous", "new", "removed".
- Remove the clinical history, the indication, the technique, the views taken, recommendations and
  anything else that cannot be read from the image.
- Fix spelling and grammar; write complete, punctuated sentences; keep the radiologist's wording otherwise.
- Output only the rewritten findings, with no comment or greeting.
- If no finding is left, output exactly: None

Report:
{report}

Rewritten findings:"""


class Cleaner(Protocol):
    def clean(self, key: str, text: str) -> str | None:
        """The report for ``key`` (a study) without other studies; None when nothing is left."""


def sections(text: str) -> dict[str, str]:
    """A MIMIC-CXR style report's sections by upper-case header (``FINDINGS``, ``IMPRESSION``...)."""
    found: dict[str, str] = {}
    matches = list(SECTION.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        found[match.group(1).strip()] = text[match.end():end]
    return found


def report_text(findings: str | None, impression: str | None) -> str:
    """The findings when there are any, else the impression, on one line."""
    for part in (findings, impression):
        text = " ".join((part or "").split())
        if text:
            return text
    return ""


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


class RuleCleaner:
    """Drops each sentence that names another study; keeps the rest as written."""

    def clean(self, key: str, text: str) -> str | None:
        kept = [s for s in sentences(text) if not PRIOR.search(s)]
        return " ".join(kept) or None


class LLMCleaner:
    """Asks ``llm``; keeps answers under ``cache`` (``{key}.txt``, an empty file for "None")."""

    def __init__(self, llm: ChatLLM, cache: Path, fallback: Cleaner | None = None) -> None:
        self.llm = llm
        self.cache = cache
        self.fallback = fallback or RuleCleaner()
        cache.mkdir(parents=True, exist_ok=True)

    def clean(self, key: str, text: str) -> str | None:
        stored = self.cache / f"{key}.txt"
        if stored.exists():
            return stored.read_text() or None
        try:
            answer = self.llm.ask(CLEANING_PROMPT.format(report=text))
        except LLMError as exc:
            log.warning("report %s: %s; the rule-based cleaner answers instead", key, exc)
            return self.fallback.clean(key, text)
        cleaned = None if answer.strip().strip('".') == "None" else " ".join(answer.split())
        stored.write_text(cleaned or "")
        return cleaned

"""Report text for report generation: the section to learn, with mentions of earlier studies
taken out (the model sees one image and cannot know what changed since the last one), and
without de-identification marks (IU X-ray's ``XXXX``, MIMIC-CXR's and our export's ``___``): a
model trained on them writes them.

``LLMCleaner`` asks a chat model, as RadVLM did with GPT-4o; ``RuleCleaner`` drops the sentences
that compare or refer to other studies. A sentence with a mark is rewritten without it where it
still says the same ("No XXXX of pleural effusion." -> "No pleural effusion."), else dropped;
the rules also take out any mark the LLM left. Each cleaner counts what the marks cost
(``Marks``), which the build prints per part. The LLM's answers are kept in a folder, one file per
study, so an interrupted build resumes without asking again; when the endpoint fails, the rule
cleaner answers and the log says so; when it refuses the request (key, URL, model), the build stops.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
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

#: where a sentence ends: after ".", "!" or "?" and a space; or at a full stop typed without its space, closing
#: a word of two letters or more before a capitalised word (IU X-ray report 4: "...the left lung apex.There are
#: ..."); "1.5 cm", "p.m.", "Dr.Smith" and "U.S.A." stay whole
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[A-Za-z]{2}\.)(?<!\b(?:Dr|Mr|Ms|St|vs)\.)(?<!\bMrs\.)(?=[A-Z][a-z])")

#: a de-identification mark: IU X-ray's XXXX (also inside "X-XXXX"), MIMIC-CXR's and our export's ___
MARK = re.compile(r"X{4,}|_{3,}")
#: marks that stand for a word the sentence says the same without: "no XXXX focal consolidation"
#: ("no acute ..."), "no XXXX of pleural effusion" ("no evidence of ..."); the rewrite, and the rest
REWRITES = (
    (re.compile(r"\b(there (?:is|are) )no (?:X{4,}|_{3,}) of (?:an? )?", re.IGNORECASE),
     lambda m: ("There is no " if m.group(1)[0].isupper() else "there is no ")),
    (re.compile(r"\b(no|without) (?:X{4,}|_{3,}) of (?:an? )?", re.IGNORECASE), lambda m: f"{m.group(1)} "),
    (re.compile(r"\b(no|without) (?:X{4,}|_{3,}) (?!of\b)(?=[a-z])", re.IGNORECASE), lambda m: f"{m.group(1)} "),
)

CLEANING_PROMPT = """You rewrite chest X-ray reports for training a model that sees only the current image.

Rules:
- Keep only findings that can be seen on this chest X-ray.
- Remove anything about earlier studies: comparisons, changes, words such as "unchanged", "stable",
  "increased", "since", "prior", "previous", "new", "removed".
- Remove the clinical history, the indication, the technique, the views taken, recommendations and
  anything else that cannot be read from the image.
- The report was de-identified: XXXX (or ___) stands for words that were removed. Rewrite a sentence without
  the mark when it says the same without the missing word ("No XXXX of pleural effusion." becomes "No pleural
  effusion."); otherwise drop the sentence. Never write XXXX or ___.
- Fix spelling and grammar; write complete, punctuated sentences; keep the radiologist's wording otherwise.
- Output only the rewritten findings, with no comment or greeting.
- If no finding is left, output exactly: None

Report:
{report}

Rewritten findings:"""


@dataclass
class Marks:
    """What de-identification marks cost a cleaner's reports so far."""

    reports: int = 0  # reports with a mark to take out (the rules: once sentences on other studies went)
    dropped: int = 0  # sentences dropped for a mark (by the rules)
    rewritten: int = 0  # sentences kept with the mark taken out (by the rules)

    def __sub__(self, other: Marks) -> Marks:
        return Marks(self.reports - other.reports, self.dropped - other.dropped, self.rewritten - other.rewritten)


class Cleaner(Protocol):
    """What cleans reports (``LLMCleaner``, ``RuleCleaner``); ``marks`` counts what de-identification marks have cost
    its reports so far."""

    marks: Marks

    def clean(self, key: str, text: str) -> str | None:
        """The report for ``key`` (a study) without other studies or de-identification marks; None when
        nothing is left."""


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
    """``text`` in sentences: split after ., ! or ? and a space, and where a full stop runs straight into a capitalised
    word (not after Dr., Mr., Mrs., Ms., St. or vs.); blanks dropped."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def unmark(sentence: str) -> str | None:
    """The sentence without its de-identification marks where it says the same without them; None
    when it needs the missing word."""
    for pattern, replacement in REWRITES:
        sentence = pattern.sub(replacement, sentence)
    return None if MARK.search(sentence) else sentence


def without_marks(text: str, marks: Marks) -> str:
    """``text`` with each marked sentence rewritten or dropped, counted in ``marks`` (not the report:
    the caller knows whether it had one)."""
    kept = []
    for sentence in sentences(text):
        if MARK.search(sentence):
            rewritten = unmark(sentence)
            if rewritten is None:
                marks.dropped += 1
                continue
            marks.rewritten += 1
            sentence = rewritten
        kept.append(sentence)
    return " ".join(kept)


class RuleCleaner:
    """Drops each sentence that names another study; rewrites or drops those with a de-identification
    mark; keeps the rest as written."""

    def __init__(self, marks: Marks | None = None) -> None:
        self.marks = marks if marks is not None else Marks()

    def clean(self, key: str, text: str) -> str | None:
        kept = " ".join(s for s in sentences(text) if not PRIOR.search(s))
        if MARK.search(kept):
            self.marks.reports += 1
        return without_marks(kept, self.marks) or None


class LLMCleaner:
    """Asks ``llm``; keeps answers under ``cache`` (``{key}.txt``, an empty file for "None"). The rules
    take out any de-identification mark the answer still has (an older cache's, or one the LLM kept)."""

    def __init__(self, llm: ChatLLM, cache: Path, fallback: Cleaner | None = None) -> None:
        self.llm = llm
        self.cache = cache
        self.marks = Marks()
        self.fallback = fallback or RuleCleaner(self.marks)
        cache.mkdir(parents=True, exist_ok=True)

    def clean(self, key: str, text: str) -> str | None:
        stored = self.cache / f"{key}.txt"
        if stored.exists():
            return self._unmarked(text, stored.read_text())
        try:
            answer = self.llm.ask(CLEANING_PROMPT.format(report=text))
        except LLMError as exc:
            log.warning("report %s: %s; the rule-based cleaner answers instead", key, exc)
            return self.fallback.clean(key, text)
        cleaned = None if answer.strip().strip('".') == "None" else " ".join(answer.split())
        stored.write_text(cleaned or "")
        return self._unmarked(text, cleaned or "")

    def _unmarked(self, text: str, cleaned: str) -> str | None:
        if MARK.search(text) or MARK.search(cleaned):  # the LLM was told to take them out; the rules check
            self.marks.reports += 1
        return without_marks(cleaned, self.marks) or None

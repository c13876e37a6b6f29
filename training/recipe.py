"""RadVLM's training mix (the paper's Table 1): which builder, how many times, how many at most.

A part runs when the folders it reads are given. Repeating a part draws new question and answer
templates, as RadVLM's up-sampling did; a cap keeps a random subset (Chest ImaGenome: 80,000).
``counts_table`` sets what was built beside the paper's figure for the same part.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from training import conversations
from training.instructions import Instruction
from training.llm import ChatLLM
from training.reports import Cleaner
from training.sources import chexpert, imagenome, iu_xray, mimic, nih, phrases, rsna, site, vindr
from training.sources.files import ImageSize, find, header_size


@dataclass(frozen=True)
class Inputs:
    """What a build gets from its caller: data set folders by name, the report cleaner, sizes."""

    folders: Mapping[str, Path]
    cleaner: Cleaner
    size: ImageSize = header_size
    split: str = "train"  # or "test": each source's held-out test split, for train evaluate
    uncertain: str = "absent"
    llm: ChatLLM | None = None  # writes conversations
    cache: Path = Path("llm-cache")  # the LLM's answers, so that a build resumes

    def has(self, name: str) -> bool:
        return self.llm is not None if name == LLM else name in self.folders


Build = Callable[[Inputs, random.Random], Iterable[Instruction]]


@dataclass(frozen=True)
class Part:
    name: str
    needs: tuple[str, ...]  # data set folders it reads
    build: Build
    paper: int  # datapoints in RadVLM's training set, before repeats (0: not one of RadVLM's sources)
    repeats: int = 1
    cap: int | None = None
    test: bool = False  # the source has a held-out test split, built by --split test (no repeats, no cap)
    paper_test: int = 0  # datapoints in the paper's test set (0: not given)

    def paper_count(self, split: str) -> int:
        return self.paper if split == "train" else self.paper_test


LLM = "llm"  # a part that needs the conversation writer lists this among its inputs
SPLITS = ("train", "test")


def _f(inputs: Inputs, name: str) -> Path:
    return inputs.folders[name]


def _talk(inputs: Inputs, cases: Iterable[conversations.Case], source: str) -> Iterator[Instruction]:
    assert inputs.llm is not None
    return conversations.generate(cases, inputs.llm, inputs.cache / f"{source}-conversations", source)


PARTS: tuple[Part, ...] = (
    Part("mimic-cxr/report", ("mimic-cxr",),
         lambda i, r: mimic.reports(_f(i, "mimic-cxr"), r, i.cleaner, split=i.split), 230_980, test=True),
    Part("chexpert-plus/report", ("chexpert-plus",),
         lambda i, r: chexpert.plus_reports(_f(i, "chexpert-plus"), r, i.cleaner), 186_463),
    Part("mimic-cxr/abnormalities", ("mimic-cxr",),
         lambda i, r: mimic.classification(_f(i, "mimic-cxr"), r, split=i.split, uncertain=i.uncertain), 237_912,
         test=True),
    Part("chexpert/abnormalities", ("chexpert",),
         lambda i, r: chexpert.classification(_f(i, "chexpert"), r, split=i.split, uncertain=i.uncertain), 191_027,
         test=True, paper_test=518),
    Part("chest-imagenome/anatomical-grounding", ("chest-imagenome", "mimic-cxr"),
         lambda i, r: imagenome.anatomical_grounding(_f(i, "chest-imagenome"), _f(i, "mimic-cxr"), r, split=i.split,
                                                     size=i.size), 80_000, cap=80_000, test=True),
    Part("vindr-cxr/abnormality-grounding", ("vindr-cxr",),
         lambda i, r: vindr.abnormality_grounding(_f(i, "vindr-cxr"), r, split=i.split, size=i.size), 16_089,
         repeats=3, test=True),
    Part("vindr-cxr/detection", ("vindr-cxr",),
         lambda i, r: vindr.detection(_f(i, "vindr-cxr"), r, split=i.split, size=i.size), 15_000, repeats=2,
         test=True),
    Part("ms-cxr/phrase-grounding", ("ms-cxr", "mimic-cxr"),
         lambda i, r: phrases.ms_cxr(_f(i, "ms-cxr"), _f(i, "mimic-cxr"), r, split=i.split), 971, repeats=3,
         test=True),
    Part("padchest-gr/phrase-grounding", ("padchest-gr",),
         lambda i, r: phrases.padchest_gr(_f(i, "padchest-gr"), r, split=i.split), 4_478, repeats=2, test=True),
    Part("mimic-cxr/conversation", ("mimic-cxr", LLM),
         lambda i, r: _talk(i, mimic.conversation_cases(_f(i, "mimic-cxr"), i.cleaner, split=i.split,
                                                        uncertain=i.uncertain), "mimic-cxr"), 86_155, test=True),
    Part("ms-cxr/grounded-conversation", ("ms-cxr", "mimic-cxr", LLM),
         lambda i, r: _talk(i, mimic.conversation_cases(_f(i, "mimic-cxr"), i.cleaner, split=i.split,
                                                        uncertain=i.uncertain,
                                                        phrases=phrases.ms_cxr_phrases(_f(i, "ms-cxr"), i.split)),
                            "ms-cxr"), 862, repeats=4, test=True),
    Part("padchest-gr/grounded-conversation", ("padchest-gr", LLM),
         lambda i, r: _talk(i, phrases.padchest_cases(_f(i, "padchest-gr"), i.split), "padchest-gr"), 2_225,
         repeats=4, test=True),
    # Not RadVLM's: public sets a hospital can add to its own data (training only).
    Part("iu-xray/report", ("iu-xray",),
         lambda i, r: iu_xray.reports(_f(i, "iu-xray"), find(_f(i, "iu-xray"), *iu_xray.VIEW_TABLES), r, i.cleaner), 0),
    Part("nih-chestxray14/abnormality-grounding", ("nih-chestxray14",),
         lambda i, r: nih.abnormality_grounding(_f(i, "nih-chestxray14"), r, size=i.size), 0),
    Part("rsna-pneumonia/abnormality-grounding", ("rsna-pneumonia",),
         lambda i, r: rsna.opacity_grounding(_f(i, "rsna-pneumonia"), r, size=i.size), 0),
    # This installation's own studies as its radiologists signed them off (train export-site).
    Part("site/report", ("site",), lambda i, r: site.reports(_f(i, "site"), r, i.cleaner, split=i.split), 0,
         test=True),
    Part("site/abnormalities", ("site",), lambda i, r: site.classification(_f(i, "site"), r, split=i.split), 0,
         test=True),
)
DATASETS = sorted({name for part in PARTS for name in part.needs if name != LLM})


def runnable(inputs: Inputs, only: Iterable[str] = ()) -> list[Part]:
    wanted = set(only)
    unknown = wanted - {part.name for part in PARTS}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {[p.name for p in PARTS]}")
    if inputs.split not in SPLITS:
        raise ValueError(f"unknown split {inputs.split!r}; known: {list(SPLITS)}")
    return [part for part in PARTS if all(inputs.has(name) for name in part.needs)
            and (not wanted or part.name in wanted) and (inputs.split == "train" or part.test)]


@dataclass
class Tally:
    part: Part
    paper: int  # the paper's figure for this split (0: not given)
    repeats: int  # the recipe's up-sampling in training; a test set is taken once
    built: int = 0  # distinct datapoints, before repeats
    written: int = 0  # with repeats


def build(parts: Iterable[Part], inputs: Inputs, rng: random.Random, tallies: list[Tally]) -> Iterator[Instruction]:
    """Every datapoint of ``parts``, repeats included (ids get ``-r{n}`` from the second round); a test split
    whole, once. Each image's size is read once per build, however many parts and repeats use it (VinDr:
    15,000 headers, five passes)."""
    inputs = replace(inputs, size=functools.cache(inputs.size))
    training = inputs.split == "train"
    for part in parts:
        tally = Tally(part, part.paper_count(inputs.split), part.repeats if training else 1)
        tallies.append(tally)
        for round_ in range(tally.repeats):
            items = list(part.build(inputs, rng))
            if training and part.cap is not None and len(items) > part.cap:
                items = rng.sample(items, part.cap)
            if round_ == 0:
                tally.built = len(items)
            for item in items:
                tally.written += 1
                yield item if round_ == 0 else replace(item, id=f"{item.id}-r{round_}")


def counts_table(tallies: Iterable[Tally]) -> str:
    """What was built beside the paper's figure for each part."""
    lines = [f"{'part':40} {'built':>9} {'paper':>9} {'ratio':>7} {'repeats':>7} {'written':>9}"]
    for t in tallies:
        paper, ratio = (f"{t.paper:9,d}", f"{t.built / t.paper:7.3f}") if t.paper else ("-", "-")
        lines.append(f"{t.part.name:40} {t.built:9,d} {paper:>9} {ratio:>7} {t.repeats:7d} {t.written:9,d}")
    return "\n".join(lines)

"""RadVLM's training mix (the paper's Table 1): which builder, how many times, how many at most.

A part runs when the folders it reads are given. Repeating a part draws new question and answer
templates, as RadVLM's up-sampling did; a cap keeps a random subset (Chest ImaGenome: 80,000).
``counts_table`` sets what was built beside the paper's figure for the same part, with what
de-identification marks cost its reports, the images it could not use and those left out for a
box that is not on them.

A build that checks images (``Inputs.images``: refuse or skip) reads each image once, on a few
threads: a DICOM header with Rows and Columns, or a file PIL opens and verifies; the sizes the
boxes need come from the same read. Refusing stops at the first part with an image missing or
unreadable, naming how many and the first; skipping leaves their datapoints out and counts them.
Boxes go the same way: a box that falls outside the image it was drawn on means the images are not
the originals (a downsampled copy), and the build refuses unless told to skip; the builders leave
such an image out either way, with any image that has a box without area (``boxes.Placement``).
A build left with no datapoint to write is refused too.
"""

from __future__ import annotations

import difflib
import functools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from training import conversations
from training.boxes import BoxOutside, Dropped, Placement
from training.errors import Refused
from training.instructions import Instruction
from training.llm import ChatLLM
from training.progress import progress
from training.reports import Cleaner, Marks
from training.sources import chexpert, imagenome, iu_xray, mimic, nih, phrases, rsna, site, vindr
from training.sources.files import ImageSize, Layout, UnusableImage, checked_size, find, header_size

IMAGE_CHECKS = ("unchecked", "refuse", "skip")
CHECK_THREADS = 16  # image reads at once: file systems, not CPUs, set the pace


class BuildError(Refused, ValueError):
    """A build that cannot start or go on; the message says what to give or change."""


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
    images: str = "unchecked"  # or "refuse" / "skip" an image that is missing or does not open
    boxes: Placement = field(default_factory=Placement)  # what the builders placed and dropped (one pass)

    def has(self, name: str) -> bool:
        return self.llm is not None if name == LLM else name in self.folders


Build = Callable[[Inputs, random.Random], Iterable[Instruction]]


@dataclass(frozen=True)
class Part:
    """One row of the training mix: a builder, the folders it reads, and how often its output is repeated and how much
    of it kept, beside the paper's count."""

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
                                                     size=i.size, boxes=i.boxes), 80_000, cap=80_000, test=True),
    Part("vindr-cxr/abnormality-grounding", ("vindr-cxr",),
         lambda i, r: vindr.abnormality_grounding(_f(i, "vindr-cxr"), r, split=i.split, size=i.size, boxes=i.boxes),
         16_089, repeats=3, test=True),
    Part("vindr-cxr/detection", ("vindr-cxr",),
         lambda i, r: vindr.detection(_f(i, "vindr-cxr"), r, split=i.split, size=i.size, boxes=i.boxes), 15_000,
         repeats=2, test=True),
    Part("ms-cxr/phrase-grounding", ("ms-cxr", "mimic-cxr"),
         lambda i, r: phrases.ms_cxr(_f(i, "ms-cxr"), _f(i, "mimic-cxr"), r, split=i.split, boxes=i.boxes), 971,
         repeats=3, test=True),
    Part("padchest-gr/phrase-grounding", ("padchest-gr",),
         lambda i, r: phrases.padchest_gr(_f(i, "padchest-gr"), r, split=i.split, boxes=i.boxes), 4_478, repeats=2,
         test=True),
    Part("mimic-cxr/conversation", ("mimic-cxr", LLM),
         lambda i, r: _talk(i, mimic.conversation_cases(_f(i, "mimic-cxr"), i.cleaner, split=i.split,
                                                        uncertain=i.uncertain), "mimic-cxr"), 86_155, test=True),
    Part("ms-cxr/grounded-conversation", ("ms-cxr", "mimic-cxr", LLM),
         lambda i, r: _talk(i, mimic.conversation_cases(_f(i, "mimic-cxr"), i.cleaner, split=i.split,
                                                        uncertain=i.uncertain,
                                                        phrases=phrases.ms_cxr_phrases(_f(i, "ms-cxr"), i.split,
                                                                                       i.boxes)),
                            "ms-cxr"), 862, repeats=4, test=True),
    Part("padchest-gr/grounded-conversation", ("padchest-gr", LLM),
         lambda i, r: _talk(i, phrases.padchest_cases(_f(i, "padchest-gr"), i.split, i.boxes), "padchest-gr"), 2_225,
         repeats=4, test=True),
    # Not RadVLM's: public sets a hospital can add to its own data (training only).
    Part("iu-xray/report", ("iu-xray",),
         lambda i, r: iu_xray.reports(_f(i, "iu-xray"), find(_f(i, "iu-xray"), *iu_xray.VIEW_TABLES), r, i.cleaner), 0),
    Part("nih-chestxray14/abnormality-grounding", ("nih-chestxray14",),
         lambda i, r: nih.abnormality_grounding(_f(i, "nih-chestxray14"), r, size=i.size, boxes=i.boxes), 0),
    Part("rsna-pneumonia/abnormality-grounding", ("rsna-pneumonia",),
         lambda i, r: rsna.opacity_grounding(_f(i, "rsna-pneumonia"), r, size=i.size, boxes=i.boxes), 0),
    # This installation's own studies as its radiologists signed them off (train export-site).
    Part("site/report", ("site",), lambda i, r: site.reports(_f(i, "site"), r, i.cleaner, split=i.split), 0,
         test=True),
    Part("site/abnormalities", ("site",), lambda i, r: site.classification(_f(i, "site"), r, split=i.split), 0,
         test=True),
)
DATASETS = sorted({name for part in PARTS for name in part.needs if name != LLM})
#: what each data set's folder holds for the builders (``train dataset --help``, docs/training.md)
LAYOUTS: dict[str, Layout] = {
    "chest-imagenome": imagenome.LAYOUT, "chexpert": chexpert.LAYOUT, "chexpert-plus": chexpert.PLUS_LAYOUT,
    "iu-xray": iu_xray.LAYOUT, "mimic-cxr": mimic.LAYOUT, "ms-cxr": phrases.MS_CXR_LAYOUT,
    "nih-chestxray14": nih.LAYOUT, "padchest-gr": phrases.PADCHEST_LAYOUT, "rsna-pneumonia": rsna.LAYOUT,
    "site": site.LAYOUT, "vindr-cxr": vindr.LAYOUT,
}


def runnable(inputs: Inputs, only: Iterable[str] = ()) -> list[Part]:
    """The parts the inputs can build, in the mix's order: their folders (and LLM) given, named by ``only`` if any, and
    with a test split when building one; an unknown part or split is ``BuildError``."""
    wanted = set(only)
    names = [part.name for part in PARTS]
    for name in sorted(wanted - set(names)):
        close = difflib.get_close_matches(name, names, n=1)
        raise BuildError(f"--only {name}: no such part" + (f" (did you mean {close[0]}?)" if close else "")
                         + f"; parts: {', '.join(names)}")
    if inputs.split not in SPLITS:
        raise BuildError(f"unknown split {inputs.split!r}; known: {list(SPLITS)}")
    return [part for part in PARTS if all(inputs.has(name) for name in part.needs)
            and (not wanted or part.name in wanted) and (inputs.split == "train" or part.test)]


def select(inputs: Inputs, only: Iterable[str] = ()) -> list[Part]:
    """``runnable``'s parts; none is a ``BuildError`` that says why (a folder or the LLM missing, or no
    test split in the sources given)."""
    only = list(only)
    parts = runnable(inputs, only)
    if parts:
        return parts
    if not inputs.folders:
        raise BuildError(f"nothing to build: no --data NAME=FOLDER given (NAME one of {', '.join(DATASETS)})")
    wanted = [p for p in PARTS if p.name in only] if only else [p for p in PARTS if set(p.needs) & set(inputs.folders)]
    reasons, untested = [], []
    for part in wanted:
        missing = [name for name in part.needs if not inputs.has(name)]
        if missing:
            reasons.append(f"{part.name} needs " + " and ".join("--llm-url and --llm-model" if name == LLM
                                                                  else f"--data {name}=FOLDER" for name in missing))
        elif not part.test:
            untested.append(part.name)
    if untested:
        tested = sorted({name for p in PARTS if p.test for name in p.needs if name != LLM})
        reasons.insert(0, f"--split test, and {', '.join(untested)} {'has' if len(untested) == 1 else 'have'} no "
                          f"test split (the sources with one: {', '.join(tested)})")
    raise BuildError("nothing to build: " + "; ".join(reasons))


@dataclass
class Tally:
    """What one part of a build came to, beside the paper's figure: a row of ``counts_table`` and the notes under it."""

    part: Part
    paper: int  # the paper's figure for this split (0: not given)
    repeats: int  # the recipe's up-sampling in training; a test set is taken once
    built: int = 0  # distinct datapoints, before repeats
    written: int = 0  # with repeats
    marks: Marks = field(default_factory=Marks)  # what de-identification marks cost its reports (first round)
    bad_images: dict[str, str] = field(default_factory=dict)  # image -> why it cannot be used
    skipped: int = 0  # datapoints left out for their image, every round
    boxes: Placement = field(default_factory=Placement)  # boxes placed and dropped (first round)


class BadImages(BuildError):
    """Images a build refuses to go on without."""

    def __init__(self, part: str, bad: Mapping[str, str], images: int) -> None:
        path, reason = next(iter(bad.items()))
        super().__init__(f"{part}: {len(bad):,d} of {images:,d} images missing or unreadable, the first {path} "
                         f"({reason}); put them in place, or --missing-images skip to leave their datapoints out")


class BoxesOutside(BuildError):
    """Boxes that fall outside the images they were drawn on: the images are smaller than the originals."""

    def __init__(self, part: str, outside: list[Dropped], boxes: int) -> None:
        first = outside[0].error
        assert isinstance(first, BoxOutside)
        one = len(outside) == 1
        super().__init__(f"{part}: {len(outside):,d} of {count(boxes, 'box', 'boxes')} {'falls' if one else 'fall'} "
                         f"outside {'its' if one else 'their'} image (the first: {outside[0].image}, box {first.box}, "
                         f"image {first.size}): the images are not the originals; put the originals in place, or "
                         "--missing-images skip to leave those images out")


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``number`` and ``noun``, in the plural unless there is one: "1 sentence", "1,313 sentences"."""
    return f"{number:,d} {noun if number == 1 else plural or noun + 's'}"


def _their(number: int) -> str:
    return "its" if number == 1 else "their"


class ImageCheck:
    """Every image of a build read once: its size, or why it cannot be used (``files.checked_size``).

    ``size`` is what the builders that need sizes call: an image that cannot be used raises
    ``UnusableImage``, which they take as a reason to skip it, and is noted for the part being built;
    ``check`` does the others' images, on ``threads`` threads, and gives the part's verdicts.
    """

    def __init__(self, size: ImageSize = header_size, threads: int = CHECK_THREADS) -> None:
        self.verdicts: dict[str, tuple[int, int] | UnusableImage] = {}
        self.other_size = None if size is header_size else functools.cache(size)  # a caller's own (tests)
        self.threads = threads
        self.refused: dict[str, str] = {}  # by ``size``, since the last ``check``

    def size(self, path: Path) -> tuple[int, int]:
        verdict = self._verdict(str(path))
        if isinstance(verdict, UnusableImage):
            self.refused[str(path)] = verdict.reason
            raise UnusableImage(path, verdict.reason)
        return verdict if self.other_size is None else self.other_size(path)

    def _verdict(self, image: str) -> tuple[int, int] | UnusableImage:
        if image not in self.verdicts:
            self.verdicts[image] = _read(image)
        return self.verdicts[image]

    def check(self, items: Iterable[Instruction], what: str) -> tuple[dict[str, str], int]:
        """The images of ``items`` and those ``size`` refused since the last call: (image -> why, for
        those that cannot be used; how many images in all)."""
        images = list(dict.fromkeys(item.image for item in items))
        todo = [image for image in images if image not in self.verdicts]
        with ThreadPoolExecutor(self.threads) as pool:
            for image, verdict in progress(zip(todo, pool.map(_read, todo)), f"{what}: images", total=len(todo),
                                           unit="image"):
                self.verdicts[image] = verdict
        bad, self.refused = dict(self.refused), {}
        for image in images:
            verdict = self.verdicts[image]
            if isinstance(verdict, UnusableImage):
                bad[image] = verdict.reason
        return bad, len(set(images) | set(bad))


def _read(image: str) -> tuple[int, int] | UnusableImage:
    try:
        return checked_size(Path(image))
    except UnusableImage as exc:
        return exc


def build(parts: Iterable[Part], inputs: Inputs, rng: random.Random, tallies: list[Tally]) -> Iterator[Instruction]:
    """Every datapoint of ``parts``, repeats included (ids get ``-r{n}`` from the second round); a test split
    whole, once. Each image's size is read once per build, however many parts and repeats use it (VinDr:
    15,000 headers, five passes); so is each image's check (``inputs.images``)."""
    if inputs.images not in IMAGE_CHECKS:
        raise BuildError(f"images must be one of {IMAGE_CHECKS}, not {inputs.images!r}")
    check = ImageCheck(inputs.size) if inputs.images != "unchecked" else None
    inputs = replace(inputs, size=check.size if check else functools.cache(inputs.size))
    training = inputs.split == "train"
    built: list[Tally] = []
    for part in parts:
        tally = Tally(part, part.paper_count(inputs.split), part.repeats if training else 1)
        tallies.append(tally)
        built.append(tally)
        for round_ in range(tally.repeats):
            marks = replace(inputs.cleaner.marks)
            rounds = f" (round {round_ + 1} of {tally.repeats})" if tally.repeats > 1 else ""
            placement = Placement()
            items = list(progress(part.build(replace(inputs, boxes=placement), rng), part.name + rounds))
            if placement.outside and inputs.images != "skip":
                raise BoxesOutside(part.name, placement.outside, placement.boxes)
            if training and part.cap is not None and len(items) > part.cap:
                items = rng.sample(items, part.cap)
            if round_ == 0:
                tally.built = len(items)
                tally.marks = inputs.cleaner.marks - marks
                tally.boxes = placement
            if check is not None:
                bad, images = check.check(items, part.name)
                if bad and inputs.images == "refuse":
                    raise BadImages(part.name, bad, images)
                tally.bad_images.update(bad)
                kept = [item for item in items if item.image not in bad]
                tally.skipped += len(items) - len(kept)
                items = kept
            for item in items:
                tally.written += 1
                yield item if round_ == 0 else replace(item, id=f"{item.id}-r{round_}")
    if not any(t.written for t in built):
        raise BuildError("no datapoint to write: " + "; ".join(_why_none(t) for t in built))


def _why_none(tally: Tally) -> str:
    """Why a part wrote no datapoint, with the first image or box it left out."""
    left_out = []
    if tally.bad_images:
        path, reason = next(iter(tally.bad_images.items()))
        left_out.append(f"{count(len(tally.bad_images), 'image')} missing or unreadable, the first {path}: {reason}")
    if tally.boxes.dropped:
        first = tally.boxes.dropped[0]
        images = len(tally.boxes.images)
        left_out.append(f"{count(images, 'image')} with a box not on {'it' if images == 1 else 'them'}, the first "
                        f"{first.image}: {first.error}")
    why = f" ({'; '.join(left_out)})" if left_out else ""
    if not tally.built:
        return f"{tally.part.name} built none{why}"
    return f"{tally.part.name}: {count(tally.built, 'datapoint')} built, all left out{why}"


def counts_table(tallies: Iterable[Tally]) -> str:
    """What was built beside the paper's figure for each part; ``de-id``: its reports that had
    de-identification marks taken out; ``no-image``: its images missing or unreadable, left out;
    ``bad-box``: its images left out for a box that cannot be placed on them."""
    lines = [f"{'part':40} {'built':>9} {'paper':>9} {'ratio':>7} {'repeats':>7} {'written':>9} {'de-id':>7} "
             f"{'no-image':>8} {'bad-box':>7}"]
    for t in tallies:
        paper, ratio = (f"{t.paper:9,d}", f"{t.built / t.paper:7.3f}") if t.paper else ("-", "-")
        lines.append(f"{t.part.name:40} {t.built:9,d} {paper:>9} {ratio:>7} {t.repeats:7d} {t.written:9,d} "
                     f"{t.marks.reports:7,d} {len(t.bad_images):8,d} {len(t.boxes.images):7,d}")
    return "\n".join(lines)


def notes(tallies: Iterable[Tally]) -> list[str]:
    """What the table's last three columns stand for, part by part, where they are not 0: one line each,
    however many repeats the part had."""
    out = []
    for t in tallies:
        if t.marks.reports:
            out.append(f"{t.part.name}: {count(t.marks.reports, 'report')} had de-identification marks (XXXX, ___): "
                       f"{count(t.marks.dropped, 'sentence')} dropped, {t.marks.rewritten:,d} rewritten without the "
                       "mark")
        if t.bad_images:
            path, reason = next(iter(t.bad_images.items()))
            out.append(f"{t.part.name}: {count(len(t.bad_images), 'image')} missing or unreadable, left out with "
                       f"{_their(len(t.bad_images))} datapoints (the first {path}: {reason})")
        if t.boxes.dropped:
            first, images = t.boxes.dropped[0], len(t.boxes.images)
            out.append(f"{t.part.name}: {count(images, 'image')} left out with {_their(images)} datapoints, for a box "
                       f"that cannot be placed on {'it' if images == 1 else 'them'} ({len(t.boxes.dropped):,d} of "
                       f"{count(t.boxes.boxes, 'box', 'boxes')}; the first {first.image}: {first.error})")
    return out

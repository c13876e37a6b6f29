"""Every datapoint's length in tokens, before fine-tuning takes its first step.

A conversation longer than ``max_length`` cannot be trained on (the collator refuses its batch,
``BadInstruction``), and would otherwise surface hours into a run. The length counted is the
collator's: the conversation rendered with the training template, with the image's tokens as the
processor expands them for the image's size (anyres: about 7,300 for a chest X-ray of 1,000 px or
more), from the image's header alone; no pixels are decoded. An image that is missing or does not
open is refused here too, naming the file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import Refused
from training.examples import TRAINING_TEMPLATE, messages
from training.instructions import Instruction
from training.progress import progress
from training.sources.files import checked_size

THREADS = 16  # image headers read at once
TEXT_BATCH = 512  # conversations tokenized at once


class TooLong(Refused, ValueError):
    """Datapoints over the maximum length, with the fine-tuning told to refuse them."""


@dataclass(frozen=True)
class Within:
    """The datapoints to train on, and those left out for their length."""

    kept: list[Instruction]
    too_long: list[tuple[str, int]]  # (id, tokens), longest first

    def summary(self, max_length: int) -> str:
        longest, tokens = self.too_long[0]
        return (f"{len(self.too_long):,d} of {len(self.kept) + len(self.too_long):,d} datapoints are longer than "
                f"--max-length {max_length:,d} tokens (the longest: {longest}, {tokens:,d} tokens)")


def image_path(item: Instruction, image_folder: Path | None) -> Path:
    """Where the collator reads the datapoint's image (``examples.Collator.image_path``)."""
    path = Path(item.image)
    return path if path.is_absolute() or image_folder is None else image_folder / path


def image_tokens(processor: Any, width: int, height: int) -> int:
    """The tokens ``processor`` expands one image of this size to."""
    return _image_tokens(processor, height, width)


@functools.lru_cache(maxsize=65536)
def _image_tokens(processor: Any, height: int, width: int) -> int:
    return int(processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0])


def lengths(items: Sequence[Instruction], processor: Any, image_folder: Path | None = None) -> list[int]:
    """Each datapoint's length in tokens, as ``examples.Collator`` builds it alone in a batch."""
    paths = list(dict.fromkeys(image_path(item, image_folder) for item in items))
    with ThreadPoolExecutor(THREADS) as pool:
        sizes = dict(zip(paths, progress(pool.map(checked_size, paths), "image sizes", total=len(paths),
                                          unit="image")))
    image_token = processor.image_token
    out: list[int] = []
    bar = progress(range(0, len(items), TEXT_BATCH), "lengths", total=-(-len(items) // TEXT_BATCH), unit="batch")
    for start in bar:
        batch = items[start:start + TEXT_BATCH]
        texts = [processor.apply_chat_template(messages(item, None), chat_template=TRAINING_TEMPLATE, tokenize=False)
                 for item in batch]
        ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for item, text, tokens in zip(batch, texts, ids):
            width, height = sizes[image_path(item, image_folder)]
            out.append(len(tokens) + text.count(image_token) * (image_tokens(processor, width, height) - 1))
    return out


def within(items: Sequence[Instruction], processor: Any, max_length: int, image_folder: Path | None = None,
           *, skip: bool = False) -> Within:
    """The datapoints at most ``max_length`` tokens long; any longer is ``TooLong`` unless ``skip`` (none
    left is ``TooLong`` all the same)."""
    counted = lengths(items, processor, image_folder)
    too_long = sorted(((item.id, n) for item, n in zip(items, counted) if n > max_length), key=lambda t: -t[1])
    result = Within([item for item, n in zip(items, counted) if n <= max_length], too_long)
    if too_long and not skip:
        raise TooLong(result.summary(max_length) + "; raise --max-length, or --too-long skip to leave them out")
    if not result.kept:
        raise TooLong(result.summary(max_length) + ": nothing left to train on; raise --max-length"
                      if too_long else "no datapoint to train on")
    return result

"""The image's share of the prompt, prefilled once and kept: every question about the same image
(the tasks of a study, then each chat turn) starts from its KV cache instead of encoding the image
and prefilling ~7,300 image tokens again.

Every RadVLM prompt starts with the same text before the question (``PREFIX``: the first user turn
up to and including the image), so the cache of that prefix serves all of them. Entries are kept
most recently used first, within a byte budget; decoding works on copies, so an entry never
holds an answer.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

PREFIX = "<|im_start|>user\n<image>\n"


def image_key(image: np.ndarray) -> str:
    """The same pixels, the same key (the model image is rebuilt from the file for each use)."""
    digest = hashlib.sha1(image.tobytes())
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Prefix:
    """One kept image prefix: its length in tokens (the image tokens expanded), its KV cache, and the bytes it counts
    against the budget."""

    length: int  # tokens, the image tokens expanded
    cache: Any  # transformers DynamicCache holding exactly the prefix
    nbytes: int


def cache_bytes(cache: Any) -> int:
    """Bytes a KV cache's keys and values take on their device: what an entry counts against the budget."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


class PrefixCache:
    """Least recently used image prefixes within ``budget_bytes`` (0: nothing is kept); callers on
    any thread (the engine's thread fills it, the callers look)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def peek(self, key: str) -> Prefix | None:
        """The entry of ``key`` if kept now (a look, not a use: no hit, no miss, no reordering)."""
        with self._lock:
            return self._entries.get(key)

    def get(self, key: str) -> Prefix | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: Prefix) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while self._entries and sum(e.nbytes for e in self._entries.values()) > self.budget_bytes:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

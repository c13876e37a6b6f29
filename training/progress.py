"""Progress bars for the long steps of ``radvlm-pacs train``: on stderr while a person watches (a
terminal), nothing in a log file or a test's captured output."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], what: str, *, total: int | None = None, unit: str = "datapoint") -> Iterator[T]:
    """``iterable`` as it is, with a bar named ``what`` counting ``unit``s (a rate and, with ``total``, an ETA)."""
    return iter(tqdm(iterable, desc=what, total=total, unit=unit, disable=None, dynamic_ncols=True))

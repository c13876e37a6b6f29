"""How long to wait before trying again: the one retry backoff of analyses and deliveries."""

from __future__ import annotations


def backoff(attempt: int, *, first: int, base: float, cap: float) -> float:
    """Seconds to wait after attempt number ``attempt``, attempts being numbered from ``first`` (0: retries
    done so far; 1: attempts made, this one included): ``base`` after the first, twice as long after each
    next, never more than ``cap``. An attempt numbered below ``first`` counts as the first."""
    try:
        return min(cap, base * 2.0 ** max(0, attempt - first))
    except OverflowError:  # 2.0 ** 1024 and beyond: far past any cap
        return cap

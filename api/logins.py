"""Failed log-ins per client address: a flood of bad tokens must not fill the audit table.

Within each minute the first ``limit`` failures from an address are audited one by one and answered
401; the next is audited once as the start of a burst, and every further one that minute is answered
429 (Retry-After) without a row. A valid token is never held back: behind a proxy every user
shares its address, and one broken script must not lock the radiologists out.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

WINDOW = timedelta(minutes=1)


class FailedLogins:
    """Failed log-ins per client address in the current minute, shared by all requests (thread-safe); the first
    ``limit`` of a minute are audited one by one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._windows: dict[str, tuple[datetime, int]] = {}  # address -> (its minute's start, failures in it)
        self._lock = threading.Lock()

    def count(self, client: str, now: datetime) -> tuple[int, float]:
        """Count one failure from ``client``: its number in the current minute, and the seconds left of it."""
        with self._lock:
            if len(self._windows) > 10_000:  # addresses seen once, long ago
                self._windows = {c: w for c, w in self._windows.items() if now - w[0] < WINDOW}
            start, failures = self._windows.get(client, (now, 0))
            if now - start >= WINDOW:
                start, failures = now, 0
            self._windows[client] = (start, failures + 1)
        return failures + 1, (start + WINDOW - now).total_seconds()

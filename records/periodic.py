"""The one background loop the service runs in several places: a thread that takes a step every interval
until it is stopped (the completion monitor, the retention sweep, the outbox loop and sweep, the GPU
worker's presence, the lapse sweep)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

log = logging.getLogger(__name__)

OnError = Callable[[Exception], None]


def log_failure(label: str, interval_s: float, logger: logging.Logger = log) -> OnError:
    """A step that raises, told as one warning line on ``logger`` with the reason and when the next pass comes;
    the loop goes on. The default ``on_error``."""

    def on_error(exc: Exception) -> None:
        logger.warning("%s failed (%s: %s); next in %.0f s", label, type(exc).__name__, exc, interval_s)

    return on_error


class Periodic:
    """A daemon thread named ``name`` that calls ``step`` every ``interval`` until ``stop``.

    The first step runs at ``start`` (``first_now``) or one interval later. A step that raises is handed to
    ``on_error``, called inside the ``except`` (so ``log.exception`` there has the traceback), and the loop
    goes on; ``BaseException`` ends it. ``stop`` sets ``stop_event`` (give it your own to let a long step
    check it between items) and ends the loop once the step in progress returns; no step starts after it.
    ``wake`` runs the next step now rather than at the end of the interval.
    """

    def __init__(self, name: str, interval: float | timedelta, step: Callable[[], object], *,
                 first_now: bool = True, on_error: OnError | None = None,
                 stop_event: threading.Event | None = None) -> None:
        self.name, self.step, self.first_now = name, step, first_now
        self.interval_s = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
        self.on_error = on_error or log_failure(name, self.interval_s)
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _pause(self) -> bool:
        """Wait out the interval, or until woken or stopped; whether to stop."""
        self._wake.wait(self.interval_s)
        self._wake.clear()
        return self.stop_event.is_set()

    def _run(self) -> None:
        if not self.first_now and self._pause():
            return
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception as exc:
                self.on_error(exc)
            if self._pause():
                return

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the loop to end and wait up to ``timeout`` (None: however long the step in progress takes);
        whether it has ended."""
        self.stop_event.set()
        self._wake.set()
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end (at once if it never started); whether it has ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

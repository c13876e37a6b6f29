"""GPU workers announce themselves in Redis, so the API can tell "the model is down" at once, and an io
worker can give back what a dead one held (worker.lapses).

A Celery ``ping`` would not do: a worker answers control messages only when its consumer gets to
them, so a worker busy with studies could look dead. A thread beside the task refreshes a key with a
time to live instead; when the worker dies, its key expires.
"""

from __future__ import annotations

import logging
from typing import Any

from records.periodic import Periodic

log = logging.getLogger(__name__)

PREFIX = "radvlm:gpu-worker:"


class Presence:
    """Keep ``PREFIX + name`` alive (value: what the worker runs) until ``stop``."""

    def __init__(self, client: Any, name: str, value: str, ttl_s: float = 15.0) -> None:
        self.client, self.key, self.value, self.ttl_s = client, PREFIX + name, value, ttl_s
        self._loop = Periodic("presence", ttl_s / 3, self._announce, on_error=self._failed)

    def _announce(self) -> None:
        self.client.set(self.key, self.value, px=int(self.ttl_s * 1000))

    def _failed(self, exc: Exception) -> None:  # Redis away for a moment: the key may lapse, the worker goes on
        log.warning("cannot announce the worker in Redis: %s", exc)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        self.client.delete(self.key)


def announced(client: Any, name: str) -> bool:
    """Whether the GPU worker ``name`` announced itself within its time to live (``client``: redis.Redis)."""
    return bool(client.exists(PREFIX + name))


def gpu_workers(client: Any) -> list[str]:
    """What each live GPU worker announced (``client``: a synchronous redis.Redis)."""
    return [value.decode() for key in client.scan_iter(PREFIX + "*") if (value := client.get(key)) is not None]

"""A chat exchange's events on their way from the model to the radiologist: ``token`` as the answer grows,
then ``done`` or ``error``. The worker publishes them (over Redis for a GPU worker, in process for ``serve``);
the API streams them to the page. Both sides read the same shape from here."""

from __future__ import annotations

from typing import Any

Event = dict[str, Any]
TERMINAL = ("done", "error")  # event types after which nothing more comes


def channel(exchange_id: int) -> str:
    """The Redis pub/sub channel that carries one exchange's events from a worker to the API."""
    return f"radvlm:chat:{exchange_id}"

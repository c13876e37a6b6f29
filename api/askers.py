"""How the API has a question answered, whoever answers it: a GPU worker through Celery or ``serve``'s model
thread (``worker.askers``), handed in by the composition root.

Both give the exchange's events (``token``, then ``done`` or ``error``) as an async iterator,
and both say why the model is down before a question is queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from records.chat_events import Event


class Asker(Protocol):
    """Whatever answers the API's questions, handed in by the composition root (``app.state.asker``; None: no model
    here, and every question is 503)."""

    def down(self) -> str | None:
        """Why no model can answer now, or None when one can."""

    def events(self, exchange_id: int) -> AsyncIterator[Event]:
        """Queue the exchange and yield its events up to the terminal one."""


async def within(events: AsyncIterator[Event], seconds: float) -> AsyncIterator[Event]:
    """``events``, or TimeoutError once ``seconds`` have passed without the last of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            try:
                event = await asyncio.wait_for(anext(events), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]

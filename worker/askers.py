"""The worker's two ways of answering the API's questions (``api.askers.Asker``): a GPU worker through Celery,
or ``serve``'s model thread. The composition root hands one to the API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio

from records.chat_events import TERMINAL, Event, channel
from worker.app import CHAT_PRIORITY, CHAT_TASK, GPU_QUEUE
from worker.attempts import answer
from worker.context import WorkerContext
from worker.model_thread import ModelThread
from worker.presence import gpu_workers


class CeleryAsker:
    """Production: the question goes on the gpu queue ahead of routine analyses; the answer comes
    back over Redis pub/sub, to which the API subscribes before it sends the task."""

    def __init__(self, celery_app: Any, broker_url: str) -> None:
        self.celery_app, self.broker_url = celery_app, broker_url
        self._client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)

    def down(self) -> str | None:
        try:
            workers = gpu_workers(self._client)
        except redis.RedisError as exc:
            return f"the broker cannot be reached: {exc}"
        return None if workers else "no GPU worker is running (start one with: radvlm-pacs worker)"

    async def events(self, exchange_id: int) -> AsyncIterator[Event]:
        client = redis.asyncio.Redis.from_url(self.broker_url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel(exchange_id))
            await asyncio.to_thread(self.celery_app.send_task, CHAT_TASK, args=[exchange_id], queue=GPU_QUEUE,
                                    priority=CHAT_PRIORITY)
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                event = json.loads(message["data"])
                yield event
                if event["type"] in TERMINAL:
                    return
        finally:
            await pubsub.aclose()
            await client.aclose()


class LocalAsker:
    """``serve``: the question runs on the process's model thread, before any waiting analysis."""

    def __init__(self, ctx: WorkerContext, model_thread: ModelThread) -> None:
        self.ctx, self.model_thread = ctx, model_thread

    def down(self) -> str | None:
        return None if self.model_thread.alive else "the model thread has stopped (the service is shutting down)"

    async def events(self, exchange_id: int) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def publish(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the listener's loop is gone: the answer is stored all the same
                pass

        self.model_thread.submit_at(CHAT_PRIORITY, answer, self.ctx, exchange_id, publish)
        while True:
            event = await queue.get()
            yield event
            if event["type"] in TERMINAL:
                return

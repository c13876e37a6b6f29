"""Follow-up questions about an analysed image, answered with the conversation's history.

The history is the conversation's earlier answered exchanges, in RadVLM's multi-turn format
(``prompts.render``: the image in the first user turn only). The answer streams to ``publish``
as it is generated and is stored with its boxes mapped to pixels of the original image.
Whoever runs it (a GPU worker, a redelivered task, ``serve``'s model thread) finds the exchange
in the database; an exchange already answered is not asked again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radvlm.backends.base import GenerationParams, ModelBackend, ModelUnavailable, PromptTooLong
from radvlm.parsing import boxes_from_answer
from radvlm.prompts import Turn
from records.chat_events import Event, channel
from records.clock import Clock
from records.metrics import observe_generation
from records.pixels import PixelError, read_model_image
from records.storage import InstanceStore, removed
from records.tables import Exchange, ExchangeState, Instance
from records.text import one_line, plain_text

log = logging.getLogger(__name__)

Publish = Callable[[Event], None]


def history(exchanges: list[Exchange], position: int) -> list[Turn]:
    """The answered exchanges before ``position`` as turns, then the question at ``position``."""
    turns: list[Turn] = []
    for exchange in exchanges:
        if exchange.position < position and exchange.state is ExchangeState.answered and exchange.answer:
            turns += [Turn("user", exchange.question), Turn("assistant", exchange.answer)]
        elif exchange.position == position:
            turns.append(Turn("user", exchange.question))
    return turns


def _claim(session: Session, exchange_id: int, worker: str | None) -> tuple[list[Turn], str] | Event:
    """The turns and image path to answer with, or the terminal event of an exchange already settled."""
    exchange = session.get(Exchange, exchange_id, with_for_update=True)
    if exchange is None:
        return {"type": "error", "status": 404, "detail": f"no question {exchange_id}"}
    if exchange.state is ExchangeState.answered:
        return {"type": "done"}
    if exchange.state is ExchangeState.failed:
        return {"type": "error", "status": 502, "detail": exchange.error or "the model failed"}
    conversation = exchange.conversation
    instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == conversation.sop_instance_uid))
    if instance is None or instance.removed_at is not None:
        exchange.state = ExchangeState.failed
        exchange.error = removed(instance.removed_at) if instance else "the conversation's image is no longer stored"
        return {"type": "error", "status": 410, "detail": exchange.error}
    path = instance.path
    exchange.state, exchange.worker = ExchangeState.answering, worker
    return history(conversation.exchanges, exchange.position), path


def answer_question(exchange_id: int, *, sessions: sessionmaker[Session], store: InstanceStore,
                    backend: ModelBackend, params: GenerationParams, clock: Clock,
                    publish: Publish, worker: str | None = None) -> None:
    """Answer one exchange and store the answer; every outcome ends with a ``done`` or ``error`` event.
    ``worker``: the GPU worker's announced name, kept on the exchange while it answers (worker.lapses)."""
    with sessions() as session, session.begin():
        claimed = _claim(session, exchange_id, worker)
    if isinstance(claimed, dict):
        publish(claimed)
        return
    turns, path = claimed
    try:
        image = read_model_image(store.path(path))
        completion = backend.generate(image.pixels, turns, params,
                                      on_text=lambda text: publish({"type": "token", "text": plain_text(text)}))
    except PixelError as exc:
        _failed(sessions, exchange_id, f"the image cannot be decoded: {exc}", publish, 422)
        return
    except ModelUnavailable as exc:
        _failed(sessions, exchange_id, f"the model is unavailable: {exc}", publish, 503)
        return
    except PromptTooLong as exc:
        _failed(sessions, exchange_id, f"the conversation is too long for the model, start a new one: {exc}",
                publish, 422)
        return
    except Exception as exc:  # the model failed; the radiologist sees why and may ask again
        log.exception("question %d: the model failed", exchange_id)
        _failed(sessions, exchange_id, f"the model failed: {type(exc).__name__}: {exc}", publish, 502)
        return
    observe_generation("chat", completion.new_tokens, completion.seconds)
    parsed = boxes_from_answer(completion.text, image.columns, image.rows)
    try:
        with sessions() as session, session.begin():
            exchange = session.get_one(Exchange, exchange_id, with_for_update=True)
            exchange.answer, exchange.malformed = completion.text, parsed.malformed
            exchange.boxes = [box.model_dump(mode="json") for box in parsed.boxes]
            exchange.model_id, exchange.model_revision = backend.model_id, backend.model_revision
            exchange.state, exchange.error, exchange.answered_at = ExchangeState.answered, None, clock()
    except Exception as exc:  # the answer cannot be stored: the question is freed and the client told now
        log.exception("question %d: the answer could not be stored", exchange_id)
        _failed(sessions, exchange_id, f"the answer could not be stored: {type(exc).__name__}: {exc}", publish, 502)
        return
    log.info("question %d answered in %.1f s (%d tokens, %d boxes)", exchange_id, completion.seconds,
             completion.new_tokens, len(parsed.boxes))
    publish({"type": "done"})


def _failed(sessions: sessionmaker[Session], exchange_id: int, reason: str, publish: Publish, status: int) -> None:
    """Mark the exchange failed and tell the waiting client, which is told even when the database is away."""
    reason = one_line(reason)
    try:
        with sessions() as session, session.begin():
            exchange = session.get_one(Exchange, exchange_id, with_for_update=True)
            exchange.state, exchange.error = ExchangeState.failed, reason
    finally:
        publish({"type": "error", "status": status, "detail": reason})


def redis_publisher(client: Any, exchange_id: int) -> Publish:
    """``publish`` for a GPU worker: each event as JSON on the exchange's channel (``client``: redis.Redis)."""
    name = channel(exchange_id)
    return lambda event: client.publish(name, json.dumps(event))

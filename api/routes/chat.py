"""Conversations about a study's image: questions answered with the history, as JSON or streamed (SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.access import find_study, require_radiologist
from api.askers import Asker, within
from api.deps import AskerDep, AuditDep, CurrentUser, SessionDep, SettingsDep
from api.problems import Problem
from api.schemas import ConversationIn, ConversationPublic, ExchangePublic, QuestionIn
from records.clock import utcnow
from records.latest import latest_result
from records.settings import ApiUser
from records.storage import removed
from records.tables import Conversation, Exchange, ExchangeState, Study, StudyState

router = APIRouter(prefix="/studies/{uid}/conversations", tags=["chat"])
CHATTABLE = (StudyState.analysed, StudyState.signed_off)
PENDING = (ExchangeState.queued, ExchangeState.answering)
LATE = "question {} is still waiting for the model; its answer will appear in the conversation"
ConversationId = Annotated[int, Path(ge=1, le=2**31 - 1)]  # a database integer


def _conversation(session: Session, user: ApiUser, uid: str,
                  conversation_id: ConversationId) -> tuple[Study, Conversation]:
    study = find_study(session, user, uid)
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.study_id != study.id or conversation.user_name != user.name:
        raise Problem(404, "unknown conversation", f"no conversation {conversation_id} of yours about study {uid}")
    return study, conversation


def _require_image(study: Study, sop: str) -> None:
    """The model answers from the image itself: 410 once it has been removed."""
    gone = next((i.removed_at for i in study.instances if i.sop_instance_uid == sop and i.removed_at), None)
    if gone is not None:
        raise Problem(410, "image removed", f"study {study.study_instance_uid}: {removed(gone)}")


@router.post("", status_code=201, response_model=ConversationPublic)
def create_conversation(uid: str, session: SessionDep, user: CurrentUser, audit: AuditDep,
                        body: ConversationIn | None = None) -> ConversationPublic:
    """Start a conversation about one analysed image of the study (the first one unless named; no body: the
    first one)."""
    named = body.sop_instance_uid if body else None
    audit("start_conversation", uid, named)
    require_radiologist(user, "ask the model")
    study = find_study(session, user, uid)
    result = latest_result(session, study)
    if study.state not in CHATTABLE or result is None:
        raise Problem(409, "study not analysed", f"study {uid} is {study.state.value}: ask once it is analysed")
    analysed = [image.sop_instance_uid for image in result.images]
    sop = named or analysed[0]
    if sop not in analysed:
        raise Problem(404, "no such image", f"image {sop} was not analysed in study {uid}")
    _require_image(study, sop)
    conversation = Conversation(study_id=study.id, sop_instance_uid=sop, user_name=user.name, created_at=utcnow())
    session.add(conversation)
    session.commit()
    return ConversationPublic.of(conversation, uid)


@router.get("", response_model=list[ConversationPublic])
def list_conversations(uid: str, session: SessionDep, user: CurrentUser, audit: AuditDep) -> list[ConversationPublic]:
    """Your conversations about the study, oldest first, with their questions and answers."""
    audit("read_conversations", uid)
    study = find_study(session, user, uid)
    rows = session.scalars(select(Conversation).where(Conversation.study_id == study.id,
                                                      Conversation.user_name == user.name).order_by(Conversation.id))
    return [ConversationPublic.of(row, uid) for row in rows]


@router.get("/{conversation_id}", response_model=ConversationPublic)
def get_conversation(uid: str, conversation_id: ConversationId, session: SessionDep, user: CurrentUser,
                     audit: AuditDep) -> ConversationPublic:
    """One of your conversations about the study, with its questions and answers so far; another user's conversation is
    answered 404."""
    audit("read_conversation", uid, str(conversation_id))
    _, conversation = _conversation(session, user, uid, conversation_id)
    return ConversationPublic.of(conversation, uid)


def new_exchange(uid: str, conversation_id: ConversationId, body: QuestionIn, session: SessionDep, user: CurrentUser,
                 audit: AuditDep, settings: SettingsDep, asker: AskerDep) -> tuple[int, Asker]:
    """Check and store the question (before any answer starts), and say which model answers it."""
    audit("ask", uid, body.text)
    require_radiologist(user, "ask the model")
    study, conversation = _conversation(session, user, uid, conversation_id)
    _require_image(study, conversation.sop_instance_uid)
    exchanges = conversation.exchanges
    waited_since = utcnow() - timedelta(seconds=settings.api.chat_timeout_s)
    if any(e.state in PENDING and e.asked_at > waited_since for e in exchanges):  # older ones were lost
        raise Problem(409, "question pending", "the previous question is still being answered")
    if len(exchanges) >= settings.api.chat_max_rounds:
        raise Problem(409, "conversation full", f"{len(exchanges)} questions asked: start a new conversation "
                                                f"(RadVLM was trained on conversations of 5-10 rounds)")
    exchange = Exchange(conversation_id=conversation.id, position=len(exchanges) + 1, question=body.text.strip(),
                        state=ExchangeState.queued, asked_at=utcnow())
    session.add(exchange)
    session.commit()
    return exchange.id, asker


NewExchange = Annotated[tuple[int, Asker], Depends(new_exchange)]


def _stored(request: Request, exchange_id: int) -> ExchangePublic:
    with request.app.state.sessions() as session:
        return ExchangePublic.of(session.get_one(Exchange, exchange_id))


@router.post("/{conversation_id}/questions", response_model=ExchangePublic,
             responses={502: {"description": "the model failed"}, 503: {"description": "no model is running"},
                        504: {"description": "no answer in time; it is stored when it comes"}})
async def ask(request: Request, uid: str, conversation_id: ConversationId, asked: NewExchange,
              settings: SettingsDep) -> ExchangePublic:
    """Ask and wait for the whole answer; boxes in it come back parsed and mapped to pixels."""
    exchange_id, asker = asked
    try:
        async for event in within(asker.events(exchange_id), settings.api.chat_timeout_s):
            if event["type"] == "error":
                raise Problem(event.get("status", 502), "the model could not answer", event["detail"])
    except TimeoutError:
        raise Problem(504, "no answer in time", LATE.format(exchange_id)) from None
    return await asyncio.to_thread(_stored, request, exchange_id)


@router.post("/{conversation_id}/questions/stream", response_class=EventSourceResponse,
             responses={200: {"description": "events: `token` {text}, then `done` (the stored exchange) "
                                             "or `error` {status, detail}"}})
async def ask_streaming(request: Request, uid: str, conversation_id: ConversationId, asked: NewExchange,
                        settings: SettingsDep) -> AsyncIterator[ServerSentEvent]:
    """Ask, and receive the answer as it is generated (server-sent events)."""
    exchange_id, asker = asked
    try:
        async for event in within(asker.events(exchange_id), settings.api.chat_timeout_s):
            if event["type"] == "token":
                yield ServerSentEvent(event="token", data={"text": event["text"]})
            elif event["type"] == "done":
                stored = await asyncio.to_thread(_stored, request, exchange_id)
                yield ServerSentEvent(event="done", data=stored.model_dump(mode="json"))
            else:
                yield ServerSentEvent(event="error", data={"status": event.get("status", 502),
                                                           "detail": event["detail"]})
    except TimeoutError:
        yield ServerSentEvent(event="error", data={"status": 504, "detail": LATE.format(exchange_id)})

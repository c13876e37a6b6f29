"""Greedy decoding of every question in flight together: the rows of all requests (the tasks of
several studies, chat turns) share each decode step, and a request joins the batch at the next
step (continuous batching), so throughput grows with load.

transformers' ``generate()`` cannot continue a batch whose rows have different lengths after a
prefix, and its continuous batching does not take LLaVA-OneVision; this engine works on its cache
classes directly. One thread owns the model. A request is the prefilled prefix of one image (its
KV cache) and the questions about it: the prefix cache is repeated once per question and each
question's tokens are placed after padding, so that every row ends at the same cache slot; when
rows of different images meet, the shorter side is padded on the left. Padding is masked out and
every row keeps its own position ids (the positions it would have alone), so each answer is the
one plain ``generate()`` gives. Rows leave the batch as they finish; a request's future is resolved
when its last row does.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import GenerationParams, OnText

log = logging.getLogger(__name__)


@dataclass
class Row:
    tail: list[int]  # the question's tokens after the prefix
    params: GenerationParams
    tokens: list[int] = field(default_factory=list)  # the answer, without the end-of-turn token
    ended: bool = False  # the model ended its turn (as generate() counts it, one more new token)
    on_token: Callable[[int], None] | None = None  # each new token, as it is chosen (on the engine's thread)
    nbytes: int = 0  # the KV cache this row may come to hold (its prompt and its longest answer)


PrefixSource = Callable[[], tuple[int, Any]]  # on the engine thread: (length, KV cache) of the image prefix


@dataclass(eq=False)
class Request:
    rows: list[Row]
    prefix: PrefixSource
    future: Future[list[Row]]
    left: int = 0  # rows still decoding
    urgent: bool = False  # someone is reading the answer as it comes: admitted before the others waiting


@dataclass
class _Batch:
    """The rows decoding now: their cache (every row ends at ``slot``), mask, next positions, the
    logits of their next token, and who each row belongs to."""

    cache: Any
    mask: Any
    next_position: Any
    logits: Any
    owners: list[tuple[Request, Row]]
    slot: int


def _copy_cache(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _left_padded(torch: Any, tensor: Any, dim: int, width: int) -> Any:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _merged(torch: Any, a: _Batch, b: _Batch) -> _Batch:
    """One batch of the rows of ``a`` then ``b``, the one ending at the lower slot padded on the left."""
    slot = max(a.slot, b.slot)
    pad_a, pad_b = slot - a.slot, slot - b.slot
    layers = [(torch.cat([_left_padded(torch, la.keys, 2, pad_a), _left_padded(torch, lb.keys, 2, pad_b)]),
               torch.cat([_left_padded(torch, la.values, 2, pad_a), _left_padded(torch, lb.values, 2, pad_b)]))
              for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)]
    return _Batch(_copy_cache(layers),
                  torch.cat([_left_padded(torch, a.mask, 1, pad_a), _left_padded(torch, b.mask, 1, pad_b)]),
                  torch.cat([a.next_position, b.next_position]), torch.cat([a.logits, b.logits]),
                  a.owners + b.owners, slot)


class DecodeEngine:
    """The model's decode loop on a thread of its own; ``submit`` from any thread.

    The rows decoding at once hold at most ``budget_bytes`` of KV cache between them (each row its
    own copy of its image's prefix, about 0.4 GB for RadVLM-7B, and its answer); a request that does
    not fit waits for rows to finish, urgent ones first, otherwise in order, and one larger than the
    budget runs alone.
    """

    def __init__(self, model: Any, torch: Any, device: Any, eos: set[int], pad_id: int, budget_bytes: int) -> None:
        self.model, self.torch, self.device = model, torch, device
        self.eos, self.pad_id, self.budget_bytes = sorted(eos), pad_id, budget_bytes
        self.steps = 0  # forward passes of one token per row, shared by every row decoding
        self._pending: deque[Request] = deque()
        self._running: list[Request] = []  # admitted, perhaps finished (the engine thread's)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    def submit(self, rows: list[Row], prefix: PrefixSource, *, urgent: bool = False) -> Future[list[Row]]:
        request = Request(rows, prefix, Future(), len(rows), urgent)
        with self._wake:
            if self._closed:
                raise RuntimeError("the decode engine has stopped")
            self._pending.append(request)
            self._wake.notify()
        return request.future

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _admitted(self, batch: _Batch | None) -> list[Request]:
        """Wait for work; take the waiting requests that fit beside the rows of ``batch``: urgent ones,
        then the others, each in order, up to the first that does not fit."""
        live = sum(row.nbytes for _, row in batch.owners) if batch else 0
        with self._wake:
            while not self._pending and batch is None and not self._closed:
                self._wake.wait()
            taken: list[Request] = []
            for request in sorted(self._pending, key=lambda waiting: not waiting.urgent):
                nbytes = sum(row.nbytes for row in request.rows)
                if live + nbytes > self.budget_bytes and (batch or taken):
                    break
                taken.append(request)
                live += nbytes
            for request in taken:
                self._pending.remove(request)
            return taken

    def _run(self) -> None:
        try:
            with self.torch.inference_mode():  # this thread only ever runs the model
                self._loop()
        except BaseException as exc:  # the thread is ending: nobody may wait for it forever
            log.critical("decode engine stopped: %s", exc)
            with self._wake:
                self._closed = True
                stranded, self._pending = [*self._pending, *self._running], deque()
            for request in stranded:
                if not request.future.done():
                    request.future.set_exception(RuntimeError(f"the decode engine stopped: {exc}"))
            raise

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            admitted = self._admitted(batch)
            if batch is None and not admitted and self._closed:
                return
            self._running = [request for request in self._running if not request.future.done()] + admitted
            for request in admitted:
                if not request.future.set_running_or_notify_cancel():
                    continue
                try:  # this request's own failure (its image, its memory) fails it alone: the batch goes on
                    joining = self._prefilled(request)
                    if joining is not None:
                        batch = joining if batch is None else _merged(self.torch, batch, joining)
                except Exception as exc:
                    request.future.set_exception(exc)
            if batch is None:
                continue
            try:
                batch = self._step(batch)
            except Exception as exc:  # a failed step leaves no usable cache: every request in it fails
                log.error("decode step failed for %d row(s): %s", len(batch.owners), exc)
                for request in self._running:
                    if not request.future.done():
                        request.future.set_exception(exc)
                batch, self._running = None, []

    def _prefilled(self, request: Request) -> _Batch | None:
        """The request's rows after their questions: the logits of each row's first answer token."""
        if not request.rows:
            request.future.set_result([])
            return None
        torch, device = self.torch, self.device
        length, prefix_cache = request.prefix()
        rows = request.rows
        width = max(len(row.tail) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), length + width), dtype=torch.long, device=device)
        mask[:, :length] = 1
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            start = width - len(row.tail)
            ids[index, start:] = torch.tensor(row.tail, device=device)
            mask[index, length + start:] = 1
            positions[index, start:] = torch.arange(length, length + len(row.tail), device=device)
        cache = _copy_cache([(layer.keys.repeat(len(rows), 1, 1, 1), layer.values.repeat(len(rows), 1, 1, 1))
                             for layer in prefix_cache.layers])
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            cache_position=torch.arange(length, length + width, device=device),
                            use_cache=True).logits[:, -1]
        next_position = torch.tensor([length + len(row.tail) for row in rows], device=device)
        return _Batch(cache, mask, next_position, logits, [(request, row) for row in rows], length + width)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Choose every row's next token, let finished rows go, and run one forward pass for the rest."""
        torch = self.torch
        logits = batch.logits
        for position, (_, row) in enumerate(batch.owners):
            if len(row.tokens) < row.params.min_new_tokens:
                logits[position, self.eos] = float("-inf")
        chosen = logits.argmax(-1)
        keep = []
        for position, ((request, row), token) in enumerate(zip(batch.owners, chosen.tolist(), strict=True)):
            if token in self.eos:
                row.ended = True
            else:
                row.tokens.append(token)
                if row.on_token is not None:
                    row.on_token(token)
                if len(row.tokens) < row.params.max_new_tokens:
                    keep.append(position)
                    continue
            request.left -= 1
            if request.left == 0:
                request.future.set_result(request.rows)
        if not keep:
            return None
        if len(keep) < len(batch.owners):
            selected = torch.tensor(keep, device=self.device)
            batch.cache.batch_select_indices(selected)
            batch.mask, batch.next_position = batch.mask[selected], batch.next_position[selected]
            chosen = chosen[selected]
            batch.owners = [batch.owners[position] for position in keep]
        batch.mask = torch.cat([batch.mask, torch.ones((len(keep), 1), dtype=torch.long, device=self.device)], dim=1)
        batch.logits = self.model(input_ids=chosen[:, None], attention_mask=batch.mask,
                                  position_ids=batch.next_position[:, None], past_key_values=batch.cache,
                                  cache_position=torch.tensor([batch.slot], device=self.device),
                                  use_cache=True).logits[:, -1]
        batch.slot += 1
        batch.next_position = batch.next_position + 1
        self.steps += 1
        return batch


def stream_relay(tokenizer: Any, on_text: OnText | None, skip_prompt: bool = False) -> Any:
    """transformers' ``TextStreamer`` (decoded a word at a time) handing text to ``on_text`` (None: no streaming)."""
    if on_text is None:
        return None
    from transformers import TextStreamer

    class Relay(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Relay(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)

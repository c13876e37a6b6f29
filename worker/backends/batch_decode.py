"""Greedy decoding of every question in flight together: the rows of all requests (the tasks of
several studies, chat turns) share each decode step, and a request joins the batch at the next
step (continuous batching), so throughput grows with load.

transformers' ``generate()`` cannot continue a batch whose rows have different lengths after a
prefix, and its continuous batching does not take LLaVA-OneVision; this engine works on its cache
classes directly. One thread owns the model. A request is the prefilled prefix of one image (its
KV cache) and the questions about it. Each question is prefilled from a copy of the prefix and
then moved into a row of a static cache allocated once (``RowStore``): a row holds one question's
tokens from position 0, and every row writes its next token at its own position, so rows of
different lengths and different images decode side by side with nothing shifted or padded. The
mask says which positions each row sees and every row keeps its own position ids, so each answer
is the one plain ``generate()`` gives. Because the shapes of a decode step depend only on how many
rows it covers (rounded up to a few bucket sizes), the step can be compiled, and on a GPU captured
as a CUDA graph per bucket: no Python or kernel-launch overhead inside a step, whatever the model's
depth. torch.compile's automatic dynamic shapes compile it twice: for one row, then once with the
batch size symbolic, which every larger bucket shares (compiling each bucket on its own took seven
compilations, minutes for RadVLM, at every start).

A new image's prefix (~7,300 tokens, 0.27 s of an H100) is prefilled a chunk at a time, with a
decode step between chunks: the rows decoding (a radiologist's streamed answer among them) never
stand still for a whole image, only for one chunk.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import GenerationParams, OnText, PromptTooLong

log = logging.getLogger(__name__)

# More rows gain little: every row attends over its whole length, so 64 RadVLM rows already read
# ~43 GB of KV cache a step, well over the 16 GB of weights that a step of any size reads.
MAX_ROWS = 64


@dataclass
class Row:
    tail: list[int]  # the question's tokens after the prefix
    params: GenerationParams
    tokens: list[int] = field(default_factory=list)  # the answer, without the end-of-turn token
    ended: bool = False  # the model ended its turn (as generate() counts it, one more new token)
    on_token: Callable[[int], None] | None = None  # each new token, as it is chosen (on the engine's thread)


# On the engine thread: the image prefix's (length, KV cache), prefilled a part at each step of the
# generator (nothing to do when it is cached), so that decode steps run between the parts.
PrefixSource = Callable[[], Generator[None, None, tuple[int, Any]]]


@dataclass(eq=False)
class Request:
    rows: list[Row]
    prefix: PrefixSource
    future: Future[list[Row]]
    waiting: list[Row]  # rows not yet given a place in the store
    left: int = 0  # rows not finished
    urgent: bool = False  # someone is reading the answer as it comes: admitted before the others waiting
    started: bool = False
    filling: Generator[None, None, tuple[int, Any]] | None = None  # its prefix, part prefilled
    prefixed: tuple[int, Any] | None = None  # its prefix, prefilled: (length, KV cache)


def buckets(rows: int) -> list[int]:
    """The batch sizes a decode step runs at (each its own CUDA graph on a GPU): powers of two, then
    all rows."""
    return sorted({size for size in (1, 2, 4, 8, 16, 32) if size < rows} | {rows})


@functools.cache
def _row_layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class RowLayer(StaticLayer):
        """One decoder layer's view of the store: each row writes its new key and value at its own
        position. Queries count as the last position: the causal limit is each row's mask."""

        def __init__(self, torch: Any, keys: Any, values: Any, index: Any, position: Any) -> None:
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values, self.index, self.position = keys, values, index, position
            self.device = keys.device
            self.batch_size, self.num_heads, _, self.k_head_dim = keys.shape
            self.v_head_dim = values.shape[-1]
            self.is_initialized = True
            for tensor in (keys, values, index, position):
                torch._dynamo.mark_static_address(tensor)

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            self.keys[self.index, :, self.position] = key_states[:, :, -1]
            self.values[self.index, :, self.position] = value_states[:, :, -1]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.max_cache_len - 1

    return RowLayer


class RowStore:
    """The KV cache of the rows decoding: ``rows`` rows of ``row_tokens`` positions in every layer,
    allocated once (so compiled steps and CUDA graphs see the same addresses every time), and each
    row's mask, next position and next token.

    A free row sees only its position 0 and writes there: it computes nothing anyone reads, but
    nothing that is not a number either (a masked position holding NaN would poison the rows after).
    """

    def __init__(self, torch: Any, text_config: Any, rows: int, row_tokens: int, dtype: Any, device: Any) -> None:
        from transformers.cache_utils import Cache

        self.rows, self.row_tokens = rows, row_tokens
        heads = text_config.num_key_value_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        shape = (rows, heads, row_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_config.num_hidden_layers)]
        self.mask = torch.zeros((rows, row_tokens), dtype=torch.long, device=device)
        self.mask[:, 0] = 1
        self.position = torch.zeros(rows, dtype=torch.long, device=device)  # where each row writes next
        self.live = torch.zeros(rows, dtype=torch.long, device=device)
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.index = torch.arange(rows, device=device)
        layer = _row_layer_class()
        self.caches = {size: Cache(layers=[layer(torch, keys[:size], values[:size], self.index[:size],
                                                 self.position[:size])
                                           for keys, values in zip(self.keys, self.values, strict=True)])
                       for size in buckets(rows)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def place(self, row: int, layers: list[tuple[Any, Any]], source: int, spans: list[tuple[int, int]]) -> None:
        """Copy the keys and values of ``source`` (a row of a prefilled batch) at ``spans`` into ``row``,
        end to end from position 0, and let the row see them."""
        length = 0
        for start, end in spans:
            for index, (keys, values) in enumerate(layers):
                self.keys[index][row, :, length:length + end - start] = keys[source, :, start:end]
                self.values[index][row, :, length:length + end - start] = values[source, :, start:end]
            length += end - start
        self.mask[row] = 0
        self.mask[row, :length] = 1
        self.position[row] = length
        self.live[row] = 1

    def free(self, row: int) -> None:
        self.mask[row] = 0
        self.mask[row, 0] = 1
        self.position[row] = 0
        self.live[row] = 0


class DecodeEngine:
    """The model's decode loop on a thread of its own; ``submit`` from any thread.

    ``rows`` questions decode at once, each within ``row_tokens`` (its prompt and its longest
    answer). Questions that find no free row wait, urgent ones first, otherwise in order; the rows
    of one request may enter in several goes. ``compile_steps`` compiles the decode step at start,
    for one row and for any larger bucket (as a CUDA graph per bucket on a GPU).
    """

    def __init__(self, model: Any, torch: Any, device: Any, eos: set[int], pad_id: int, *, rows: int,
                 row_tokens: int, compile_steps: bool = False) -> None:
        self.model, self.torch, self.device = model, torch, device
        self.eos, self.pad_id = sorted(eos), pad_id
        self.store = RowStore(torch, model.config.text_config, rows, row_tokens, model.dtype, device)
        self.steps = 0  # forward passes of one token per row, shared by every row decoding
        self.prefill_breaks = 0  # times an image's prefill stopped for a decode step (its parts less one)
        self._slots: list[tuple[Request, Row] | None] = [None] * rows
        self._logits = torch.zeros((rows, model.config.text_config.vocab_size), dtype=model.dtype, device=device)
        self._forward = self._decode_forward
        if compile_steps:
            # dynamic=None: the batch size turns symbolic at the second bucket, so one graph serves all
            compiled = torch.compile(self._decode_forward, fullgraph=True, dynamic=None,
                                     mode="reduce-overhead" if device.type == "cuda" else None)

            def step(*args: Any) -> Any:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits were copied out
                return compiled(*args)

            self._forward = step
        self.compiled = compile_steps
        self._pending: deque[Request] = deque()
        self._started: list[Request] = []  # started and not finished (the engine thread's)
        self._wake = threading.Condition()
        self._closed = False
        self.ready = threading.Event()  # the decode step is compiled (or will not be): questions are answered now
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    def submit(self, rows: list[Row], prefix_length: int, prefix: PrefixSource, *,
               urgent: bool = False) -> Future[list[Row]]:
        for row in rows:
            need = prefix_length + len(row.tail) + row.params.max_new_tokens
            if need > self.store.row_tokens:
                raise PromptTooLong(f"a question of {prefix_length + len(row.tail)} prompt tokens and up to "
                                    f"{row.params.max_new_tokens} new ones needs {need} positions; a decode row "
                                    f"holds {self.store.row_tokens} (raise model.max_prompt_tokens)")
        request = Request(rows, prefix, Future(), list(rows), len(rows), urgent)
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

    def _occupied(self) -> list[tuple[int, Request, Row]]:
        """The rows decoding: (row of the store, its request, its question), in store order."""
        return [(index, *slot) for index, slot in enumerate(self._slots) if slot is not None]

    def _run(self) -> None:
        try:
            with self.torch.inference_mode():  # this thread only ever runs the model
                if self.compiled:
                    self._warm_up()
                self.ready.set()
                self._loop()
        except BaseException as exc:  # the thread is ending: nobody may wait for it forever
            log.critical("decode engine stopped: %s", exc)
            self.ready.set()
            with self._wake:
                self._closed = True
                stranded, self._pending = [*self._pending, *self._started], deque()
            for request in stranded:
                if not request.future.done():
                    request.future.set_exception(RuntimeError(f"the decode engine stopped: {exc}"))
            raise

    def _warm_up(self) -> None:
        """Compile (and on a GPU capture) the decode step of every bucket size before any question
        waits for it; the rows are all free, so nothing is written that anyone reads."""
        sizes = buckets(self.store.rows)
        log.info("compiling the decode step for batches of %s rows (once per start)", sizes)
        start = time.perf_counter()
        try:
            for size in sizes:
                for _ in range(3):  # CUDA graph trees record on the second and third call
                    self._forward(self.store.ids[:size], self.store.mask[:size], self.store.position[:size, None],
                                  self.store.caches[size])
        except Exception as exc:  # still right, only slower: the worker goes on and says why
            log.error("the decode step cannot be compiled, decoding uncompiled (several times slower): %s: %s; "
                      "set model.compile_decode = false to skip the attempt", type(exc).__name__, exc)
            self._forward, self.compiled = self._decode_forward, False
            return
        log.info("decode step compiled in %.0f s", time.perf_counter() - start)

    def _loop(self) -> None:
        """Each turn: give free rows to waiting questions, urgent requests first, then the others, each
        in order; prefill at most one part of a new image's prefix; then one decode step for every row."""
        while True:
            with self._wake:
                while not self._pending and not self._occupied() and not self._closed:
                    self._wake.wait()
                if not self._pending and not self._occupied():
                    return  # closed, and everything submitted is answered
                waiting = sorted(self._pending, key=lambda request: not request.urgent)
            self._started = [request for request in self._started if not request.future.done()]
            free = self._slots.count(None)
            for request in waiting:
                if free == 0:
                    break
                if request.future.done() or not self._start(request):  # failed while part of it decoded
                    self._forget(request)
                    continue
                try:  # this request's own failure (its image, its memory) fails it alone: the batch goes on
                    if request.prefixed is None:
                        self._prefill_part(request)
                        if request.prefixed is None:
                            break  # the rest of its prefix after the next step
                    rows, request.waiting = request.waiting[:free], request.waiting[free:]
                    free -= len(rows)
                    self._join(request, rows)
                    if not request.waiting:  # its rows hold copies of the prefix now
                        request.prefixed = None
                        self._forget(request)
                except Exception as exc:
                    self._fail(request, exc)
            occupied = self._occupied()
            if not occupied:
                continue
            try:
                self._step(occupied)
            except Exception as exc:  # a failed step leaves no usable cache: every request in it fails
                log.error("decode step failed for %d row(s): %s", len(occupied), exc)
                for request in {request for _, request, _ in occupied}:
                    self._fail(request, exc)

    def _start(self, request: Request) -> bool:
        """Mark ``request`` running when it is first taken up; False if its caller cancelled it."""
        if request.started:
            return True
        request.started = True
        self._started.append(request)
        return request.future.set_running_or_notify_cancel()

    def _forget(self, request: Request) -> None:
        with self._wake:
            if request in self._pending:
                self._pending.remove(request)

    def _prefill_part(self, request: Request) -> None:
        """One part of the request's image prefix (the lot when it is cached)."""
        if request.filling is None:
            request.filling = request.prefix()
        try:
            next(request.filling)
            self.prefill_breaks += 1
        except StopIteration as filled:
            request.prefixed, request.filling = filled.value, None

    def _fail(self, request: Request, exc: BaseException) -> None:
        for index, slot in enumerate(self._slots):
            if slot is not None and slot[0] is request:
                self._slots[index] = None
                self.store.free(index)
        request.filling = request.prefixed = None
        self._forget(request)
        if not request.future.done():
            request.future.set_exception(exc)

    def _join(self, request: Request, rows: list[Row]) -> None:
        """Prefill ``rows``' questions from a copy of the image prefix, put them in free rows of the
        store with the logits of their first answer token."""
        torch, device = self.torch, self.device
        assert request.prefixed is not None
        length, prefix_cache = request.prefixed
        width = max(len(row.tail) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), length + width), dtype=torch.long, device=device)
        mask[:, :length] = 1
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for index, row in enumerate(rows):  # questions of different lengths end together: padded on the left
            start = width - len(row.tail)
            ids[index, start:] = torch.tensor(row.tail, device=device)
            mask[index, length + start:] = 1
            positions[index, start:] = torch.arange(length, length + len(row.tail), device=device)
        from transformers import DynamicCache

        cache = DynamicCache()
        for index, layer in enumerate(prefix_cache.layers):
            cache.update(layer.keys.repeat(len(rows), 1, 1, 1), layer.values.repeat(len(rows), 1, 1, 1), index)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        free = [index for index, slot in enumerate(self._slots) if slot is None]
        for source, (row, index) in enumerate(zip(rows, free[:len(rows)], strict=True)):
            self.store.place(index, layers, source, [(0, length), (length + width - len(row.tail), length + width)])
            self._logits[index] = logits[source]
            self._slots[index] = (request, row)

    def _step(self, occupied: list[tuple[int, Request, Row]]) -> None:
        """Choose every row's next token, let finished rows go, and run one forward pass for the rest."""
        store = self.store
        live = [index for index, _, _ in occupied]
        logits = self._logits[live]
        for position, (_, _, row) in enumerate(occupied):
            if len(row.tokens) < row.params.min_new_tokens:
                logits[position, self.eos] = float("-inf")
        chosen = logits.argmax(-1)
        going_on = []
        for (index, request, row), token in zip(occupied, chosen.tolist(), strict=True):
            if token in self.eos:
                row.ended = True
            else:
                row.tokens.append(token)
                if row.on_token is not None:
                    row.on_token(token)
                if len(row.tokens) < row.params.max_new_tokens:
                    going_on.append(index)
                    continue
            self._slots[index] = None
            store.free(index)
            request.left -= 1
            if request.left == 0:
                request.future.set_result(request.rows)
        if not going_on:
            return
        store.ids[live, 0] = chosen
        size = next(size for size in buckets(store.rows) if size > going_on[-1])
        store.mask[store.index[:size], store.position[:size]] = 1
        logits = self._forward(store.ids[:size], store.mask[:size], store.position[:size, None], store.caches[size])
        self._logits[:size] = logits
        store.position[:size] += store.live[:size]
        self.steps += 1

    def _decode_forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """One token for each of the first rows of the store (what is compiled)."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=True).logits[:, -1]


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

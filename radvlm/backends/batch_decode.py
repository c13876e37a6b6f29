"""Greedy decoding of every question in flight together: the rows of all requests (the tasks of
several studies, chat turns) share each decode step, and a request joins the batch at the next
step (continuous batching), so throughput grows with load.

transformers' ``generate()`` cannot continue a batch whose rows have different lengths after a
prefix, and its continuous batching does not take LLaVA-OneVision; this engine keeps the keys and
values itself (``KVStore``) and gives the model an attention function of its own, registered
through transformers' attention interface (``ROW_ATTENTION``): the model code is not touched.

Storage and attention: ``radvlm.backends.kv_rows``.

A decode step covers exactly the rows decoding and runs without the host: the tokens fed, the
positions, where each key goes, the end-of-turn suppression for ``min_new_tokens`` and the choice
of the next token all stay on the device; the host reads the chosen tokens once per step (to
stream them, and to let finished rows go). Compiled (``compile_steps``), its batch size, slot
count, rows per slot and the two spans are dynamic dimensions: a few graphs (one row; one image;
several images), compiled at start, serve every step.

A new image's prefix (~7,300 tokens, 0.27 s of an H100) is prefilled a chunk at a time, with a
decode step between chunks: the rows decoding (a radiologist's streamed answer among them) never
stand still for a whole image, only for one chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from radvlm.backends.base import GenerationParams, OnText, PromptTooLong
from radvlm.backends.kv_rows import (
    BLOCK,
    MAX_MEMBERS,
    NO_MASK,
    KVStore,
    RowBatch,
    register_row_attention,
    round_up,
)

log = logging.getLogger(__name__)

MIN_QUESTION_TOKENS = 512  # a row's tail holds at least this many question tokens besides the answer


@dataclass
class Row:
    """One question of a request: its tokens after the image prefix, and the answer as it decodes (``on_token`` hears
    each token, on the engine's thread)."""

    tail: list[int]  # the question's tokens after the prefix
    params: GenerationParams
    tokens: list[int] = field(default_factory=list)  # the answer, without the end-of-turn token
    ended: bool = False  # the model ended its turn (as generate() counts it, one more new token)
    on_token: Callable[[int], None] | None = None  # each new token, as it is chosen (on the engine's thread)


# On the engine thread: the image prefix's (length, KV cache), prefilled a part at each step of the
# generator (nothing to do when it is cached), so that decode steps run between the parts.
PrefixSource = Callable[[], Generator[None, None, tuple[int, Any]]]


@dataclass(eq=False)
class Slot:
    """An image in flight: where its prefix lies in the store, and who reads it."""

    index: int
    key: str | None  # the image's key: requests about the same image share the slot
    length: int  # prefix tokens
    holders: int = 0  # requests reading it (until their last row finishes)
    live: int = 0  # rows decoding from it now


@dataclass(eq=False)
class Request:
    """One ``submit``: rows about one image, answered together through ``future`` once the last one ends; the engine
    thread's record of its prefix, its slot and its rows still waiting."""

    rows: list[Row]
    prefix: PrefixSource
    future: Future[list[Row]]
    waiting: list[Row]  # rows not yet given a place in the store
    left: int = 0  # rows not finished
    urgent: bool = False  # someone is reading the answer as it comes: admitted before the others waiting
    key: str | None = None  # the image's key (None: shares no slot)
    started: bool = False
    filling: Generator[None, None, tuple[int, Any]] | None = None  # its prefix, part prefilled
    prefixed: tuple[int, Any] | None = None  # its prefix, prefilled, not yet in a slot: (length, KV cache)
    slot: Slot | None = None


@dataclass(eq=False)
class Live:
    """A row decoding: its request, its question and answer, its slot, and its tail's length (a host
    copy of the store's, so that a step's spans are chosen without reading the device)."""

    request: Request
    row: Row
    slot: Slot
    written: int


@dataclass
class Layout:
    """The rows of a decode step in slot order, as device tensors (rebuilt when rows come or go)."""

    order: list[int]  # tail rows, slot by slot
    tail_rows: Any
    member_of: Any
    members: int
    slots: int


class DecodeEngine:
    """The model's decode loop on a thread of its own; ``submit`` from any thread.

    Up to ``rows`` questions decode at once, their images' prefixes in ``slots`` slots of
    ``prefix_tokens`` positions and each question's tokens and answer in a tail of ``tail_tokens``.
    Questions that find no free row wait, urgent ones first, otherwise in order; the rows of one
    request may enter in several goes. ``compile_steps`` compiles the decode step at start.
    """

    def __init__(self, model: Any, torch: Any, device: Any, eos: set[int], pad_id: int, *, rows: int,
                 tail_tokens: int, slots: int, prefix_tokens: int, compile_steps: bool = False) -> None:
        self.model, self.torch, self.device = model, torch, device
        self.eos, self.pad_id = sorted(eos), pad_id
        model.set_attn_implementation({"text_config": register_row_attention()})
        self._language_model = model.model.language_model
        self._lm_head = model.get_output_embeddings()
        text = model.config.text_config
        self.store = KVStore(torch, text, slots=slots, prefix_tokens=prefix_tokens, rows=rows,
                             tail_tokens=tail_tokens, dtype=model.dtype, device=device)
        self._is_end = torch.zeros(text.vocab_size, dtype=torch.bool, device=device)
        self._is_end[self.eos] = True
        self.steps = 0  # forward passes of one token per row, shared by every row decoding
        self.prefill_breaks = 0  # times an image's prefill stopped for a decode step (its parts less one)
        self.slot_moves = 0  # prefixes moved to keep the slots in use first
        self._rows: list[Live | None] = [None] * rows
        self._slots: list[Slot | None] = [None] * slots
        self._layout: Layout | None = None
        self._forward = self._decode_forward
        self.compile_steps = compile_steps
        self.compiled = False  # the decode step runs compiled (set once the warm-up succeeded)
        self.compile_error: str | None = None  # why it does not, when it was asked to
        self.step_workspace_bytes = 0  # device memory a step of the largest shapes takes beyond the store (CUDA)
        self._graphs = 0  # compiled graphs after the warm-up (a later recompilation is logged)
        self._pending: deque[Request] = deque()
        self._started: list[Request] = []  # started and not finished (the engine thread's)
        self._wake = threading.Condition()
        self._closed = False
        self.ready = threading.Event()  # the decode step is compiled (or will not be): questions are answered now
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    def submit(self, rows: list[Row], prefix_length: int, prefix: PrefixSource, *, key: str | None = None,
               urgent: bool = False) -> Future[list[Row]]:
        """Decode ``rows`` after the image prefix of ``prefix_length`` tokens that ``prefix`` gives;
        requests with the same ``key`` (the same image) share its slot."""
        store = self.store
        if prefix_length > store.prefix_tokens:
            raise PromptTooLong(f"an image of {prefix_length} prefix tokens does not fit a slot of "
                                f"{store.prefix_tokens} (raise model.max_prompt_tokens)")
        for row in rows:
            need = len(row.tail) + row.params.max_new_tokens
            if need > store.tail_tokens:
                raise PromptTooLong(f"a question of {prefix_length + len(row.tail)} prompt tokens "
                                    f"({len(row.tail)} after the image) and up to {row.params.max_new_tokens} new ones "
                                    f"needs {need} positions after the image; a decode row holds {store.tail_tokens} "
                                    "(raise model.max_prompt_tokens)")
        request = Request(rows, prefix, Future(), list(rows), len(rows), urgent, key)
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

    def _live(self) -> list[int]:
        return [index for index, live in enumerate(self._rows) if live is not None]

    def _run(self) -> None:
        try:
            with self.torch.inference_mode():  # this thread only ever runs the model
                if self.compile_steps:
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

    # -- compilation -------------------------------------------------------------------------------

    def _warm_shapes(self) -> list[tuple[int, int, int, int, int]]:
        """(rows, slots, members, prefix span, tail span) of the steps the warm-up runs: each kind of step
        the store allows (one row; rows of one image; rows of several images) at the shortest spans and at
        the longest (the compiler may choose its kernels by size: both sides of any threshold are then
        compiled), the largest step last (its memory is measured)."""
        store = self.store
        rows, slots = store.rows, store.slots
        kinds = [(1, 1, 2)]  # row i of a step is member i // slots of slot i % slots
        if rows >= 2:
            kinds.append((min(rows, 3), 1, 3))
        if rows >= 2 and slots >= 2:
            kinds.append((min(rows, 5), 2, 3))
            members = min(MAX_MEMBERS, max(2, -(-rows // slots)))
            kinds.append((min(rows, slots * members), slots, members))
        else:
            kinds.append((min(rows, MAX_MEMBERS), 1, max(2, min(rows, MAX_MEMBERS))))
        return ([(*kind, BLOCK, BLOCK) for kind in kinds[:-1]] + [(*kind, store.prefix_tokens, store.tail_tokens)
                                                                   for kind in kinds])

    def _warm_up(self) -> None:
        """Compile the decode step for every graph it will need before any question waits for it; the
        rows are all free, so nothing is written that anyone reads. A failure is an error the worker
        reports (``radvlm_engine_compiled`` 0), never a silent fallback."""
        torch = self.torch
        from torch._dynamo.utils import counters

        compiled = self._compiled_step()
        shapes = self._warm_shapes()
        log.info("compiling the decode step (once per start) for (rows, slots, members, prefix span, tail span) %s",
                 shapes)
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        try:
            for rows, slots, members, prefix_span, tail_span in shapes:
                if cuda:
                    torch.cuda.synchronize(self.device)
                    before = torch.cuda.memory_allocated(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                order = list(range(rows))
                member_of = [index % slots * members + index // slots for index in order]
                layout = Layout(order, torch.tensor(order, device=self.device),
                                torch.tensor(member_of, device=self.device), members, slots)
                self._step_with(compiled, layout, prefix_span, tail_span, dynamic=True)
                if cuda:
                    torch.cuda.synchronize(self.device)
                    self.step_workspace_bytes = max(self.step_workspace_bytes,
                                                    torch.cuda.max_memory_allocated(self.device) - before)
        except Exception as exc:  # still right, only slower: the worker says so loudly
            self.compile_error = f"{type(exc).__name__}: {exc}"[:2000]
            log.error("the decode step cannot be compiled, decoding UNCOMPILED (several times slower; "
                      "radvlm_engine_compiled is 0): %s; set model.compile_decode = false to skip the attempt",
                      self.compile_error)
            return
        finally:
            self.store.tail_length.zero_()
        self._forward, self.compiled = compiled, True
        self._graphs = counters["stats"]["unique_graphs"]
        log.info("decode step compiled in %.0f s (%d graphs in this process); a step of the largest shapes "
                 "takes %.2f GB beside the store", time.perf_counter() - start, self._graphs,
                 self.step_workspace_bytes / 1e9)

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Each turn: give free rows to waiting questions, urgent requests first, then the others, each
        in order; prefill at most one part of a new image's prefix; read the tokens the rows chose, let
        finished rows go, and run one decode step for the others."""
        while True:
            with self._wake:
                while not self._pending and not any(self._rows) and not self._closed:
                    self._wake.wait()
                if not self._pending and not any(self._rows):
                    return  # closed, and everything submitted is answered
                waiting = sorted(self._pending, key=lambda request: not request.urgent)
            self._started = [request for request in self._started if not request.future.done()]
            free = self._rows.count(None)
            for request in waiting:
                if free == 0:
                    break
                if request.future.done() or not self._start(request):  # failed while part of it decoded
                    self._forget(request)
                    continue
                try:  # this request's own failure (its image, its memory) fails it alone: the batch goes on
                    if request.slot is None:
                        if request.prefixed is None and not self._share(request):
                            self._prefill_part(request)
                            if request.prefixed is None:
                                break  # the rest of its prefix after the next step
                        if request.slot is None and not self._place(request):
                            continue  # every slot is taken: it waits for one
                    assert request.slot is not None
                    room = min(free, MAX_MEMBERS - request.slot.live)
                    if room <= 0:
                        continue
                    rows, request.waiting = request.waiting[:room], request.waiting[room:]
                    free -= len(rows)
                    self._join(request, rows)
                    if not request.waiting:
                        self._forget(request)
                except Exception as exc:
                    self._fail(request, exc)
            if not any(self._rows):
                continue
            going_on = self._read()
            if not going_on:
                continue
            try:
                self._step(going_on)
            except Exception as exc:  # a failed step leaves no usable cache: every request in it fails
                log.error("decode step failed for %d row(s): %s", len(going_on), exc)
                for request in {self._rows[index].request for index in going_on if self._rows[index]}:
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

    def _share(self, request: Request) -> bool:
        """Give ``request`` the slot of its image if the image is decoding already (nothing prefilled,
        nothing copied)."""
        if request.key is None:
            return False
        for slot in self._slots:
            if slot is not None and slot.key == request.key:
                slot.holders += 1
                request.slot = slot
                return True
        return False

    def _place(self, request: Request) -> bool:
        """Write the request's prefilled prefix into a free slot (once per image in flight)."""
        if self._share(request):
            request.prefixed = None
            return True
        if None not in self._slots:
            return False
        assert request.prefixed is not None
        length, cache = request.prefixed
        index = self._slots.index(None)
        self.store.fill(index, [(layer.keys, layer.values) for layer in cache.layers], length)
        request.slot = self._slots[index] = Slot(index, request.key, length, holders=1)
        request.prefixed = None
        return True

    def _release(self, request: Request) -> None:
        """``request`` reads its slot no more; a slot nobody reads is freed, and the last slot in use
        moves into its place, so that the slots in use are always the first ones."""
        slot, request.slot = request.slot, None
        if slot is None:
            return
        slot.holders -= 1
        if slot.holders > 0:
            return
        last = max(index for index, other in enumerate(self._slots) if other is not None)
        self._slots[slot.index] = None
        if last != slot.index:
            moved = self._slots[last]
            assert moved is not None
            self.store.move(last, slot.index, moved.length)
            self._slots[last], self._slots[slot.index] = None, moved
            moved.index = slot.index
            self.slot_moves += 1
        self._layout = None

    def _fail(self, request: Request, exc: BaseException) -> None:
        for index, live in enumerate(self._rows):
            if live is not None and live.request is request:
                self._rows[index] = None
                live.slot.live -= 1
        self._layout = None
        self._release(request)
        request.filling = request.prefixed = None
        self._forget(request)
        if not request.future.done():
            request.future.set_exception(exc)

    def _join(self, request: Request, rows: list[Row]) -> None:
        """Prefill ``rows``' questions into free tails, reading the image's prefix in its slot, and
        choose each one's first answer token."""
        torch, device, store = self.torch, self.device, self.store
        slot = request.slot
        assert slot is not None
        free = [index for index, live in enumerate(self._rows) if live is None][:len(rows)]
        width = max(len(row.tail) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for index, row in enumerate(rows):  # padded on the right: a row's padding is never seen by it
            ids[index, :len(row.tail)] = torch.tensor(row.tail, dtype=torch.long)
        tails = torch.tensor(free, device=device)
        lengths = torch.tensor([len(row.tail) for row in rows], device=device)
        write_at = torch.arange(width, device=device).expand(len(rows), width)
        batch = RowBatch(store, slot.index, store.prefix_length[slot.index:slot.index + 1],
                         store.positions[:max(2, len(rows))], torch.arange(len(rows), device=device), tails,
                         write_at, store.positions[:round_up(slot.length)], store.positions[:round_up(width)])
        hidden = self._language_model(input_ids=ids.to(device), position_ids=write_at + slot.length,
                                      attention_mask=NO_MASK, use_cache=False, decode_rows=batch).last_hidden_state
        logits = self._lm_head(hidden[torch.arange(len(rows), device=device), lengths - 1])
        store.row_prefix[tails] = slot.length
        store.tail_length[tails] = lengths
        store.no_end[tails] = torch.tensor([row.params.min_new_tokens > 0 for row in rows], device=device)
        self._choose(tails, logits)
        for index, row in zip(free, rows, strict=True):
            self._rows[index] = Live(request, row, slot, len(row.tail))
        slot.live += len(rows)
        self._layout = None

    def _choose(self, tails: Any, logits: Any) -> None:
        """Each row's next token, greedy, the end of turn barred where ``min_new_tokens`` says (on the device)."""
        barred = self.store.no_end[tails][:, None] & self._is_end[None, :]
        self.store.next_token[tails] = logits.masked_fill(barred, float("-inf")).argmax(-1)

    def _read(self) -> list[int]:
        """The tokens the rows chose (the step's one read of the device): each row takes its token, the
        finished ones go; the rows that go on."""
        live = self._live()
        chosen = self.store.next_token[self.torch.tensor(live, device=self.device)].tolist()
        going_on = []
        for index, token in zip(live, chosen, strict=True):
            entry = self._rows[index]
            assert entry is not None
            row, request = entry.row, entry.request
            if token in self.eos:
                row.ended = True
            else:
                row.tokens.append(token)
                if row.on_token is not None:
                    row.on_token(token)
                if len(row.tokens) < row.params.max_new_tokens:
                    if len(row.tokens) == row.params.min_new_tokens:  # the end of turn is allowed from now
                        self.store.no_end[index] = False
                    going_on.append(index)
                    continue
            self._rows[index] = None
            entry.slot.live -= 1
            self._layout = None
            request.left -= 1
            if request.left == 0:
                self._release(request)
                request.future.set_result(request.rows)
        return going_on

    def _arrange(self, going_on: list[int]) -> Layout:
        """The rows of a step slot by slot, each slot's rows side by side (at least two places a slot:
        a graph for one member per slot is not needed)."""
        by_slot: dict[int, list[int]] = {}
        for index in going_on:
            entry = self._rows[index]
            assert entry is not None
            by_slot.setdefault(entry.slot.index, []).append(index)
        members = max(2, max(len(group) for group in by_slot.values()))
        order, member_of = [], []
        for slot in sorted(by_slot):
            for member, index in enumerate(by_slot[slot]):
                order.append(index)
                member_of.append(slot * members + member)
        torch, device = self.torch, self.device
        return Layout(order, torch.tensor(order, device=device), torch.tensor(member_of, device=device), members,
                      max(by_slot) + 1)

    def _step(self, going_on: list[int]) -> None:
        """One token for every row going on: spans to the next block of the longest prefix of the step's
        slots and of its longest tail (with the token written now)."""
        if self._layout is None:
            self._layout = self._arrange(going_on)
        layout = self._layout
        longest_prefix = max(slot.length for slot in self._slots[:layout.slots] if slot is not None)
        longest_tail = 0
        for index in layout.order:
            entry = self._rows[index]
            assert entry is not None
            longest_tail = max(longest_tail, entry.written + 1)
            entry.written += 1
        self._step_with(self._forward, layout, round_up(longest_prefix), round_up(longest_tail), dynamic=self.compiled)
        self.steps += 1
        if self.compiled:
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
            if graphs > self._graphs:
                self._graphs = graphs
                log.error("the decode step was compiled again while serving (%d rows, %d slots): every new shape "
                          "stalls the batch for the compilation", len(layout.order), layout.slots)

    def _compiled_step(self) -> Callable[..., None]:
        """The decode step compiled (no CUDA graphs: their shapes would be fixed, and a step's spans
        grow a block at a time): every dimension the step varies is dynamic, and two that happen to be
        equal at compilation are not taken for one (no duck shaping)."""
        torch = self.torch
        from torch.fx.experimental import _config as shapes

        compiled = torch.compile(self._decode_forward, fullgraph=True, dynamic=None)

        def step(*args: Any) -> None:
            with shapes.patch(use_duck_shape=False):
                compiled(*args)

        return step

    def _step_with(self, forward: Callable[..., Any], layout: Layout, prefix_span: int, tail_span: int, *,
                   dynamic: bool = False) -> None:
        store = self.store
        args = (layout.tail_rows, layout.member_of, store.positions[:layout.members],
                store.prefix_length[:layout.slots], store.positions[:prefix_span], store.positions[:tail_span])
        if dynamic:  # rows, members, slots and spans: one graph whatever their sizes (one row is its own)
            for tensor in args:
                if tensor.shape[0] > 1:
                    self.torch._dynamo.mark_dynamic(tensor, 0)
        forward(*args)

    def _decode_forward(self, tail_rows: Any, member_of: Any, members: Any, slot_length: Any, prefix_span: Any,
                        tail_span: Any) -> None:
        """One token for each row of ``tail_rows`` (what is compiled): fed, attended, chosen, counted."""
        store = self.store
        written = store.tail_length[tail_rows]
        batch = RowBatch(store, 0, slot_length, members, member_of, tail_rows, written[:, None], prefix_span,
                         tail_span)
        hidden = self._language_model(input_ids=store.next_token[tail_rows][:, None],
                                      position_ids=(store.row_prefix[tail_rows] + written)[:, None],
                                      attention_mask=NO_MASK, use_cache=False, decode_rows=batch).last_hidden_state
        self._choose(tail_rows, self._lm_head(hidden[:, -1]))
        store.tail_length[tail_rows] = written + 1


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

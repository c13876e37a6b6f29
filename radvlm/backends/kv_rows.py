"""Where the batched decode engine (``radvlm.backends.batch_decode``) keeps keys and values, and the attention
function that reads them in place of the model's own.

Storage: one *slot* per image in flight holds the keys and values of the image's prefix (~7,300
tokens), written once; every question about the image (the five tasks of a study, a chat turn
asked while they decode) is a *row* of its own that holds only its question and answer tokens (the
*tail*), with positions continuing after the prefix. A row reads its slot's prefix where it lies:
nothing is copied per question. Capacities are whole blocks of ``BLOCK`` positions.

Attention (``RowBatch.attend``): the query heads are grouped by key/value head (Qwen2-7B: 28 query
heads on 4 KV heads), so nothing is repeated. The prefix part is one batched matmul over the slots
of the step, each slot's rows side by side (so a slot's prefix is read once per step, however many
of its questions decode), over the slots' longest prefix rounded up to a block; the tail part reads
each row's tail over the step's longest tail rounded up to a block; one softmax over both, in
float32, and positions past a row's own length count as minus infinity. A step reads the live
tokens (to the next block), never the capacity.
"""


from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# More rows gain little: the weights (16 GB for RadVLM) dominate a step's reads until the KV cache
# read by its rows (0.42 GB per image, 6-170 MB per row) comes near them.
MAX_ROWS = 64
# Rows of one image decoding at once (a study asks five questions; more wait for one to finish):
# bounds the slot layout of the prefix part of attention (slots x members).
MAX_MEMBERS = 8
ROWS_PER_SLOT = 2  # a budget is split into slots and rows at this ratio (a study's image has 2-4 rows)
# Positions per block: every capacity of the store and every span a step reads is a multiple of it
# (aligned strides and lengths for the matmuls; a span grows a block at a time).
BLOCK = 128
ROW_ATTENTION = "radvlm_rows"  # the attention implementation the engine registers and sets on the language model
NO_MASK = {"full_attention": None}  # the row attention builds its own: transformers builds none


def round_up(tokens: int, block: int = BLOCK) -> int:
    """``tokens`` rounded up to whole blocks of ``block`` positions: the capacities and spans the engine works in."""
    return -(-tokens // block) * block


def split_budget(budget: int, slot_bytes: int, row_bytes: int) -> tuple[int, int]:
    """(slots, rows) in ``budget`` bytes: ``ROWS_PER_SLOT`` rows a slot up to ``MAX_ROWS`` rows, what is
    left in more slots (never more slots than rows); (0, 0) when not one of each fits."""
    if budget < slot_bytes + row_bytes:
        return 0, 0
    pairs = max(1, budget // (slot_bytes + ROWS_PER_SLOT * row_bytes))
    rows = min(MAX_ROWS, ROWS_PER_SLOT * pairs, (budget - slot_bytes) // row_bytes)
    return min(rows, (budget - rows * row_bytes) // slot_bytes), rows


def step_workspace(text_config: Any, prefix_tokens: int, tail_tokens: int, itemsize: int) -> tuple[int, int]:
    """Bytes a decode step of the largest shapes takes beside the store, for each slot and each row it
    covers (one layer's attention at a time: the slot layout's scores and weights, each row's scores in
    float32, its gathered tail, its logits); the warm-up measures the real figure."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    per_slot = 3 * MAX_MEMBERS * heads * prefix_tokens * itemsize
    per_row = (3 * heads * (prefix_tokens + tail_tokens) * 4 + 2 * text_config.vocab_size * itemsize
               + 2 * 2 * text_config.num_key_value_heads * tail_tokens * head_dim * itemsize)
    return per_slot, per_row


class KVStore:
    """The keys and values of the images and questions decoding, every layer, allocated once: ``slots``
    image prefixes of ``prefix_tokens`` positions and ``rows`` tails (question and answer) of
    ``tail_tokens``; and each row's state on the device (its prefix length, its tail length, the
    token it feeds next, whether the end of turn is still barred).
    """

    def __init__(self, torch: Any, text_config: Any, *, slots: int, prefix_tokens: int, rows: int,
                 tail_tokens: int, dtype: Any, device: Any) -> None:
        for name, tokens in (("prefix_tokens", prefix_tokens), ("tail_tokens", tail_tokens)):
            if tokens <= 0 or tokens % BLOCK:
                raise ValueError(f"{name} must be a positive multiple of {BLOCK}, not {tokens}")
        if slots < 1 or rows < 1:
            raise ValueError(f"a store needs a slot and a row, not {slots} and {rows}")
        self.slots, self.prefix_tokens, self.rows, self.tail_tokens = slots, prefix_tokens, rows, tail_tokens
        heads = text_config.num_key_value_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        layers = range(text_config.num_hidden_layers)

        def zeros(shape: tuple[int, ...]) -> Any:
            return torch.zeros(shape, dtype=dtype, device=device)

        # one block more than a slot or a row holds: no span a step reads is then a whole dimension of the
        # store, which compiled code would take for a constant (and compile again for every other span)
        self.prefix_keys = [zeros((slots, heads, prefix_tokens + BLOCK, head_dim)) for _ in layers]
        self.prefix_values = [zeros((slots, heads, prefix_tokens + BLOCK, head_dim)) for _ in layers]
        self.tail_keys = [zeros((rows, heads, tail_tokens + BLOCK, head_dim)) for _ in layers]
        self.tail_values = [zeros((rows, heads, tail_tokens + BLOCK, head_dim)) for _ in layers]
        self.prefix_length = torch.zeros(slots, dtype=torch.long, device=device)  # each slot's prefix
        self.row_prefix = torch.zeros(rows, dtype=torch.long, device=device)  # each row's prefix length
        self.tail_length = torch.zeros(rows, dtype=torch.long, device=device)  # each row's tail written
        self.next_token = torch.zeros(rows, dtype=torch.long, device=device)  # what each row feeds next
        self.no_end = torch.zeros(rows, dtype=torch.bool, device=device)  # min_new_tokens not reached yet
        # sliced to a span, a block or a member count: its length is the dimension (never 0 or 1)
        self.positions = torch.arange(max(prefix_tokens, tail_tokens, MAX_MEMBERS) + BLOCK, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.prefix_keys, *self.prefix_values, *self.tail_keys, *self.tail_values))

    def fill(self, slot: int, layers: list[tuple[Any, Any]], length: int) -> None:
        """Write an image's prefix (one batch row of keys and values per layer) into ``slot``."""
        for index, (keys, values) in enumerate(layers):
            self.prefix_keys[index][slot, :, :length] = keys[0, :, :length]
            self.prefix_values[index][slot, :, :length] = values[0, :, :length]
        self.prefix_length[slot] = length

    def move(self, source: int, target: int, length: int) -> None:
        """Move a slot's prefix (its ``length`` positions) to another slot."""
        for stored in (self.prefix_keys, self.prefix_values):
            for layer in stored:
                layer[target, :, :length] = layer[source, :, :length]
        self.prefix_length[target] = length


@dataclass
class RowBatch:
    """One forward pass over some rows, as the row attention reads it (passed to the model as the
    ``decode_rows`` keyword argument, which transformers hands to every attention call).

    Row ``i`` is member ``member_of[i] % G`` of slot ``slot_start + member_of[i] // G``, where ``G``
    is ``len(members)``; it writes its query tokens' keys and values at ``write_at[i]`` of its tail
    row ``tail_rows[i]``, and each query token sees its slot's first ``slot_length`` positions and
    its tail up to its own position. Spans and counts are the lengths of ``prefix_span``,
    ``tail_span``, ``members`` and ``slot_length``.
    """

    store: KVStore
    slot_start: int
    slot_length: Any  # (slots,) prefix tokens of each slot of the batch
    members: Any  # (G,) the places of a slot's rows in the slot layout
    member_of: Any  # (rows,) slot * G + member
    tail_rows: Any  # (rows,)
    write_at: Any  # (rows, query tokens)
    prefix_span: Any  # (P,) positions 0..P-1 of the prefixes read
    tail_span: Any  # (T,) positions 0..T-1 of the tails read

    def prefix(self, layer: int) -> tuple[Any, Any]:
        """The keys and values of the prefixes this batch reads: views of the store, no copy."""
        slots, span = self.slot_length.shape[0], self.prefix_span.shape[0]
        return tuple(stored[layer].narrow(0, self.slot_start, slots).narrow(2, 0, span)
                     for stored in (self.store.prefix_keys, self.store.prefix_values))

    def tail(self, layer: int) -> tuple[Any, Any]:
        """The keys and values of the rows' tails over the tail span (gathered by row)."""
        span = self.tail_span.shape[0]
        return tuple(stored[layer].narrow(2, 0, span).index_select(0, self.tail_rows)
                     for stored in (self.store.tail_keys, self.store.tail_values))

    def attend(self, torch: Any, layer: int, query: Any, key: Any, value: Any, scaling: float) -> Any:
        rows, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        per_head = heads // kv_heads * length  # the queries of one KV head: its query heads x tokens
        places = self.store.tail_keys[layer], self.store.tail_values[layer]
        at = (self.tail_rows[:, None].expand(rows, length), self.write_at)
        places[0][at[0], :, at[1]] = key.transpose(1, 2)  # (rows, tokens, KV heads, dim)
        places[1][at[0], :, at[1]] = value.transpose(1, 2)
        grouped = query.reshape(rows, kv_heads, per_head, dim)  # no KV head is repeated

        slots, members = self.slot_length.shape[0], self.members.shape[0]
        layout = slots * members

        def to_slots(per_row: Any) -> Any:  # (rows, KV heads, q, x) -> (slots, KV heads, members * q, x)
            placed = per_row.new_zeros((layout, *per_row.shape[1:])).index_copy(0, self.member_of, per_row)
            return placed.view(slots, members, *per_row.shape[1:]).transpose(1, 2).reshape(
                slots, kv_heads, members * per_row.shape[2], per_row.shape[3])

        def to_rows(per_slot: Any) -> Any:  # the inverse
            last = per_slot.shape[-1]
            return per_slot.view(slots, kv_heads, members, per_head, last).transpose(1, 2).reshape(
                layout, kv_heads, per_head, last).index_select(0, self.member_of)

        prefix_keys, prefix_values = self.prefix(layer)
        tail_keys, tail_values = self.tail(layer)
        from_prefix = torch.matmul(to_slots(grouped), prefix_keys.transpose(2, 3)) * scaling
        unseen = self.prefix_span[None, :] >= self.slot_length[:, None]  # (slots, P)
        from_prefix = to_rows(from_prefix.masked_fill(unseen[:, None, None, :], float("-inf")))
        from_tail = torch.matmul(grouped, tail_keys.transpose(2, 3)) * scaling
        ahead = self.tail_span[None, None, :] > self.write_at[:, :, None]  # (rows, tokens, T)
        from_tail = from_tail.view(rows, kv_heads, heads // kv_heads, length, -1).masked_fill(
            ahead[:, None, None], float("-inf")).view(rows, kv_heads, per_head, -1)
        weights = torch.softmax(torch.cat([from_prefix, from_tail], dim=-1), dim=-1, dtype=torch.float32)
        weights = weights.to(query.dtype)
        on_prefix, on_tail = weights.split([self.prefix_span.shape[0], self.tail_span.shape[0]], dim=-1)
        output = to_rows(torch.matmul(to_slots(on_prefix), prefix_values)) + torch.matmul(on_tail, tail_values)
        return output.view(rows, heads, length, dim).transpose(1, 2)  # (rows, tokens, heads, dim), as sdpa's


def row_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                  dropout: float = 0.0, decode_rows: RowBatch | None = None, **kwargs: Any) -> tuple[Any, None]:
    """The attention function the engine registers: the engine's rows through ``RowBatch.attend``;
    anything else (an image's prefill, ``generate()``) through transformers' own SDPA function."""
    import torch

    if decode_rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_rows.attend(torch, module.layer_idx, query, key, value, scale), None


@functools.cache
def register_row_attention() -> str:
    """Register ``row_attention`` (and SDPA's masks for its non-row calls) under ``ROW_ATTENTION``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROW_ATTENTION, row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    return ROW_ATTENTION

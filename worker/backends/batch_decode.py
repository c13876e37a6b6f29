"""Greedy decoding of several questions about one image together, from the image's prefilled prefix.

transformers' ``generate()`` cannot continue a batch whose rows have different lengths after a
shared prefix, and its continuous batching does not take LLaVA-OneVision; this loop works on its
cache classes directly. The prefix cache is repeated once per question; each question's tokens
are placed after padding, so every row ends at the same cache slot; padding is masked out, and
every row gets its own position ids (the positions it would have alone), so each answer is the
one plain ``generate()`` gives. Rows leave the batch as they finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.backends.base import GenerationParams, OnText


@dataclass
class Row:
    tail: list[int]  # the question's tokens after the prefix
    params: GenerationParams
    tokens: list[int]  # the answer, without the end-of-turn token
    ended: bool = False  # the model ended its turn (as generate() counts it, one more new token)


def _repeated(cache: Any, times: int) -> Any:
    """A new cache holding ``times`` copies of ``cache`` (the prefix entry itself is left as it is)."""
    from transformers import DynamicCache

    batch = DynamicCache()
    for index, layer in enumerate(cache.layers):
        batch.update(layer.keys.repeat(times, 1, 1, 1), layer.values.repeat(times, 1, 1, 1), index)
    return batch


def decode(model: Any, torch: Any, prefix_cache: Any, prefix_length: int, rows: list[Row], eos: set[int],
           pad_id: int, device: Any, relay: Any = None) -> None:
    """Fill each row's ``tokens``; ``relay`` (a transformers streamer) receives the tokens of a single row."""
    if relay is not None and len(rows) != 1:
        raise ValueError("streaming takes one question at a time")
    width = max(len(row.tail) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), prefix_length + width), dtype=torch.long, device=device)
    mask[:, :prefix_length] = 1
    positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        start = width - len(row.tail)
        ids[index, start:] = torch.tensor(row.tail, device=device)
        mask[index, prefix_length + start:] = 1
        positions[index, start:] = torch.arange(prefix_length, prefix_length + len(row.tail), device=device)
    cache = _repeated(prefix_cache, len(rows))
    slot = prefix_length  # cache slots used so far: the same for every row
    next_position = torch.tensor([prefix_length + len(row.tail) for row in rows], device=device)
    live = list(range(len(rows)))
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       cache_position=torch.arange(slot, slot + width, device=device), use_cache=True).logits[:, -1]
        slot += width
        while True:
            for position, index in enumerate(live):
                row = rows[index]
                if len(row.tokens) < row.params.min_new_tokens:
                    logits[position, list(eos)] = float("-inf")
            chosen = logits.argmax(-1)
            keep = []
            for position, index in enumerate(live):
                row, token = rows[index], int(chosen[position])
                if token in eos:
                    row.ended = True
                    continue
                row.tokens.append(token)
                if relay is not None:
                    relay.put(torch.tensor([token]))
                if len(row.tokens) < row.params.max_new_tokens:
                    keep.append(position)
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                selected = torch.tensor(keep, device=device)
                cache.batch_select_indices(selected)
                chosen, mask, next_position = chosen[selected], mask[selected], next_position[selected]
                live = [live[position] for position in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long, device=device)], dim=1)
            logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position[:, None],
                           past_key_values=cache, cache_position=torch.tensor([slot], device=device),
                           use_cache=True).logits[:, -1]
            slot += 1
            next_position = next_position + 1
    if relay is not None:
        relay.end()


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

"""The decode engine's attention: each step reads its rows' live tokens (to the next block), never the
store's capacity; the questions about one image read one copy of its prefix, written once; and the
answers stay those of plain ``generate()``."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from radvlm import prompts
from radvlm.backends.base import GenerationParams
from radvlm.backends.kv_rows import BLOCK, KVStore, RowBatch, round_up
from radvlm.backends.transformers import TransformersBackend
from radvlm.prompts import Turn


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_row_attention_equals_attention_over_each_rows_own_sequence():
    """Rows of two images side by side (two on one slot), for a decode token and for a question's prefill:
    each row's output is plain attention over its prefix then its tail up to each query token, with the
    query heads of a KV head grouped (no repeat) and nothing past a row's own length seen."""
    torch.manual_seed(0)
    config = SimpleNamespace(num_key_value_heads=2, num_attention_heads=6, hidden_size=6 * 16, head_dim=16,
                             num_hidden_layers=1)
    store = KVStore(torch, config, slots=3, prefix_tokens=3 * BLOCK, rows=4, tail_tokens=2 * BLOCK,
                    dtype=torch.float64, device=torch.device("cpu"))
    lengths = [300, 77]  # slots 0 and 1
    for slot, length in enumerate(lengths):
        keys, values = torch.randn(1, 2, length, 16, dtype=torch.float64), torch.randn(1, 2, length, 16,
                                                                                        dtype=torch.float64)
        store.fill(slot, [(keys, values)], length)
    store.tail_keys[0].normal_()
    store.tail_values[0].normal_()
    tails = torch.tensor([2, 0, 3])  # rows 0 and 1 of slot 0, row 2 of slot 1
    row_slot = [0, 0, 1]
    for query_tokens, write_at in ((1, [[140], [5], [0]]), (3, [[0, 1, 2], [7, 8, 9], [130, 131, 132]])):
        write = torch.tensor(write_at)
        query = torch.randn(3, 6, query_tokens, 16, dtype=torch.float64)
        key, value = torch.randn(3, 2, query_tokens, 16, dtype=torch.float64), torch.randn(3, 2, query_tokens, 16,
                                                                                           dtype=torch.float64)
        members = 2
        batch = RowBatch(store, 0, store.prefix_length[:2], store.positions[:members],
                         torch.tensor([slot * members + member for slot, member in ((0, 0), (0, 1), (1, 0))]), tails,
                         write, store.positions[:round_up(max(lengths))],
                         store.positions[:round_up(int(write.max()) + 1)])
        output = batch.attend(torch, 0, query, key, value, 0.25)
        assert output.shape == (3, query_tokens, 6, 16)
        for row in range(3):
            tail_row = int(tails[row])
            assert torch.equal(store.tail_keys[0][tail_row, :, write[row]], key[row])
            prefix_length = lengths[row_slot[row]]
            for token in range(query_tokens):
                seen = int(write[row, token]) + 1
                keys = torch.cat([store.prefix_keys[0][row_slot[row], :, :prefix_length],
                                  store.tail_keys[0][tail_row, :, :seen]], dim=1).repeat_interleave(3, dim=0)
                values = torch.cat([store.prefix_values[0][row_slot[row], :, :prefix_length],
                                    store.tail_values[0][tail_row, :, :seen]], dim=1).repeat_interleave(3, dim=0)
                # the softmax in float32, as transformers' eager attention takes it: the float64 inputs agree to
                # float32's precision (a wrong key or row would be off by tenths)
                weights = torch.softmax(query[row, :, token:token + 1] @ keys.transpose(1, 2) * 0.25, dim=-1,
                                        dtype=torch.float32).to(torch.float64)
                expected = (weights @ values)[:, 0]  # (heads, dim)
                assert torch.allclose(output[row, token], expected, rtol=1e-5, atol=1e-6)


def test_decode_steps_read_the_live_tokens_and_a_studys_questions_share_one_prefix(tiny_model, capsys):
    """A study of a 2048x2500 radiograph (7,319 prefix tokens with the tiny checkpoint, as RadVLM's)
    asked as the pipeline asks it (the report on a thread of its own, the abnormalities, then three
    groundings), and a chat question about another image joining it. For every attention call of every
    decode step the keys read are the longest live prefix rounded up to a block plus the longest live
    tail (question and answer so far) rounded up to a block: never the capacity. The five questions
    read their image's prefix where it lies in the store (one data pointer for all five), written once
    for the three requests; the other image's slot moves into the first when the study is done. Every
    answer is plain generate()'s."""
    from transformers import AttentionInterface

    from radvlm.backends.kv_rows import ROW_ATTENTION, row_attention
    from radvlm.backends.prefix_cache import PREFIX, image_key

    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64)
    plain = TransformersBackend(str(tiny_model))
    engine = backend.engine
    assert engine is not None
    store = engine.store
    radiograph = np.random.default_rng(30).integers(0, 256, (2500, 2048), dtype=np.uint8)  # rows x columns
    other = np.random.default_rng(31).integers(0, 256, (700, 600), dtype=np.uint8)
    lengths = [int(plain.inputs(image, [], text=PREFIX)["input_ids"].shape[1]) for image in (radiograph, other)]
    assert lengths[0] == 7319

    fills: list[int] = []
    filling = store.fill
    store.fill = lambda slot, layers, length: fills.append(length) or filling(slot, layers, length)
    calls: list[dict] = []

    def recording(module, query, key, value, attention_mask, *args, decode_rows=None, **kwargs):  # type: ignore[no-untyped-def]
        if decode_rows is not None and query.shape[2] == 1:  # a decode step (a question's prefill has its tokens)
            layer = module.layer_idx
            prefix_keys, _ = decode_rows.prefix(layer)
            tail_keys, _ = decode_rows.tail(layer)
            members = decode_rows.members.shape[0]
            step_rows = [engine._rows[index] for index in decode_rows.tail_rows.tolist()]
            live = [entry for entry in engine._rows if entry is not None]
            calls.append({
                "rows": query.shape[0], "live": len(live), "prefix": prefix_keys.shape[2], "tail": tail_keys.shape[2],
                "longest_prefix": max(entry.slot.length for entry in live),
                "longest_tail": max(len(entry.row.tail) + len(entry.row.tokens) for entry in live),
                # where each row's prefix is read: its slot of the view the matmul reads
                "read_at": [prefix_keys[slot].data_ptr() for slot in (decode_rows.member_of // members).tolist()],
                "slot_at": [store.prefix_keys[layer][entry.slot.index].data_ptr() for entry in step_rows],
                "images": [entry.slot.key for entry in step_rows],
            })
        return row_attention(module, query, key, value, attention_mask, *args, decode_rows=decode_rows, **kwargs)

    study = [(prompts.REPORT, 80), (prompts.ABNORMALITIES, 5), (prompts.grounding_question("Cardiomegaly"), 9),
             (prompts.grounding_question("Pleural effusion"), 7), (prompts.grounding_question("Pneumothorax"), 8)]
    chat = [Turn("user", "Is there an effusion?"), Turn("assistant", "Yes, on the left."), Turn("user", "Where?")]
    got: dict[str, list] = {}

    def ask(name: str, image: np.ndarray, questions: list[tuple[str, int]]) -> None:
        got[name] = backend.generate_many(image, [[Turn("user", q)] for q, _ in questions],
                                          [GenerationParams(max_new_tokens=n, min_new_tokens=n) for _, n in questions])

    def rest_of_study() -> None:
        ask("abnormalities", radiograph, study[1:2])
        ask("groundings", radiograph, study[2:])

    backend._prepared(image_key(other), other)  # the chat's image tiled now: it joins within a few steps
    AttentionInterface.register(ROW_ATTENTION, recording)
    try:
        threads = [threading.Thread(target=ask, args=("report", radiograph, study[:1])),
                   threading.Thread(target=rest_of_study)]
        for thread in threads:
            thread.start()
        while engine.steps < 2:
            time.sleep(0.005)
        chatting = threading.Thread(target=lambda: got.__setitem__("chat", backend.generate_many(
            other, [chat], [GenerationParams(max_new_tokens=120, min_new_tokens=120)])))
        chatting.start()
        for thread in [*threads, chatting]:
            thread.join(timeout=600)
    finally:
        AttentionInterface.register(ROW_ATTENTION, row_attention)

    expected = [plain.generate(radiograph, [Turn("user", q)], GenerationParams(max_new_tokens=n, min_new_tokens=n))
                for q, n in study]
    answers = [*got["report"], *got["abnormalities"], *got["groundings"]]
    assert [(a.text, a.new_tokens, a.prompt_tokens) for a in answers] == [
        (e.text, e.new_tokens, e.prompt_tokens) for e in expected]
    assert got["chat"][0].text == plain.generate(other, chat, GenerationParams(max_new_tokens=120,
                                                                               min_new_tokens=120)).text

    assert sorted(fills) == sorted(lengths)  # each image's prefix written once: three requests read one copy
    assert engine.slot_moves == 1  # the study's slot freed first: the chat's image moved into it
    assert calls and {call["rows"] for call in calls} >= {1, 2, 3}  # rows joined and left
    for call in calls:
        assert call["rows"] == call["live"]  # the batch is the rows decoding, no more
        assert call["prefix"] == round_up(call["longest_prefix"]) < store.prefix_tokens + BLOCK
        assert call["tail"] == round_up(call["longest_tail"]) < store.tail_tokens
        assert call["read_at"] == call["slot_at"]  # each row reads its own image's slot in the store
        by_image: dict[str, set[int]] = {}
        for image, pointer in zip(call["images"], call["read_at"], strict=True):
            by_image.setdefault(image, set()).add(pointer)
        assert all(len(pointers) == 1 for pointers in by_image.values())  # siblings: one storage
        assert len({min(pointers) for pointers in by_image.values()}) == len(by_image)  # images: their own
    assert any(len(call["images"]) >= 3 and len(set(call["images"])) == 2 for call in calls)

    # what a step reads, per row and layer, against the old engine's 11,740-position rows
    capacity = store.prefix_tokens + store.tail_tokens
    seen = sorted({(call["rows"], len(set(call["images"])), call["prefix"], call["tail"]) for call in calls})
    with capsys.disabled():
        print(f"\nkey positions read per attention call (store: slots of {store.prefix_tokens}, tails of "
              f"{store.tail_tokens}; the engine before this change read 11740 per row, repeated to every head)")
        print("| rows | images | prefix span | tail span | positions read by a row | capacity |")
        for rows, images, prefix, tail in seen:
            print(f"| {rows} | {images} | {prefix} | {tail} | {prefix + tail} | {capacity} |")


def test_a_worker_whose_engine_decodes_uncompiled_is_unhealthy(monkeypatch, capsys):
    """``radvlm_engine_compiled`` 0 on a GPU worker's metrics page fails its container health check with why."""
    from prometheus_client import start_http_server

    from radvlm_pacs import main
    from records.metrics import observe_engine
    from testbed.network import free_port

    server, _ = start_http_server(0, addr="127.0.0.1")
    monkeypatch.setenv("RADVLM_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # never reached
    try:
        observe_engine(False)
        assert main(["health", "worker", "--gpu", "--metrics-port", str(server.server_port)]) == 1
        assert "the model engine decodes uncompiled" in capsys.readouterr().err
        observe_engine(True)  # compiled: the check goes on to the broker (none here)
        assert main(["health", "worker", "--gpu", "--metrics-port", str(server.server_port)]) == 1
        assert "uncompiled" not in capsys.readouterr().err
    finally:
        server.shutdown()

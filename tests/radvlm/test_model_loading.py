"""Loading RadVLM through transformers: the tiny checkpoint loads; bad ones say what to do."""

from __future__ import annotations

import numpy as np
import pytest

from radvlm.backends.base import GenerationParams, ModelLoadError
from radvlm.backends.transformers import TransformersBackend
from radvlm.prompts import REPORT, Turn
from records.text import plain_text


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_checkpoint_prompt_has_radvlm_image_token_count(tiny_model):
    backend = TransformersBackend(str(tiny_model))
    image = np.full((2048, 2500), 128, dtype=np.uint8)  # rows x columns
    batch = backend.inputs(image, [Turn("user", REPORT)])
    image_token = backend.model.config.image_token_index
    # anyres_max_9 over 384-px pinpoints: ~7,300 image tokens for a CXR this size (radvlm.md)
    assert 7000 < int((batch["input_ids"] == image_token).sum()) < 7500
    completion = backend.generate(image, [Turn("user", REPORT)], GenerationParams(max_new_tokens=8))
    assert completion.new_tokens <= 8 and completion.prompt_tokens == batch["input_ids"].shape[1]
    # decoding is greedy: the same input gives the same text
    again = backend.generate(image, [Turn("user", REPORT)], GenerationParams(max_new_tokens=8))
    assert again.text == completion.text


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="weights not found: give a local folder"):
        TransformersBackend(str(tmp_path / "no-such-model"))


def test_wrong_architecture_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=100)).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ModelLoadError, match="it is a 'qwen2' checkpoint, not LLaVA-OneVision"):
        TransformersBackend(str(tmp_path / "qwen"))


def test_quantization_needs_a_gpu(tiny_model):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        TransformersBackend(str(tiny_model), device="cpu", quantization="8bit")


def test_decode_rows_that_do_not_fit_say_what_to_do(tiny_model):
    # a slot holds the largest prefix the processor gives (8,765 tokens, 69 blocks); a row the rest of
    # max_prompt_tokens (10,240) and max_new_tokens (1,500): 2,908 tokens, 23 blocks
    with pytest.raises(ModelLoadError, match=r"1 MiB of decode memory \(model.batch_cache_mb\) hold no image slot of "
                                             r"8832 tokens \(4 MiB\) beside a question row of 2944 tokens \(2 MiB\): "
                                             r"lower model.max_prompt_tokens"):
        TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=1)


def test_the_image_prefix_is_prefilled_once_and_answers_stay_the_same(tiny_model):
    """The tasks of a study and a chat turn reuse the image's KV cache, token for token as without it."""
    import threading

    from radvlm import prompts

    cached = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64)
    plain = TransformersBackend(str(tiny_model))
    image = np.random.default_rng(7).integers(0, 256, (700, 600), dtype=np.uint8)
    conversations = [[Turn("user", prompts.REPORT)], [Turn("user", prompts.ABNORMALITIES)],
                     [Turn("user", prompts.grounding_question("Cardiomegaly"))],
                     [Turn("user", "Is there an effusion?"), Turn("assistant", "Yes, on the left."),
                      Turn("user", "Where is it?")]]
    params = GenerationParams(max_new_tokens=12)
    streamed: list[str] = []
    streamed_on: set[int] = set()

    def on_text(text: str) -> None:
        streamed.append(text)
        streamed_on.add(threading.get_ident())

    for turns in conversations:
        expected = plain.generate(image, turns, params)
        got = cached.generate(image, turns, params, on_text=on_text)
        assert (got.text, got.new_tokens, got.prompt_tokens) == (expected.text, expected.new_tokens,
                                                                  expected.prompt_tokens)
    assert (cached.prefixes.misses, cached.prefixes.hits) == (1, 3)
    assert streamed_on == {threading.get_ident()}  # the text is decoded and handed on by the caller, not the engine
    # the stream as the chat relays it (records.text.plain_text, as every completion's text)
    assert plain_text("".join(streamed)).replace(" ", "") == "".join(
        plain.generate(image, t, params).text for t in conversations).replace(" ", "")
    other = np.random.default_rng(8).integers(0, 256, (700, 600), dtype=np.uint8)
    assert cached.generate(other, conversations[0], params).text == plain.generate(other, conversations[0],
                                                                                    params).text
    assert cached.prefixes.misses == 2 and 0 < cached.prefixes.nbytes <= 512 * 1024 * 1024
    # the engine's memory budget counts rows at this many bytes per token: the real cache's
    from radvlm.backends.prefix_cache import image_key

    entry = cached.prefixes.peek(image_key(other))
    assert entry is not None and entry.nbytes == entry.length * cached.kv_bytes_per_token


def _five_questions_answered_as_plain_generate_answers_them(backend, tiny_model):  # type: ignore[no-untyped-def]
    """A study's questions of different lengths (the last a conversation) about one image, asked of
    ``backend`` together: each answer must be the one plain generate() gives it alone."""
    from radvlm import prompts

    plain = TransformersBackend(str(tiny_model))
    image = np.random.default_rng(3).integers(0, 256, (500, 420), dtype=np.uint8)
    conversations = [[Turn("user", prompts.REPORT)], [Turn("user", prompts.ABNORMALITIES)],
                     [Turn("user", prompts.grounding_question("Cardiomegaly"))],
                     [Turn("user", prompts.grounding_question("Pleural effusion"))],
                     [Turn("user", "Is there an effusion?"), Turn("assistant", "Yes, on the left."),
                      Turn("user", "Where is it?")]]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=m) for n, m in ((24, 0), (5, 0), (12, 12), (9, 0),
                                                                                 (16, 0))]
    expected = [plain.generate(image, turns, p) for turns, p in zip(conversations, params)]
    got = backend.generate_many(image, conversations, params)
    assert [(g.text, g.new_tokens, g.prompt_tokens) for g in got] == [
        (e.text, e.new_tokens, e.prompt_tokens) for e in expected]
    return got, expected


def test_questions_decoded_together_equal_one_by_one(tiny_model):
    """One decode batch from the shared prefix (rows of different lengths, leaving as they finish)
    gives each question the answer plain generate() gives it alone."""
    together = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64)
    got, expected = _five_questions_answered_as_plain_generate_answers_them(together, tiny_model)
    assert len({e.text for e in expected}) >= 3  # the answers differ, so a row mixed up would show
    assert [g.new_tokens for g in got][:3] == [24, 5, 12]


def test_questions_about_one_image_asked_at_once_prepare_and_prefill_it_once(tiny_model):
    """A study's report and abnormalities are asked from two threads at once: the processor tiles the
    image once, the engine prefills it once, and each answer is plain generate()'s."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from radvlm import prompts
    from radvlm.backends.prefix_cache import PREFIX

    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64)
    plain = TransformersBackend(str(tiny_model))
    image = np.random.default_rng(12).integers(0, 256, (700, 600), dtype=np.uint8)
    prepared: list[str | None] = []
    processor_inputs = backend.inputs
    backend.inputs = lambda image, turns, text=None: prepared.append(text) or processor_inputs(image, turns, text)
    both_asking = threading.Barrier(2)
    params = GenerationParams(max_new_tokens=10)

    def ask(question: str) -> str:
        both_asking.wait()
        return backend.generate(image, [Turn("user", question)], params).text

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(ask, [prompts.REPORT, prompts.ABNORMALITIES]))
    assert got == [plain.generate(image, [Turn("user", q)], params).text for q in (prompts.REPORT,
                                                                                   prompts.ABNORMALITIES)]
    # the second question reads the first one's slot while it decodes (no prefix to look up), or the cache
    assert prepared == [PREFIX] and backend.prefixes.misses == 1 and backend.prefixes.hits <= 1
    assert not backend._preparing  # nothing kept once the prefix is cached


def test_concurrent_studies_share_decode_steps_and_keep_their_answers(tiny_model):
    """Questions about different images, asked from several threads and joining while others decode,
    share the engine's steps; each still gets the answer plain generate() gives it alone."""
    import threading
    import time

    from radvlm import prompts
    from radvlm.backends.prefix_cache import PREFIX

    engine_backed = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64)
    plain = TransformersBackend(str(tiny_model))
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((500, 420), (300, 300), (420, 640))]
    conversations = [[Turn("user", prompts.REPORT)], [Turn("user", prompts.grounding_question("Cardiomegaly"))]]
    params = [GenerationParams(max_new_tokens=20, min_new_tokens=20), GenerationParams(max_new_tokens=9)]
    expected = [[plain.generate(image, turns, p) for turns, p in zip(conversations, params)] for image in images]
    prefix_lengths = {int(plain.inputs(image, [], text=PREFIX)["input_ids"].shape[1]) for image in images}

    engine = engine_backed.engine
    got: dict[int, list] = {}
    tiles_per_call: list[int] = []  # the vision tower sees one image's tiles at a time, however many studies
    engine_backed.model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs_or_output: tiles_per_call.append(int(args[0].shape[0])))

    def study(number: int) -> None:
        got[number] = engine_backed.generate_many(images[number], conversations, params)

    first = threading.Thread(target=study, args=(0,))
    first.start()
    while engine.steps < 3 and first.is_alive():  # the first study is decoding: the others join it
        time.sleep(0.005)
    others = [threading.Thread(target=study, args=(n,)) for n in (1, 2)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=300)
    for number in range(3):
        assert [(g.text, g.new_tokens, g.prompt_tokens) for g in got[number]] == [
            (e.text, e.new_tokens, e.prompt_tokens) for e in expected[number]]
    assert len({e[0].text for e in expected}) == 3  # each image its own report: rows mixed up would show
    assert len(prefix_lengths) == 3  # so rows joining the batch were padded to one slot
    assert engine.steps < 3 * 20  # alone, the three reports would take 3 x 20 steps
    tiles = [int(plain.inputs(image, [], text=PREFIX)["pixel_values"].flatten(0, 1).shape[0]) for image in images]
    assert sorted(tiles_per_call) == sorted(tiles)  # one call per image, each with that image's tiles only


def test_a_new_image_is_prefilled_in_parts_between_the_decode_steps_of_others(tiny_model):
    """While a radiograph's 7,300-token prefix is prefilled, the row already decoding (a chat being
    read, say) gets a token after every part instead of waiting for the whole image; both answers
    stay those of plain generate()."""
    import time

    from radvlm import prompts
    from radvlm.backends.batch_decode import Row
    from radvlm.backends.prefix_cache import PREFIX, image_key

    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64, prefill_chunk_tokens=512)
    plain = TransformersBackend(str(tiny_model))
    rng = np.random.default_rng(12)
    small, radiograph = rng.integers(0, 256, (300, 300), dtype=np.uint8), rng.integers(0, 256, (2048, 2500),
                                                                                        dtype=np.uint8)
    turns = [Turn("user", prompts.REPORT)]
    tail = backend.processor.tokenizer(prompts.render(turns)[len(PREFIX):], add_special_tokens=False)["input_ids"]
    reading = GenerationParams(max_new_tokens=120, min_new_tokens=120)
    engine = backend.engine
    breaks_at_token: list[int] = []  # how often the prefill had stopped when each token of the first row came

    def source(image):  # type: ignore[no-untyped-def]
        return lambda: backend._prefix(image_key(image), image, None)

    def length(image) -> int:  # type: ignore[no-untyped-def]
        return int(backend.inputs(image, [], text=PREFIX)["input_ids"].shape[1])

    # Both lengths are measured first: processing the large image takes longer than the first row's
    # whole answer on a fast machine, which would leave nothing decoding while the radiograph joins.
    small_length, radiograph_length = length(small), length(radiograph)
    first = Row(list(tail), reading, on_token=lambda _: breaks_at_token.append(engine.prefill_breaks))
    decoding = engine.submit([first], small_length, source(small))
    while engine.steps < 2:
        time.sleep(0.005)
    before = engine.prefill_breaks
    second = Row(list(tail), GenerationParams(max_new_tokens=10))
    joining = engine.submit([second], radiograph_length, source(radiograph))
    assert len(first.tokens) < 60, "the first row was nearly done before the radiograph joined"
    joining.result(timeout=300)
    breaks = engine.prefill_breaks - before
    decoding.result(timeout=300)
    assert breaks == -(-radiograph_length // 512) - 1 == 14  # 15 parts, the first with the image's encoding
    assert set(range(1, breaks + 1)) <= {done - before for done in breaks_at_token}  # a token at every break
    expected = [plain.generate(image, turns, p) for image, p in ((small, reading), (radiograph, second.params))]
    tokenizer = backend.processor.tokenizer
    assert [plain_text(tokenizer.decode(row.tokens, skip_special_tokens=True).strip()) for row in (first, second)] == [
        e.text for e in expected]


def test_a_failing_request_fails_alone(tiny_model):
    """A request whose prefix cannot be built fails with its own error; the batch it joined goes on."""
    from concurrent.futures import Future

    from radvlm import prompts
    from radvlm.backends.batch_decode import Row

    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=64)
    image = np.random.default_rng(5).integers(0, 256, (500, 420), dtype=np.uint8)
    alone = backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=15,
                                                                                      min_new_tokens=15))

    def broken() -> tuple[int, object]:
        raise MemoryError("no room for this image")

    long_running: Future = Future()
    worker = __import__("threading").Thread(target=lambda: long_running.set_result(backend.generate(
        image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=15, min_new_tokens=15))))
    worker.start()
    failing = backend.engine.submit([Row([1, 2, 3], GenerationParams(max_new_tokens=4))], 100, broken)
    with pytest.raises(MemoryError, match="no room"):
        failing.result(timeout=120)
    worker.join(timeout=120)
    assert long_running.result().text == alone.text


def test_a_streamed_question_is_admitted_before_waiting_analyses(tiny_model):
    """With the batch full, a question someone reads as it streams goes before analyses that waited longer."""
    import time

    from radvlm import prompts
    from radvlm.backends.batch_decode import Row
    from radvlm.backends.prefix_cache import PREFIX, image_key

    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=2,  # two rows of 1 MiB
                                  max_prompt_tokens=2000, max_new_tokens=48)
    image = np.random.default_rng(9).integers(0, 256, (300, 300), dtype=np.uint8)
    tail = backend.processor.tokenizer(prompts.render([Turn("user", prompts.REPORT)])[len(PREFIX):],
                                       add_special_tokens=False)["input_ids"]
    admitted: list[str] = []

    def prefix(name: str):  # type: ignore[no-untyped-def]
        def source():  # type: ignore[no-untyped-def]
            admitted.append(name)  # called as the request enters the batch
            return backend._prefix(image_key(image), image, None)
        return source

    def rows(count: int, length: int) -> list[Row]:
        return [Row(list(tail), GenerationParams(max_new_tokens=length, min_new_tokens=length)) for _ in range(count)]

    length = int(backend.inputs(image, [], text=PREFIX)["input_ids"].shape[1])
    busy = backend.engine.submit(rows(2, 30), length, prefix("busy"))
    while backend.engine.steps < 2 and not busy.done():
        time.sleep(0.005)
    routine = backend.engine.submit(rows(1, 3), length, prefix("analysis"))
    chat = backend.engine.submit(rows(1, 3), length, prefix("chat"), urgent=True)
    for future in (busy, routine, chat):
        assert len(future.result(timeout=120)[0].tokens) in (3, 30)
    assert admitted == ["busy", "chat", "analysis"]


def test_when_the_engine_thread_dies_no_caller_waits_forever(tiny_model):
    """Something the engine cannot survive (here SystemExit from an image's prefix): the request decoding,
    the one that killed it and the one waiting all fail with the reason, and no more are taken."""
    import threading
    import time

    from radvlm.backends.batch_decode import Row
    from radvlm.backends.prefix_cache import image_key

    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=2,  # two rows of 1 MiB
                                  max_prompt_tokens=2000, max_new_tokens=48)
    image = np.random.default_rng(4).integers(0, 256, (300, 300), dtype=np.uint8)

    def fatal() -> tuple[int, object]:
        raise SystemExit("killed")

    def real():  # type: ignore[no-untyped-def]
        return backend._prefix(image_key(image), image, None)

    def rows(length: int) -> list[Row]:
        return [Row([1, 2, 3], GenerationParams(max_new_tokens=length, min_new_tokens=length))]

    from radvlm.backends.prefix_cache import PREFIX

    length = int(backend.inputs(image, [], text=PREFIX)["input_ids"].shape[1])

    previous_hook, threading.excepthook = threading.excepthook, lambda args: None  # the thread's death is the point
    try:
        decoding = backend.engine.submit(rows(400), length, real)
        while backend.engine.steps < 1:
            time.sleep(0.005)
        killer = backend.engine.submit(rows(2), length, fatal)  # joins the decoding row
        waiting = backend.engine.submit(rows(2), length, real)  # a third row: waits for room
        for future in (decoding, killer, waiting):
            with pytest.raises(BaseException, match="killed"):
                future.result(timeout=120)
        backend.engine._thread.join(timeout=10)
    finally:
        threading.excepthook = previous_hook
    with pytest.raises(RuntimeError, match="stopped"):
        backend.engine.submit(rows(2), length, real)


def test_compiled_decode_steps_with_fewer_rows_than_questions_give_plain_answers(tiny_model):
    """The decode step compiled once per bucket size (torch.compile; CUDA graphs on a GPU), and a study
    of five questions entering a store of two rows as rows free up: every answer is plain generate()'s."""
    from radvlm import prompts

    compiled = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=4,  # a 2 MiB slot, two rows
                                   max_prompt_tokens=4000, max_new_tokens=96, compile_decode=True)
    assert compiled.engine is not None and (compiled.engine.store.slots, compiled.engine.store.rows) == (1, 2)
    assert compiled.engine.compiled and compiled.engine.ready.is_set()  # loaded means compiled, before any question
    got, _ = _five_questions_answered_as_plain_generate_answers_them(compiled, tiny_model)
    # never more than two rows at a step (a row's first token comes from its prefill, not from a step)
    assert compiled.engine.steps >= sum(g.new_tokens - 1 for g in got) / 2 > max(g.new_tokens for g in got)
    image = np.random.default_rng(3).integers(0, 256, (500, 420), dtype=np.uint8)
    with pytest.raises(ValueError, match="a decode row holds 640 .*raise model.max_prompt_tokens"):
        compiled.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=900))


def test_the_decode_step_is_compiled_at_start_for_every_shape_it_will_take(tiny_model):
    """Rows, slots, rows per slot and both spans are dynamic: the graphs compiled while loading (one row;
    rows of one image; rows of several images; each at the shortest and the longest spans, as the
    compiler may pick kernels by size) serve every step after, whatever the lengths."""
    import torch
    from torch._dynamo.utils import counters

    from radvlm import prompts

    torch._dynamo.reset()  # forget the graphs of earlier tests' engines (the same code: they would be reused)
    counters.clear()
    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=9,  # 3 slots of 2 MiB, 6 rows
                                  max_prompt_tokens=4000, max_new_tokens=96, compile_decode=True)
    engine = backend.engine
    assert engine is not None and engine.compiled and (engine.store.slots, engine.store.rows) == (3, 6)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 6
    _five_questions_answered_as_plain_generate_answers_them(backend, tiny_model)
    plain = TransformersBackend(str(tiny_model))
    images = [np.random.default_rng(n).integers(0, 256, shape, dtype=np.uint8)
              for n, shape in ((20, (300, 300)), (21, (420, 640)))]
    params = GenerationParams(max_new_tokens=40, min_new_tokens=40)  # tails past a block: the span grows
    got = [backend.generate_many(image, [[Turn("user", prompts.REPORT)]], [params])[0] for image in images]
    assert [g.text for g in got] == [plain.generate(image, [Turn("user", prompts.REPORT)], params).text
                                     for image in images]
    assert counters["stats"]["unique_graphs"] == graphs  # whatever rows, slots and spans the questions needed


def test_a_decode_step_that_cannot_be_compiled_is_run_uncompiled_and_said_so(tiny_model, monkeypatch, caplog):
    """No C compiler for Triton, say: the worker logs it as an error, exposes it (radvlm_engine_compiled 0)
    and answers all the same, uncompiled."""
    import torch

    from radvlm import prompts

    def no_compiler(function, **options):  # type: ignore[no-untyped-def]
        def compiled(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("Failed to find C compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    backend = TransformersBackend(str(tiny_model), prefix_cache_mb=512, batch_cache_mb=4, max_prompt_tokens=4000,
                                  max_new_tokens=96, compile_decode=True)
    plain = TransformersBackend(str(tiny_model))
    image = np.random.default_rng(3).integers(0, 256, (500, 420), dtype=np.uint8)
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    assert backend.generate(image, [Turn("user", prompts.REPORT)], params).text == plain.generate(
        image, [Turn("user", prompts.REPORT)], params).text
    assert backend.engine is not None and not backend.engine.compiled
    assert "cannot be compiled, decoding UNCOMPILED" in caplog.text and "Failed to find C compiler" in caplog.text
    assert "Failed to find C compiler" in backend.engine.compile_error
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("radvlm_engine_compiled") == 0  # the worker's health check fails on it

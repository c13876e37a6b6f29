"""RadVLM in-process on transformers' LLaVA-OneVision classes and the checkpoint's own processor."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from radvlm import prompts
from radvlm.backends.base import Completion, GenerationParams, ModelLoadError, OnText
from radvlm.backends.batch_decode import MIN_QUESTION_TOKENS, DecodeEngine, Row, stream_relay
from radvlm.backends.kv_rows import BLOCK, round_up, split_budget, step_workspace
from radvlm.backends.prefix_cache import PREFIX, Prefix, PrefixCache, cache_bytes, image_key
from radvlm.prompts import Turn
from records.metrics import observe_engine
from records.pixels import model_picture

log = logging.getLogger(__name__)

PREFILL_RESERVE = 6 * 2**30  # GPU memory kept free for an image's prefill (vision tower, 7,300 tokens, copies)


def local_revision(folder: Path) -> str:
    """A revision for a local checkpoint: a digest of its configuration and weight file headers.

    Results are keyed by model revision, so different weights in the same folder must not share one.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            digest.update(fh.read(1 << 16))
        digest.update(str(path.stat().st_size).encode())
    return "local-" + digest.hexdigest()[:16]


def _load_error(model_id: str, exc: BaseException) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower():
        hint = "not enough GPU memory: set RADVLM_MODEL__QUANTIZATION=8bit or 4bit, or use a larger GPU"
    elif isinstance(exc, OSError):
        hint = ("weights not found: give a local folder as RADVLM_MODEL__ID, or allow downloads "
                "(unset HF_HUB_OFFLINE) so that the model id can be fetched")
    elif isinstance(exc, (ValueError, KeyError)):
        hint = "this does not look like a LLaVA-OneVision checkpoint in transformers format"
    elif isinstance(exc, ImportError):
        hint = "a package is missing: install the model extras (pip install -e .[model])"
    else:
        hint = "see the error above"
    return ModelLoadError(f"cannot load {model_id}: {hint} ({text[:500]})")


class TokenRelay:
    """A ``generate()`` streamer that hands each new token id to ``on_token`` (and everything to ``then``)."""

    def __init__(self, on_token: Callable[[int], None], then: Any = None) -> None:
        self.on_token, self.then, self.prompt_seen = on_token, then, False

    def put(self, value: Any) -> None:
        if self.prompt_seen:  # generate() hands the prompt over first
            for token in value.reshape(-1).tolist():
                self.on_token(int(token))
        self.prompt_seen = True
        if self.then is not None:
            self.then.put(value)

    def end(self) -> None:
        if self.then is not None:
            self.then.end()


_LARGEST_IMAGE: dict[tuple[Any, ...], int] = {}


def largest_prefix(processor: Any) -> int | None:
    """The most tokens an image's prefix takes with ``processor`` (its image tokens over images the
    size and shape of each grid pinpoint, scaled from half to three times and a little wider or
    narrower, and the prefix's text); None if the processor cannot count them. A larger prefix is
    refused with PromptTooLong when it comes."""
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if count is None or not pinpoints:
        return None
    pinpoints = tuple((int(height), int(width)) for height, width in pinpoints)
    key = (type(processor), pinpoints, getattr(processor, "num_image_tokens", None),
           getattr(processor, "vision_aspect_ratio", None), getattr(processor, "vision_feature_select_strategy", None))
    if key not in _LARGEST_IMAGE:
        sizes = [(round(height * scale / 10), round(width * scale * aspect / 200))
                 for height, width in pinpoints for scale in range(5, 31) for aspect in (18, 19, 20, 21, 22)]
        try:
            _LARGEST_IMAGE[key] = max(count(image_sizes=sizes).num_image_tokens)
        except Exception as exc:  # another processor's arithmetic: the prompt limit sizes the slots then
            log.warning("cannot count this processor's image tokens (%s): image slots hold model.max_prompt_tokens",
                        exc)
            return None
    return _LARGEST_IMAGE[key] + len(processor.tokenizer(PREFIX, add_special_tokens=False)["input_ids"]) - 1


class TransformersBackend:
    """LlavaOnevisionForConditionalGeneration + AutoProcessor; bf16 on GPU, float32 on CPU.

    With a prefix cache, questions go through one ``DecodeEngine`` (callers on any thread share its
    decode steps; image slots and question rows allocated within ``batch_cache_mb``, see ``_engine``;
    compiled on a GPU unless ``compile_decode`` says otherwise; a new image's prefix prefilled
    ``prefill_chunk_tokens`` at a time between decode steps, 0: at once); without, each is one
    ``generate()`` call, one at a time.
    """

    name = "transformers"

    def __init__(self, model_id: str, *, revision: str | None = None, device: str = "auto",
                 quantization: str | None = None, prefix_cache_mb: int = 0, batch_cache_mb: int | None = None,
                 max_prompt_tokens: int = 10240, max_new_tokens: int = 1500,
                 compile_decode: bool | None = None, prefill_chunk_tokens: int = 1024) -> None:
        try:
            import torch
            from transformers import AutoConfig, AutoProcessor, LlavaOnevisionForConditionalGeneration
        except ImportError as exc:
            raise _load_error(model_id, exc) from exc
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
        if quantization:
            if self.device.type != "cuda":
                raise ModelLoadError(f"quantization {quantization!r} needs a CUDA GPU")
            try:
                from transformers import BitsAndBytesConfig
            except ImportError as exc:
                raise _load_error(model_id, exc) from exc
            if quantization not in ("8bit", "4bit"):
                raise ModelLoadError(f"quantization must be 8bit or 4bit, not {quantization!r}")
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": self.device.index or 0}
        try:
            config = AutoConfig.from_pretrained(model_id, revision=revision)
        except Exception as exc:
            raise _load_error(model_id, exc) from exc
        if config.model_type != "llava_onevision":
            raise ModelLoadError(f"cannot load {model_id}: it is a {config.model_type!r} checkpoint, not "
                                 "LLaVA-OneVision (RadVLM is KrauthammerLab/RadVLM in transformers format)")
        try:
            self.processor = AutoProcessor.from_pretrained(model_id, revision=revision)
            self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_id, config=config, **kwargs)
        except Exception as exc:  # every loading failure gets its hint
            raise _load_error(model_id, exc) from exc
        if not quantization:
            self.model.to(self.device)
        self.model.eval()
        self.model_id = model_id
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.model_revision = str(getattr(self.model.config, "_commit_hash", None) or revision
                                  or local_revision(Path(model_id)))
        if not hasattr(self.processor, "tokenizer") or not hasattr(self.processor, "image_processor"):
            raise ModelLoadError(f"cannot load {model_id}: AutoProcessor gave {type(self.processor).__name__}, "
                                 "not a LLaVA-OneVision processor")
        self.prefixes = PrefixCache(prefix_cache_mb * 1024 * 1024 if self._prefix_splits_cleanly() else 0)
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        pad = self.model.generation_config.pad_token_id
        self.end_of_turn = min(eos_ids)
        text = self.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # keys and values, every layer, every KV head
        self.kv_bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * dtype.itemsize
        self.engine: DecodeEngine | None = None
        if self.prefixes.budget_bytes:
            self.engine = self._engine(model_id, eos_ids, pad if pad is not None else self.end_of_turn,
                                       max_prompt_tokens, max_new_tokens, batch_cache_mb, compile_decode)
        self._one_at_a_time = threading.Lock()  # the plain path: one generate() on the model at once
        # the processor's inputs of images whose prefix is not cached yet, prepared once for every caller
        self._preparing: dict[str, Future[Any]] = {}
        self._preparing_lock = threading.Lock()
        log.info("loaded %s (revision %s) on %s in %s", model_id, self.model_revision, self.device, dtype)

    def _engine(self, model_id: str, eos_ids: set[int], pad_id: int, max_prompt_tokens: int, max_new_tokens: int,
                batch_cache_mb: int | None, compile_decode: bool | None) -> DecodeEngine:
        """The decode engine: a slot holds the largest image prefix the processor gives (at most
        ``max_prompt_tokens``), a row's tail the rest of the prompt (at least ``MIN_QUESTION_TOKENS``) and
        ``max_new_tokens``; as many of both as ``batch_cache_mb`` holds, counting on a GPU what a step of
        the largest shapes takes beside them."""
        prefix_tokens = round_up(min(max_prompt_tokens, largest_prefix(self.processor) or max_prompt_tokens))
        tail_tokens = round_up(max(MIN_QUESTION_TOKENS, max_prompt_tokens - prefix_tokens) + max_new_tokens)
        # each with one block more than it holds (see KVStore)
        slot_bytes = (prefix_tokens + BLOCK) * self.kv_bytes_per_token
        row_bytes = (tail_tokens + BLOCK) * self.kv_bytes_per_token
        if self.device.type == "cuda":  # the step's own memory: scores, weights, logits, gathered tails
            slot_extra, row_extra = step_workspace(self.model.config.text_config, prefix_tokens, tail_tokens,
                                                   self.model.dtype.itemsize)
            slot_bytes, row_bytes = slot_bytes + slot_extra, row_bytes + row_extra
        budget = self._batch_cache_bytes(batch_cache_mb)
        slots, rows = split_budget(budget, slot_bytes, row_bytes)
        if rows < 1:
            raise ModelLoadError(
                f"cannot load {model_id}: {budget / 2**20:.0f} MiB of decode memory "
                f"({'what the GPU has left' if batch_cache_mb is None else 'model.batch_cache_mb'}) hold no image "
                f"slot of {prefix_tokens} tokens ({slot_bytes / 2**20:.0f} MiB) beside a question row of "
                f"{tail_tokens} tokens ({row_bytes / 2**20:.0f} MiB): lower model.max_prompt_tokens or "
                "model.max_new_tokens, use quantization, or a larger GPU")
        compile_steps = self.device.type == "cuda" if compile_decode is None else compile_decode
        engine = DecodeEngine(self.model, self.torch, self.device, eos_ids, pad_id, rows=rows, tail_tokens=tail_tokens,
                              slots=slots, prefix_tokens=prefix_tokens, compile_steps=compile_steps)
        engine.ready.wait()  # loaded means ready: no question waits minutes behind the compilation
        observe_engine(engine.compiled)  # 0 is an error a site must see (the worker's health check fails)
        if compile_steps and not engine.compiled:
            log.error("the in-process engine decodes UNCOMPILED: %s", engine.compile_error)
        if self.device.type == "cuda":
            free, _ = self.torch.cuda.mem_get_info(self.device)
            log.info("decode engine: %d slots of %d tokens, %d rows of %d tokens (%.1f GB), a step of the largest "
                     "shapes %.2f GB (measured); %.1f GB of the GPU left", slots, prefix_tokens, rows, tail_tokens,
                     engine.store.nbytes / 1e9, engine.step_workspace_bytes / 1e9, free / 1e9)
            if batch_cache_mb is None and free < self.prefixes.budget_bytes + PREFILL_RESERVE // 2:
                log.error("after the decode engine's compilation %.1f GB of the GPU is left for the prefix cache "
                          "(%.1f GB) and an image's prefill: set model.batch_cache_mb lower", free / 1e9,
                          self.prefixes.budget_bytes / 1e9)
        return engine

    def _batch_cache_bytes(self, batch_cache_mb: int | None) -> int:
        """The decode engine's memory: as configured, else up to 16 GiB of what the GPU has left beside the
        prefix cache and room for prefilling an image (2 GiB on a CPU)."""
        if batch_cache_mb is not None:
            return batch_cache_mb * 2**20
        if self.device.type != "cuda":
            return 2 * 2**30
        free, _ = self.torch.cuda.mem_get_info(self.device)
        return max(0, min(16 * 2**30, free - self.prefixes.budget_bytes - PREFILL_RESERVE))

    def inputs(self, image: np.ndarray, turns: list[Turn], text: str | None = None) -> Any:
        """The processor's tensors for ``turns`` (or the raw ``text``) about ``image``, on the model's device."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError("image must be 8-bit grayscale (rows, columns)")
        # RadVLM saw RGB JPEGs: give the processor three identical channels.
        picture = model_picture(image)
        batch = self.processor(images=picture, text=text or prompts.render(turns), return_tensors="pt")
        return batch.to(self.device, dtype=self.model.dtype)

    def _prefix_splits_cleanly(self) -> bool:
        """Whether a prompt tokenizes as its prefix then its question (so the prefix's cache can be reused)."""
        tokenizer = self.processor.tokenizer
        text = prompts.render([Turn("user", prompts.REPORT)])
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        parts = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (PREFIX, text[len(PREFIX):])]
        if whole != parts[0] + parts[1]:
            log.warning("this tokenizer merges across the image prefix: every question prefills the image again")
            return False
        return True

    def _prefix(self, key: str, image: np.ndarray, inputs: Any) -> Generator[None, None, tuple[int, Any]]:
        """On the engine's thread: the image's prefilled prefix, from the cache or computed now (from the
        processor's ``inputs`` when the caller prepared them), a part at each step, and kept."""
        entry = self.prefixes.get(key)
        if entry is None:
            batch = inputs if inputs is not None else self.inputs(image, [], text=PREFIX)
            cache = yield from self._prefill(batch)
            entry = Prefix(int(batch["input_ids"].shape[1]), cache, cache_bytes(cache))
            self.prefixes.put(key, entry)
            self._prepared_no_more(key)
        return entry.length, entry.cache

    def _prefill(self, batch: Any) -> Generator[None, None, Any]:
        """The KV cache of the prefix in ``batch``: the image encoded and put in place of its tokens, then
        the language model over ``prefill_chunk_tokens`` at a time, a part per step (no logits: the
        question's prefill gives the first answer token)."""
        length = int(batch["input_ids"].shape[1])
        if not self.prefill_chunk_tokens or length <= self.prefill_chunk_tokens:
            return self.model(**batch, use_cache=True, logits_to_keep=1).cache
        embedded = self._embedded(batch)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.text_config)
        for start in range(0, length, self.prefill_chunk_tokens):
            if start:
                yield
            self.model(inputs_embeds=embedded[:, start:start + self.prefill_chunk_tokens], cache=cache,
                       use_cache=True, logits_to_keep=1)
        return cache

    def _embedded(self, batch: Any) -> Any:
        """The prefix as the language model takes it: the token embeddings with the image's features
        in place of its image tokens, as the model's own forward builds them before its language model."""
        model = self.model
        ids = batch["input_ids"]
        embedded = model.get_input_embeddings()(ids)
        encoded = model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                           return_dict=True)
        features = self.torch.cat(encoded.pooler_output, dim=0).to(embedded.device, embedded.dtype)
        image_tokens, _ = model.model.get_placeholder_mask(ids, inputs_embeds=embedded, image_features=features)
        return embedded.masked_scatter(image_tokens, features)

    def _prepared(self, key: str, image: np.ndarray) -> tuple[int, Any]:
        """The image's prefix length and, unless its prefix is cached, the processor's inputs for it
        (tiling and normalising: CPU work), prepared once for all the callers asking about the image
        at the same time (the report and the abnormalities of a study)."""
        with self._preparing_lock:
            cached = self.prefixes.peek(key)
            if cached is not None:
                return cached.length, None
            preparing = self._preparing.get(key)
            mine = preparing is None
            if preparing is None:
                preparing = self._preparing[key] = Future()
        if mine:
            try:
                preparing.set_result(self.inputs(image, [], text=PREFIX))
            except BaseException as exc:
                self._prepared_no_more(key)
                preparing.set_exception(exc)
                raise
        inputs = preparing.result()
        return int(inputs["input_ids"].shape[1]), inputs

    def _prepared_no_more(self, key: str) -> None:
        with self._preparing_lock:
            self._preparing.pop(key, None)

    def _plain(self, image: np.ndarray, turns: list[Turn], params: GenerationParams,
               on_text: OnText | None, on_token: Callable[[int], None] | None = None) -> tuple[int, list[int]]:
        """transformers' own ``generate()`` on the whole prompt (no prefix cache)."""
        batch = self.inputs(image, turns)
        prompt_tokens = int(batch["input_ids"].shape[1])
        streamer = stream_relay(self.processor.tokenizer, on_text, skip_prompt=True)
        if on_token is not None:
            streamer = TokenRelay(on_token, streamer)
        with self._one_at_a_time, self.torch.inference_mode():
            output = self.model.generate(**batch, do_sample=False, max_new_tokens=params.max_new_tokens,
                                         min_new_tokens=params.min_new_tokens or None, streamer=streamer)
        return prompt_tokens, output[0, prompt_tokens:].tolist()

    def _from_prefix(self, image: np.ndarray, conversations: list[list[Turn]], params: list[GenerationParams],
                     on_text: OnText | None = None,
                     on_token: Callable[[int], None] | None = None) -> list[tuple[int, list[int]]]:
        """Every conversation decoded by the engine from the image's prefix, alongside whatever else it
        is decoding; ``on_text`` streams the answer of a single conversation, and someone reading along
        (a radiologist's question) goes before the analyses waiting for room in the batch."""
        if on_text is not None and len(conversations) != 1:
            raise ValueError("streaming takes one question at a time")
        key = image_key(image)
        prefix_length, inputs = self._prepared(key, image)  # the processor's work here, not on the engine's thread
        tokenizer = self.processor.tokenizer
        # the engine's thread only hands streamed tokens over; the text is decoded and passed on here
        streamed: queue.SimpleQueue[int | None] | None = queue.SimpleQueue() if on_text is not None else None
        relay = streamed.put if streamed is not None else None
        if on_token is not None:  # on the engine's thread, as the token is read
            relay = on_token if relay is None else (lambda token, put=relay: (on_token(token), put(token)))
        rows = [Row(tokenizer(prompts.render(turns)[len(PREFIX):], add_special_tokens=False)["input_ids"], p,
                    on_token=relay) for turns, p in zip(conversations, params, strict=True)]
        assert self.engine is not None  # there is one whenever there is a prefix cache
        try:
            done = self.engine.submit(rows, prefix_length, partial(self._prefix, key, image, inputs), key=key,
                                      urgent=on_text is not None)
            if streamed is not None:
                done.add_done_callback(lambda _: streamed.put(None))  # after the last token, however it ends
                relay = stream_relay(tokenizer, on_text)
                while (token := streamed.get()) is not None:
                    relay.put(self.torch.tensor([token]))
                relay.end()
            done.result()
        except BaseException:
            self.prefixes.drop(key)
            self._prepared_no_more(key)
            raise
        return [(prefix_length + len(row.tail), row.tokens + ([self.end_of_turn] if row.ended else [])) for row in rows]

    def generate_many(self, image: np.ndarray, conversations: list[list[Turn]],
                      params: list[GenerationParams]) -> list[Completion]:
        """Several questions about one image, decoded together (one at a time without a prefix cache)."""
        if not self.prefixes.budget_bytes:
            return [self.generate(image, turns, p) for turns, p in zip(conversations, params, strict=True)]
        start = time.perf_counter()
        decoded = self._from_prefix(image, conversations, params)
        seconds = time.perf_counter() - start
        return [self._completion(prompt_tokens, new, seconds) for prompt_tokens, new in decoded]

    def generate(self, image: np.ndarray, turns: list[Turn], params: GenerationParams,
                 on_text: OnText | None = None, *, on_token: Callable[[int], None] | None = None) -> Completion:
        """``on_token`` (benchmarks): each new token id as it is generated, decodable or not."""
        start = time.perf_counter()
        if self.prefixes.budget_bytes:
            [(prompt_tokens, new)] = self._from_prefix(image, [turns], [params], on_text, on_token)
        else:
            prompt_tokens, new = self._plain(image, turns, params, on_text, on_token)
        return self._completion(prompt_tokens, new, time.perf_counter() - start)

    def _completion(self, prompt_tokens: int, new: list[int], seconds: float) -> Completion:
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        return Completion(text=text.strip(), prompt_tokens=prompt_tokens, new_tokens=len(new), seconds=seconds)

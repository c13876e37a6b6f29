"""A study end to end on the model runtime, figure by figure (issue 27: GPU engine, second pass).

Builds a checkpoint of RadVLM's published shape with random weights (16 GB bf16; ``--tiny``: the
tiny checkpoint on the CPU, the same code path and the same output), loads it through the service's
own ``TransformersBackend`` (the real loading path: the engine compiled while loading on a GPU), and
asks the study's questions with forced lengths, as ``performance-baseline.md`` does: report 150
tokens, abnormalities 30, three groundings 25 each, each study an image of its own (2048x2500).

Each figure is printed the moment it is measured and appended to ``--out`` (default
``$OUT/study-figures.jsonl`` when ``$OUT`` is set), so a run cut short keeps what it measured. The
most telling figures come first: the engine as loaded, decode time per token at batch 1, the time
to the first token of a chat question (taken at the first generated token, by a per-token
callback: a random-weight 7B's tokens mostly decode to no text), a study's latency with its tasks
batched, saturation (``--queued`` studies, ``--concurrency`` at once), a chat streamed while new
studies arrive; last the slow baselines (each task alone from the cached prefix; plain
``generate()``, 16 s a study on an H100).

    python benchmarks/gpu_study.py [--tiny] [--folder /tmp/radvlm-7b-random] [--repeats 3] [--baseline-repeats 1]
                                   [--queued 16] [--concurrency 8] [--batch-cache-mb N] [--[no-]compile-decode]
                                   [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radvlm import prompts  # noqa: E402
from radvlm.backends.base import GenerationParams  # noqa: E402
from radvlm.backends.prefix_cache import PrefixCache  # noqa: E402
from radvlm.prompts import Turn  # noqa: E402

TASKS = [
    ("report", prompts.REPORT, 150),
    ("abnormalities", prompts.ABNORMALITIES, 30),
    ("grounding cardiomegaly", prompts.grounding_question("Cardiomegaly"), 25),
    ("grounding pleural effusion", prompts.grounding_question("Pleural effusion"), 25),
    ("grounding pneumothorax", prompts.grounding_question("Pneumothorax"), 25),
]
CHAT = [Turn("user", "Is there a pleural effusion?"), Turn("assistant", "Yes, on the left."),
        Turn("user", "Describe it.")]
SHAPE = (2500, 2048)  # rows x columns: a 2048x2500 radiograph (~7,300 image tokens)


class Figures:
    """Each figure printed at once and appended to a file as a JSON line (flushed)."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def __call__(self, name: str, value: Any, unit: str = "", target: str = "") -> None:
        shown = f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        print(f"| {name} | {shown} {unit} | {target} |".replace("  |", " |"), flush=True)
        if self.out is not None:
            with self.out.open("a") as fh:
                fh.write(json.dumps({"figure": name, "value": value, "unit": unit, "target": target,
                                     "t": round(time.time(), 3)}) + "\n")
                fh.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (a dry run)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/radvlm-7b-random"))
    parser.add_argument("--repeats", type=int, default=3, help="studies with batched tasks (their median latency)")
    parser.add_argument("--baseline-repeats", type=int, default=1,
                        help="studies of each task alone and of plain generate() (16 s each on an H100)")
    parser.add_argument("--queued", type=int, default=16, help="studies waiting at the start of the saturation run")
    parser.add_argument("--concurrency", type=int, default=8, help="studies in flight at once (worker.concurrency)")
    parser.add_argument("--batch-cache-mb", type=int, help="model.batch_cache_mb (default: as the worker sizes it)")
    parser.add_argument("--compile-decode", action=argparse.BooleanOptionalAction,
                        help="model.compile_decode (default: on, on the CPU of a dry run too)")
    parser.add_argument("--out", type=Path, help="figures as JSON lines (default: $OUT/study-figures.jsonl)")
    args = parser.parse_args()
    out = args.out or (Path(os.environ["OUT"]) / "study-figures.jsonl" if os.environ.get("OUT") else None)
    figure = Figures(out)

    import torch

    from radvlm.backends.transformers import TransformersBackend
    from radvlm.tiny_checkpoint import make_test_model

    shape = "tiny" if args.tiny else "radvlm-7b"
    folder = args.folder.with_name(args.folder.name + "-tiny") if args.tiny else args.folder
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    print(f"{shape} on {device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), torch {torch.__version__}",
          flush=True)
    print("| figure | value | target (H100) |\n|---|---|---|", flush=True)
    start = time.perf_counter()
    if not (folder / "config.json").exists():
        make_test_model(folder, shape=shape, device=device)
        if cuda:
            torch.cuda.empty_cache()
    figure("checkpoint built", time.perf_counter() - start, "s")
    start = time.perf_counter()
    backend = TransformersBackend(str(folder), device=device, prefix_cache_mb=4096, batch_cache_mb=args.batch_cache_mb,
                                  compile_decode=args.compile_decode is not False)  # the dry run compiles too
    figure("loaded (the decode step's compilation included)", time.perf_counter() - start, "s")
    engine = backend.engine
    assert engine is not None
    store = engine.store
    figure("engine", f"{store.slots} image slots of {store.prefix_tokens} tokens, {store.rows} rows of "
                     f"{store.tail_tokens} ({store.nbytes / 1e9:.2f} GB)")
    figure("decode step compiled", "yes" if engine.compiled else f"NO: {engine.compile_error or 'not asked'}")
    if cuda:
        figure("a step of the largest shapes (measured at warm-up)", engine.step_workspace_bytes / 1e9, "GB")
    from torch._dynamo.utils import counters

    figure("compiled graphs", counters["stats"]["unique_graphs"])

    image = picture(0)
    start = time.perf_counter()
    backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=4, min_new_tokens=4))
    sync()
    figure("first question about a new image (prefill of ~7,300 tokens, 4 tokens)", time.perf_counter() - start, "s")

    spans = []
    for length in (1, 129):  # the same question about the same (cached) image
        start = time.perf_counter()
        backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=length,
                                                                                  min_new_tokens=length))
        sync()
        spans.append(time.perf_counter() - start)
    figure("decode at batch 1", (spans[1] - spans[0]) / 128 * 1000, "ms/token", "<= 7")

    figure("chat: first token of a follow-up about a cached image", 1000 * first_token(backend, image), "ms",
           "<= 80")

    latencies = []
    for number in range(args.repeats):
        new = picture(number + 1)
        start = time.perf_counter()
        study(backend, new)
        sync()
        latencies.append(time.perf_counter() - start)
        figure(f"study latency, tasks batched (study {number + 1})", latencies[-1], "s")
    figure(f"study latency, tasks batched (median of {args.repeats})", statistics.median(latencies), "s", "<= 1.5")

    steps = engine.steps
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda n: study(backend, picture(1000 + n)), range(args.queued)))
    sync()
    seconds = time.perf_counter() - start
    figure(f"saturation: {args.queued} queued, {args.concurrency} at once", args.queued / seconds * 3600,
           "studies/hour", ">= 5000")
    figure("saturation: rows per decode step (mean)", round(saturation_rows(args.queued, engine.steps - steps), 1))
    if cuda:
        figure("peak GPU memory so far", torch.cuda.max_memory_allocated() / 1e9, "GB", "<= 70")

    parts = backend.prefill_chunk_tokens
    for label, chunk in (("prefix at once", 0), (f"prefix in parts of {parts}", parts)):
        first, longest, median = chat_while_studies_arrive(backend, image, args.concurrency, chunk)
        figure(f"chat while {args.concurrency} studies arrive, {label}: first token", 1000 * first, "ms")
        figure(f"chat while {args.concurrency} studies arrive, {label}: longest pause", 1000 * longest, "ms")
        figure(f"chat while {args.concurrency} studies arrive, {label}: median pause", 1000 * median, "ms")
    backend.prefill_chunk_tokens = parts

    budget = backend.prefixes.budget_bytes
    for label, cache_bytes in (("each task alone from the cached prefix", budget), ("plain generate()", 0)):
        backend.prefixes = PrefixCache(cache_bytes)
        for number in range(args.baseline_repeats):
            new = picture(500 + number)
            start = time.perf_counter()
            for _, question, length in TASKS:
                backend.generate(new, [Turn("user", question)], GenerationParams(max_new_tokens=length,
                                                                                  min_new_tokens=length))
            sync()
            figure(f"study latency, {label} (study {number + 1})", time.perf_counter() - start, "s")
        if cache_bytes == 0:
            figure("chat: first token, plain generate()", 1000 * first_token(backend, image), "ms")
    backend.prefixes = PrefixCache(budget)
    figure("shared decode steps in all", engine.steps)
    if cuda:
        figure("peak GPU memory (whole run)", torch.cuda.max_memory_allocated() / 1e9, "GB", "<= 70")
    engine.close()


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=SHAPE, dtype=np.uint8)


def saturation_rows(studies: int, steps: int) -> float:
    """Rows a step carried on average: every task's tokens after its first (which its prefill gives)."""
    return studies * sum(length - 1 for _, _, length in TASKS) / max(1, steps)


def first_token(backend: Any, image: np.ndarray) -> float:
    """Seconds from asking a follow-up question about ``image`` to its first generated token."""
    first: list[float] = []
    asked = time.perf_counter()
    backend.generate(image, CHAT, GenerationParams(max_new_tokens=8, min_new_tokens=8),
                     on_token=lambda token: first.append(time.perf_counter()) if not first else None)
    return first[0] - asked


def study(backend: Any, image: np.ndarray) -> None:
    """One image as ``worker.pipeline.analyse_image`` asks it: the report on a thread of its own and
    beside it the abnormalities, then the three groundings (lengths forced here)."""
    def ask(batch: list[tuple[str, str, int]]) -> None:
        backend.generate_many(image, [[Turn("user", question)] for _, question, _ in batch],
                              [GenerationParams(max_new_tokens=n, min_new_tokens=n) for _, _, n in batch])

    with ThreadPoolExecutor(max_workers=1) as report_thread:
        written = report_thread.submit(ask, TASKS[:1])
        ask(TASKS[1:2])
        ask(TASKS[2:])
        written.result()


def chat_while_studies_arrive(backend: Any, image: np.ndarray, studies: int,
                              chunk: int) -> tuple[float, float, float]:
    """A follow-up question about ``image`` (analysed before) streamed while ``studies`` new ones start,
    their prefixes prefilled ``chunk`` tokens at a time (0: at once): (first token, longest and median
    pause between tokens), seconds."""
    backend.prefill_chunk_tokens = chunk
    images = [picture(5000 + chunk + n) for n in range(studies)]
    tokens: list[float] = []
    with ThreadPoolExecutor(studies) as pool:
        arriving = [pool.submit(study, backend, new) for new in images]
        asked = time.perf_counter()
        backend.generate(image, CHAT, GenerationParams(max_new_tokens=64, min_new_tokens=64),
                         on_token=lambda token: tokens.append(time.perf_counter()))
        for done in arriving:
            done.result()
    pauses = [later - earlier for earlier, later in zip(tokens, tokens[1:])]
    return tokens[0] - asked, max(pauses), statistics.median(pauses)


if __name__ == "__main__":
    main()

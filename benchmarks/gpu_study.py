"""One study end to end on the model runtime, with per-task timings (issue: RadVLM on GPU workers).

Builds a checkpoint of RadVLM's published shape with random weights (``--shape radvlm-7b``, 16 GB
bf16; ``--tiny`` for a CPU smoke run), loads it through the service's own ``TransformersBackend``
(the real loading path), and asks the study's questions with forced lengths, as the baseline in
``performance-baseline.md`` does: report 150 tokens, abnormalities 30, three groundings 25 each.
Each study has an image of its own. Three runs side by side on the same loaded model: plain
``generate()`` with the whole prompt each time (the baseline); the image prefix prefilled once per
study and reused (``model.prefix_cache_mb``), each task alone on the engine's static rows (its
decode step compiled and captured as CUDA graphs on a GPU); and the engine as the pipeline uses it:
the prefix reused, the report on a thread of its own and beside it the abnormalities, then the three
groundings, all sharing decode steps. For each: the time to the first streamed word of a follow-up
chat question about a study analysed before, and the decode time per token of one question alone
(129 forced tokens less 1, over 128). Last, saturation: ``--queued`` studies waiting, taken by
``--concurrency`` threads as a worker's tasks are (``worker.concurrency``), sharing the engine's
decode steps; studies per hour from their wall time. And a radiologist's chat while new studies
arrive: the pauses between the words of a streamed answer about a study analysed before, while
``--concurrency`` new images are prefilled, with each prefix prefilled at once and in parts of
``model.prefill_chunk_tokens`` (the default) side by side.

    python benchmarks/gpu_study.py [--tiny] [--folder /tmp/radvlm-7b-random] [--repeats 10] [--baseline-repeats 3]
                                   [--queued 64] [--concurrency 8] [--batch-cache-mb 16384] [--[no-]compile-decode]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import prompts  # noqa: E402
from worker.backends.base import GenerationParams  # noqa: E402
from worker.backends.prefix_cache import PrefixCache  # noqa: E402
from worker.prompts import Turn  # noqa: E402

TASKS = [
    ("report", prompts.REPORT, 150),
    ("abnormalities", prompts.ABNORMALITIES, 30),
    ("grounding cardiomegaly", prompts.grounding_question("Cardiomegaly"), 25),
    ("grounding pleural effusion", prompts.grounding_question("Pleural effusion"), 25),
    ("grounding pneumothorax", prompts.grounding_question("Pneumothorax"), 25),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on CPU (smoke test)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/radvlm-7b-random"))
    parser.add_argument("--repeats", type=int, default=10, help="studies on the engine (the latency is their median)")
    parser.add_argument("--baseline-repeats", type=int, default=3,
                        help="studies of plain generate() and of one task at a time (16 s each on an H100)")
    parser.add_argument("--queued", type=int, default=64, help="studies waiting at the start of the saturation run")
    parser.add_argument("--concurrency", type=int, default=8, help="studies in flight at once (worker.concurrency)")
    parser.add_argument("--batch-cache-mb", type=int, help="model.batch_cache_mb: the decode rows (default: as the "
                                                                "worker sizes them, up to 16 GiB)")
    parser.add_argument("--compile-decode", action=argparse.BooleanOptionalAction,
                        help="model.compile_decode (default: on a GPU)")
    args = parser.parse_args()

    import torch

    from worker.backends.transformers import TransformersBackend
    from worker.test_model import make_test_model

    shape = "tiny" if args.tiny else "radvlm-7b"
    folder = args.folder.with_name(args.folder.name + "-tiny") if args.tiny else args.folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if not (folder / "config.json").exists():
        make_test_model(folder, shape=shape, device=device)
        if device == "cuda":
            torch.cuda.empty_cache()
    built = time.perf_counter() - start
    start = time.perf_counter()
    backend = TransformersBackend(str(folder), device=device, prefix_cache_mb=4096,
                                  batch_cache_mb=args.batch_cache_mb, compile_decode=args.compile_decode)
    loaded = time.perf_counter() - start
    image = np.random.default_rng(0).integers(0, 256, size=(2048, 2500), dtype=np.uint8)  # rows x columns
    store = backend.engine.store
    compiled = "compiled while loading" if backend.engine.compiled else "not compiled"
    print(f"{shape} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}); "
          f"checkpoint built in {built:.0f} s, loaded in {loaded:.1f} s; image 2500x2048\n"
          f"engine: {store.rows} rows of {store.row_tokens} tokens ({store.nbytes / 1e9:.1f} GB); decode step "
          f"{compiled}")
    backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=4, min_new_tokens=4))
    budget = backend.prefixes.budget_bytes
    results = {}
    for label, cache_bytes, together in (("plain generate()", 0, False),
                                         ("prefix cache", budget, False),
                                         ("prefix cache + batched tasks", budget, True)):
        backend.prefixes = PrefixCache(cache_bytes)
        results[label] = run_studies(backend, args.repeats if together else args.baseline_repeats, device, torch,
                                     together)

    saturated = saturation(backend, args.queued, args.concurrency, device, torch)
    parts = backend.prefill_chunk_tokens
    chats = {label: chat_while_studies_arrive(backend, image, args.concurrency, chunk)
             for label, chunk in (("prefix at once", 0), (f"prefix in parts of {parts}", parts))}
    names = [name for name, _, _ in TASKS]
    print("\n| task | prompt tokens | new tokens | " + " | ".join(f"{label} s (median)" for label in results)
          + " |\n|---|---|---|" + "---|" * len(results))
    for name in names:
        first = next(iter(results.values()))
        _, prompt, new = first["tasks"][name][-1]
        cells = " | ".join(f"{statistics.median(x for x, _, _ in r['tasks'][name]):.3f}" if r["tasks"][name] else
                           "(batched)" for r in results.values())
        print(f"| {name} | {prompt} | {new} | {cells} |")
    print("\n| figure | " + " | ".join(results) + " | target (H100) |\n|---|" + "---|" * (len(results) + 1))
    latencies = " | ".join(f"{statistics.median(r['studies']):.2f}" for r in results.values())
    print(f"| study latency, s (median of {args.baseline_repeats}, {args.baseline_repeats}, {args.repeats}) | "
          f"{latencies} | <= 1.5 |")
    print("| decode, ms/token at batch 1 | " + " | ".join(
        f"{r['decode_ms']:.1f}" for r in results.values()) + " | <= 7 |")
    print("| chat: first word of a follow-up, ms | " + " | ".join(
        f"{1000 * r['first_word']:.0f}" for r in results.values()) + " | <= 80 |")
    one_at_a_time = [f"{3600 / statistics.median(r['studies']):.0f} (one at a time)" for r in results.values()]
    print(f"| studies/hour | {' | '.join(one_at_a_time[:-1])} | {saturated:.0f} ({args.queued} queued, "
          f"{args.concurrency} at once) | >= 5000 |")
    if device == "cuda":
        print(f"| peak GPU memory, GB (whole run) | | | {torch.cuda.max_memory_allocated() / 1e9:.1f} | <= 70 |")
    print(f"\n| a chat answer streamed while {args.concurrency} new studies start | "
          + " | ".join(chats) + " |\n|---|" + "---|" * len(chats))
    for index, figure in enumerate(("first word, ms", "longest pause between words, ms",
                                    "median pause between words, ms")):
        print(f"| {figure} | " + " | ".join(f"{1000 * c[index]:.0f}" for c in chats.values()) + " |")
    print(f"\nengine: {backend.engine.steps} shared decode steps in all")
    backend.engine.close()


def study(backend, image: np.ndarray) -> None:  # type: ignore[no-untyped-def]
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


def saturation(backend, queued: int, concurrency: int, device: str, torch) -> float:  # type: ignore[no-untyped-def]
    """Studies per hour with ``queued`` studies (each its own image) waiting, ``concurrency`` in flight at once."""
    images = [np.random.default_rng(1000 + n).integers(0, 256, size=(2048, 2500), dtype=np.uint8)
              for n in range(queued)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda image: study(backend, image), images))
    if device == "cuda":
        torch.cuda.synchronize()
    return queued / (time.perf_counter() - start) * 3600


def chat_while_studies_arrive(backend, image: np.ndarray, studies: int,  # type: ignore[no-untyped-def]
                              chunk: int) -> tuple[float, float, float]:
    """A follow-up question about ``image`` (analysed before) streamed while ``studies`` new ones start,
    their prefixes prefilled ``chunk`` tokens at a time (0: at once): (first word, longest and median
    pause between words), seconds."""
    backend.prefill_chunk_tokens = chunk
    backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=1))  # analysed before
    images = [np.random.default_rng(5000 + chunk + n).integers(0, 256, size=(2048, 2500), dtype=np.uint8)
              for n in range(studies)]
    words: list[float] = []
    with ThreadPoolExecutor(studies) as pool:
        arriving = [pool.submit(study, backend, new) for new in images]
        asked = time.perf_counter()
        backend.generate(image, [Turn("user", "Is there a pleural effusion?"), Turn("assistant", "Yes, on the left."),
                                 Turn("user", "Describe it.")], GenerationParams(max_new_tokens=64, min_new_tokens=64),
                         on_text=lambda text: words.append(time.perf_counter()))
        for done in arriving:
            done.result()
    pauses = [later - earlier for earlier, later in zip(words, words[1:])]
    return words[0] - asked, max(pauses), statistics.median(pauses)


def run_studies(backend, repeats: int, device: str, torch, together: bool) -> dict:  # type: ignore[no-untyped-def]
    """``repeats`` studies, each on an image of its own, then a follow-up question about the last one."""
    rows: dict[str, list] = {name: [] for name, _, _ in TASKS}
    studies = []
    for number in range(repeats):
        image = np.random.default_rng(number + 1).integers(0, 256, size=(2048, 2500), dtype=np.uint8)
        study_start = time.perf_counter()
        if together:
            study(backend, image)
            if device == "cuda":
                torch.cuda.synchronize()
            studies.append(time.perf_counter() - study_start)
            continue
        for name, question, length in TASKS:
            params = GenerationParams(max_new_tokens=length, min_new_tokens=length)
            task_start = time.perf_counter()
            completion = backend.generate(image, [Turn("user", question)], params)
            if device == "cuda":
                torch.cuda.synchronize()
            rows[name].append((time.perf_counter() - task_start, completion.prompt_tokens, completion.new_tokens))
        studies.append(time.perf_counter() - study_start)
    first: list[float] = []
    asked = time.perf_counter()
    backend.generate(image, [Turn("user", "Is there a pleural effusion?"), Turn("assistant", "Yes, on the left."),
                             Turn("user", "Where is it?")], GenerationParams(max_new_tokens=8, min_new_tokens=8),
                     on_text=lambda text: first.append(time.perf_counter()) if not first else None)
    first_word = (first[0] if first else time.perf_counter()) - asked
    spans = []
    for length in (1, 129):  # the same question about the same (cached, if cached) image
        start = time.perf_counter()
        backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=length,
                                                                                  min_new_tokens=length))
        if device == "cuda":
            torch.cuda.synchronize()
        spans.append(time.perf_counter() - start)
    decode_ms = (spans[1] - spans[0]) / 128 * 1000
    return {"tasks": rows, "studies": studies, "first_word": first_word, "decode_ms": decode_ms}

if __name__ == "__main__":
    main()

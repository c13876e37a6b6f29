"""The GPU checks that CPU tests cannot make, short enough for one device call each.

``engine``: the in-process engine on CUDA with the tiny checkpoint, before the 7B benchmark
(``benchmarks/gpu_study.py``) spends minutes on it: the decode step compiled (its graphs, the memory
a step takes), the key positions each decode step reads, each answer compared with plain
``generate()``'s, the first token of a question, no compilation while serving, and
``radvlm_engine_compiled`` and ``radvlm_gpu_memory_bytes`` as a worker's metrics page shows them
after an analysis (issues 8, 27).

``training``: a short fine-tuning run of a LLaVA-OneVision-0.5B-shaped checkpoint (random weights)
on placeholder images, full and with ``--lora``: the loss, samples per second and peak GPU memory
of each logged step (issue 7).

    python benchmarks/device_checks.py engine|training [--tiny] [--samples 64]

``engine`` always uses the tiny checkpoint; ``training --tiny`` does too. Where there is no GPU
both run on the CPU, which checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def engine(tiny_folder: Path, device: str) -> None:
    import torch
    from prometheus_client import generate_latest
    from torch._dynamo.utils import counters

    from radvlm import prompts
    from radvlm.backends.base import GenerationParams
    from radvlm.backends.transformers import TransformersBackend
    from radvlm.prompts import Turn
    from radvlm.tiny_checkpoint import make_test_model
    from records.pixels import ModelImage
    from worker.pipeline import AnalysisOptions, analyse_image

    make_test_model(tiny_folder)
    start = time.perf_counter()
    backend = TransformersBackend(str(tiny_folder), device=device, prefix_cache_mb=512, batch_cache_mb=64,
                                  max_prompt_tokens=10240, max_new_tokens=64, compile_decode=True)
    loaded = time.perf_counter() - start
    plain = TransformersBackend(str(tiny_folder), device=device)
    engine_ = backend.engine
    assert engine_ is not None
    store = engine_.store
    workspace = f"{engine_.step_workspace_bytes / 1e6:.1f} MB" if device == "cuda" else "(measured on CUDA)"
    print(f"engine: {store.slots} slots of {store.prefix_tokens} tokens, {store.rows} rows of {store.tail_tokens}; "
          f"decode step {'compiled' if engine_.compiled else 'NOT compiled: ' + str(engine_.compile_error)}; "
          f"{counters['stats']['unique_graphs']} graphs; loaded in {loaded:.1f} s, the compilation included; "
          f"a step of the largest shapes takes {workspace} beside the store")
    # what each decode step reads, taken where the engine hands the spans to the (compiled) step: a hook
    # inside the compiled attention would turn its dynamic sizes into constants
    reads: set[tuple[int, int, int, int]] = set()
    step_with = engine_._step_with

    def recording(forward, layout, prefix_span, tail_span, **kwargs):  # type: ignore[no-untyped-def]
        reads.add((len(layout.order), layout.slots, prefix_span, tail_span))
        return step_with(forward, layout, prefix_span, tail_span, **kwargs)

    image = np.random.default_rng(3).integers(0, 256, (2500, 2048), dtype=np.uint8)  # rows x columns
    questions = [prompts.REPORT, prompts.ABNORMALITIES, prompts.grounding_question("Cardiomegaly")]
    params = [GenerationParams(max_new_tokens=n) for n in (48, 16, 24)]
    engine_._step_with = recording
    try:
        got = backend.generate_many(image, [[Turn("user", q)] for q in questions], params)
    finally:
        engine_._step_with = step_with
    print("key positions read by each attention call of a decode step (rows, slots, prefix span, tail span; the "
          f"capacity is {store.prefix_tokens} + {store.tail_tokens}): {sorted(reads)}")
    for question, p, answer in zip(questions, params, got, strict=True):
        expected = plain.generate(image, [Turn("user", question)], p)
        same = (answer.text, answer.new_tokens) == (expected.text, expected.new_tokens)
        print(f"  {question[:40]!r}: {'same as' if same else 'DIFFERS from'} plain generate() "
              f"({answer.new_tokens} tokens)")
    first: list[float] = []
    asked = time.perf_counter()
    backend.generate(image, [Turn("user", "Where is it?")], GenerationParams(max_new_tokens=4),
                     on_token=lambda token: first.append(time.perf_counter()))
    print(f"first token of a question about a cached image: {1000 * (first[0] - asked):.0f} ms")
    graphs = counters["stats"]["unique_graphs"]
    analyse_image(backend, ModelImage(image, 2048, 2500), "1.2.3", "1.2", AnalysisOptions(max_new_tokens=64))
    print(f"graphs compiled while serving: {counters['stats']['unique_graphs'] - graphs} (0 expected)")
    print("metrics page after one analysis:")
    for line in generate_latest().decode().splitlines():
        if line.startswith(("radvlm_gpu_memory_bytes", "radvlm_model_tokens_per_second", "radvlm_engine_compiled")):
            print("  " + line)
    if device == "cuda":
        print(f"  (torch: {torch.cuda.memory_allocated()} bytes allocated)")


def training(folder: Path, output: Path, shape: str, device: str, samples: int) -> None:
    import torch
    from PIL import Image

    from radvlm.tiny_checkpoint import make_test_model
    from training import answers
    from training.finetune import Recipe, finetune
    from training.instructions import Instruction

    start = time.perf_counter()
    make_test_model(folder, shape=shape, device=device)
    print(f"{shape} checkpoint built in {time.perf_counter() - start:.0f} s")
    rng = random.Random(0)
    items = []
    for index in range(samples):  # a frontal-sized placeholder each: RadVLM's anyres tiling, ~7,300 image tokens
        path = output / "images" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (1024, 1250), dtype=np.uint8)).save(path)
        question, answer = answers.abnormalities(rng, ["Cardiomegaly"] if index % 2 else [])
        heart = ("Is the heart enlarged?", "Yes." if index % 2 else "No.")
        items.append(Instruction(id=str(index), image=str(path), task="conversation", source="device check",
                                 rounds=((question, answer), heart)))
    for lora in (False, True):
        run = output / ("lora" if lora else "full")
        recipe = Recipe(learning_rate=1e-4, vision_learning_rate=2e-5, warmup_ratio=0.0, scheduler="constant",
                        batch_size=2, gradient_accumulation=1, logging_steps=2, save_steps=10**6,
                        save_total_limit=None, dataloader_workers=2, lora=lora)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        finetune(str(folder), items, run, recipe)
        print(f"\n{'LoRA' if lora else 'full fine-tuning'}: {samples} samples in {time.perf_counter() - start:.0f} s "
              f"(lr {recipe.learning_rate}, vision {recipe.vision_learning_rate}, batch {recipe.batch_size})")
        print("| step | loss | samples/s | gpu_peak_gib |\n|---|---|---|---|")
        for line in (run / "metrics.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if "loss" in entry:
                print(f"| {entry.get('step')} | {entry['loss']:.3f} | {entry.get('samples_per_second', '')} | "
                      f"{entry.get('gpu_peak_gib', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=("engine", "training"))
    parser.add_argument("--tiny", action="store_true", help="training: the tiny checkpoint, not the 0.5B shape")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/device-checks"))
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; torch {torch.__version__}")
    if args.check == "engine":
        engine(args.work / "tiny", device)
    else:
        shape = "tiny" if args.tiny else "onevision-0.5b"
        training(args.work / shape, args.work / f"runs-{shape}", shape, device, args.samples)


if __name__ == "__main__":
    main()

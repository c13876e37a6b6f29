"""One study end to end on the model runtime, with per-task timings (issue: RadVLM on GPU workers).

Builds a checkpoint of RadVLM's published shape with random weights (``--shape radvlm-7b``, 16 GB
bf16; ``--tiny`` for a CPU smoke run), loads it through the service's own ``TransformersBackend``
(the real loading path), and asks the study's questions with forced lengths, as the baseline in
``performance-baseline.md`` does: report 150 tokens, abnormalities 30, three groundings 25 each.

    python benchmarks/gpu_study.py [--tiny] [--folder /tmp/radvlm-7b-random] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import prompts  # noqa: E402
from worker.backends.base import GenerationParams  # noqa: E402
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
    parser.add_argument("--repeats", type=int, default=3)
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
    backend = TransformersBackend(str(folder), device=device)
    loaded = time.perf_counter() - start
    image = np.random.default_rng(0).integers(0, 256, size=(2048, 2500), dtype=np.uint8)  # rows x columns
    print(f"{shape} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}); "
          f"checkpoint built in {built:.0f} s, loaded in {loaded:.1f} s; image 2500x2048")

    backend.generate(image, [Turn("user", prompts.REPORT)], GenerationParams(max_new_tokens=4, min_new_tokens=4))
    rows = {name: [] for name, _, _ in TASKS}
    studies = []
    for _ in range(args.repeats):
        study_start = time.perf_counter()
        for name, question, length in TASKS:
            params = GenerationParams(max_new_tokens=length, min_new_tokens=length)
            task_start = time.perf_counter()
            completion = backend.generate(image, [Turn("user", question)], params)
            if device == "cuda":
                torch.cuda.synchronize()
            rows[name].append((time.perf_counter() - task_start, completion.prompt_tokens, completion.new_tokens))
        studies.append(time.perf_counter() - study_start)

    print("\n| task | prompt tokens | new tokens | seconds (median) | ms per new token |\n|---|---|---|---|---|")
    for name, samples in rows.items():
        seconds = statistics.median(s for s, _, _ in samples)
        _, prompt, new = samples[-1]
        print(f"| {name} | {prompt} | {new} | {seconds:.3f} | {1000 * seconds / new:.1f} |")
    print(f"| whole study (5 tasks) | | | {statistics.median(studies):.2f} | |")
    if device == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()

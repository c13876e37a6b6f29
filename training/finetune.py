"""RadVLM's fine-tuning recipe on transformers' ``Trainer``.

Full fine-tuning of a LLaVA-OneVision checkpoint: vision tower at 2e-6, projector and language
model at 1e-5, cosine schedule with 3 % warm-up, no weight decay, one epoch, bf16 and tf32 on a
GPU, gradient checkpointing, batch 1 per device with 2 accumulation steps; loss on the
assistant's tokens only (``training.examples``). Several GPUs or nodes: launch with
``accelerate launch`` (or ``torchrun``) and pass ``--deepspeed training/zero3.json``: the
Trainer hands the model to DeepSpeed ZeRO-3 and this optimizer's two learning rates go with it.
One GPU: ``--lora`` trains low-rank adapters on the language model (peft) instead, at its own
learning rate (2e-4 unless one is given), and merges them into the model at the end: the output
folder is then a full checkpoint like any other, with the adapter alone in its ``adapter/`` folder.

Checkpoints land in the output folder every ``save_steps``; ``resume`` picks up the last one.
Each log step is appended to ``metrics.jsonl`` there, with samples per second and peak GPU memory.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from training.examples import Collator
from training.instructions import Instruction
from training.lengths import within

VISION = "vision_tower"
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
FULL_LEARNING_RATE = 1e-5  # RadVLM's, for the language model and projector
LORA_LEARNING_RATE = 2e-4  # the usual LoRA rate (LLaVA-1.5's finetune_lora.sh, QLoRA): 1e-5 barely moves adapters
ADAPTER = "adapter"  # a LoRA run's adapter alone, in this folder of the output


@dataclass
class Recipe:
    """RadVLM's settings (``finetune_radio_7b.sh``) as defaults.

    ``learning_rate`` None: ``FULL_LEARNING_RATE``, or ``LORA_LEARNING_RATE`` with ``lora``.
    """

    learning_rate: float | None = None
    vision_learning_rate: float = 2e-6
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    batch_size: int = 1
    gradient_accumulation: int = 2
    max_length: int = 32768
    gradient_checkpointing: bool = True
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 0
    deepspeed: Path | None = None
    lora: bool = False
    lora_rank: int = 64
    lora_alpha: int = 16
    dataloader_workers: int = 4
    extra: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field

    def __post_init__(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = LORA_LEARNING_RATE if self.lora else FULL_LEARNING_RATE


class Instructions(Dataset):
    """The instructions as a torch ``Dataset``, items as they are: the ``Collator`` tokenises them and loads their
    images batch by batch."""

    def __init__(self, items: list[Instruction]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Instruction:
        return self.items[index]


class RadVLMTrainer(Trainer):
    """A Trainer whose optimizer gives the vision tower its own learning rate."""

    def __init__(self, *args: Any, vision_learning_rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vision_learning_rate = vision_learning_rate

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.args.learning_rate, self.vision_learning_rate,
                                      self.args.weight_decay, set(self.get_decay_parameter_names(model)))
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer


def parameter_groups(model: torch.nn.Module, learning_rate: float, vision_learning_rate: float,
                     weight_decay: float, decay_names: set[str]) -> list[dict[str, Any]]:
    """Four groups: vision tower or not, decayed or not; frozen parameters left out."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((VISION in name, name in decay_names), []).append(param)
    return [{"params": params, "lr": vision_learning_rate if vision else learning_rate,
             "weight_decay": weight_decay if decayed else 0.0, "name": ("vision" if vision else "language")}
            for (vision, decayed), params in sorted(groups.items())]


class MetricsLog(TrainerCallback):
    """Appends every log step to ``metrics.jsonl``: the Trainer's figures, samples/s, GPU memory."""

    def __init__(self, path: Path, samples_per_step: int) -> None:
        self.path = path
        self.samples_per_step = samples_per_step
        self._last: tuple[float, int] | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        entry = {"step": state.global_step, **logs}
        if self._last is not None and state.global_step > self._last[1]:
            steps = state.global_step - self._last[1]
            entry["samples_per_second"] = round(steps * self.samples_per_step / (now - self._last[0]), 4)
        self._last = (now, state.global_step)
        if torch.cuda.is_available():
            entry["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")


def training_arguments(recipe: Recipe, output: Path, world_size: int = 1) -> TrainingArguments:
    """The ``Trainer``'s arguments for ``recipe``: bf16 and tf32 on a GPU, the CPU when there is none. ``world_size`` is
    not read: the launcher (accelerate, torchrun) sets it."""
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output), num_train_epochs=recipe.epochs, learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.scheduler, warmup_steps=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
        per_device_train_batch_size=recipe.batch_size, gradient_accumulation_steps=recipe.gradient_accumulation,
        activation_checkpointing=recipe.gradient_checkpointing, bf16=on_gpu, tf32=on_gpu or None,
        logging_steps=recipe.logging_steps, logging_first_step=True, save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit, seed=recipe.seed, report_to="none",
        deepspeed=str(recipe.deepspeed) if recipe.deepspeed else None, remove_unused_columns=False,
        dataloader_num_workers=recipe.dataloader_workers, use_cpu=not on_gpu, **recipe.extra)


def load_model(checkpoint: str, recipe: Recipe) -> Any:
    """The checkpoint in bf16 on a GPU (float32 without one), with LoRA adapters on the language model when
    ``recipe.lora``; its KV cache off (training needs none)."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    if recipe.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.config.use_cache = False
    return model


def finetune(checkpoint: str, items: list[Instruction], output: Path, recipe: Recipe,
             image_folder: Path | None = None, resume: bool = False, too_long: str = "refuse") -> dict[str, Any]:
    """Train on ``items`` and save model and processor to ``output``; returns the final metrics.

    A LoRA run saves its adapter to ``output / ADAPTER`` and the model with the adapter merged to
    ``output``, so that ``output`` loads as any checkpoint does (``train evaluate``, ``serve``).
    Before ``output`` is made, every datapoint's length is counted (``training.lengths``): one over
    ``recipe.max_length`` is ``TooLong`` (``too_long="refuse"``) or left out, counted on stderr ("skip").
    """
    processor = AutoProcessor.from_pretrained(checkpoint)
    fitting = within(items, processor, recipe.max_length, image_folder, skip=too_long == "skip")
    if fitting.too_long:
        print(f"left out: {fitting.summary(recipe.max_length)}", file=sys.stderr)
    items = fitting.kept
    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.json").write_text(json.dumps(asdict(recipe), default=str, indent=2))
    args = training_arguments(recipe, output)
    trainer = RadVLMTrainer(
        model=load_model(checkpoint, recipe), args=args, train_dataset=Instructions(items),
        data_collator=Collator(processor, image_folder, recipe.max_length),
        callbacks=[MetricsLog(output / "metrics.jsonl",
                              recipe.batch_size * recipe.gradient_accumulation * args.world_size)],
        vision_learning_rate=recipe.vision_learning_rate)
    result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(str(output / ADAPTER if recipe.lora else output))
    if trainer.is_world_process_zero():
        if recipe.lora:
            trainer.model.merge_and_unload().save_pretrained(str(output))
        processor.save_pretrained(str(output))
    return dict(result.metrics)

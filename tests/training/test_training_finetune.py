"""Fine-tuning on the tiny LLaVA-OneVision checkpoint, on the CPU: the loss mask, the two
learning rates, a falling loss, and resuming from a checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from radvlm.prompts import CHAT_TEMPLATE, Turn, render
from tests.training.training_data import placeholder_png
from training import answers
from training.examples import IGNORE, TRAINING_TEMPLATE, Collator, messages
from training.finetune import Recipe, finetune, parameter_groups
from training.instructions import Instruction


def _items(folder: Path, count: int) -> list[Instruction]:
    rng = random.Random(0)
    items = []
    for index in range(count):
        image = placeholder_png(folder / f"image{index}.png", 80, 96, seed=index)
        question, answer = answers.abnormalities(rng, ["Cardiomegaly"] if index % 2 else [])
        items.append(Instruction(id=f"t{index}", image=str(image), task="conversation", source="test",
                                 rounds=((question, answer),
                                         ("Is the heart enlarged?", "Yes." if index % 2 else "No."))))
    return items


def test_training_template_writes_the_text_the_service_prompts_with(tiny_model: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model)
    item = Instruction(id="a", image="x", rounds=(("Q one?", "A one."), ("Q two?", "A two.")), task="conversation",
                       source="t")
    convo = messages(item, None)
    trained = processor.apply_chat_template(convo, chat_template=TRAINING_TEMPLATE, tokenize=False)
    served = processor.apply_chat_template(convo, chat_template=CHAT_TEMPLATE, tokenize=False)
    assert trained == served
    prompt = render([Turn("user", "Q one?"), Turn("assistant", "A one."), Turn("user", "Q two?")])
    assert trained.startswith(prompt) and trained == prompt + "A two.<|im_end|>\n"


def test_loss_only_on_the_assistants_tokens(tiny_model: Path, tmp_path: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model)
    items = _items(tmp_path, 2)
    batch = Collator(processor)(items)
    tokenizer = processor.tokenizer
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for row, item in enumerate(items):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        learnt = labels != IGNORE
        assert torch.equal(labels[learnt], ids[learnt])
        expected = "".join(f"{answer}<|im_end|>" for _, answer in item.rounds)
        assert tokenizer.decode(ids[learnt]) == expected
        assert not learnt[ids == image_token].any() and (ids == image_token).sum() > 100  # image tokens: no loss
        assert not learnt[batch["attention_mask"][row] == 0].any()  # padding: no loss
        user_text = tokenizer.decode(ids[~learnt])
        assert all(question in user_text for question, _ in item.rounds)


def test_vision_tower_gets_its_own_learning_rate(tiny_model: Path) -> None:
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model)
    groups = parameter_groups(model, 1e-5, 2e-6, 0.0, set())
    by_rate = {group["lr"]: sum(p.numel() for p in group["params"]) for group in groups}
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    assert by_rate[2e-6] == vision > 0
    assert by_rate[1e-5] == sum(p.numel() for p in model.parameters()) - vision


def test_loss_falls_and_training_resumes(tiny_model: Path, tmp_path: Path) -> None:
    items = _items(tmp_path, 4)
    recipe = Recipe(learning_rate=2e-3, vision_learning_rate=1e-3, epochs=4, warmup_ratio=0.0, scheduler="constant",
                    batch_size=2, gradient_accumulation=1, logging_steps=1, save_steps=4, dataloader_workers=0)
    out = tmp_path / "run"
    finetune(str(tiny_model), items, out, recipe)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0]
    assert all(entry["samples_per_second"] > 0 for entry in log[1:-1])
    assert (out / "checkpoint-8").is_dir() and (out / "model.safetensors").exists()

    resumed = Recipe(**{**recipe.__dict__, "epochs": 5})
    finetune(str(tiny_model), items, out, resumed, resume=True)
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, 11))  # 1-8 from the first run, 9-10 after resuming
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert reloaded.config.model_type == "llava_onevision"


def test_an_instruction_longer_than_the_limit_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from training.instructions import BadInstruction

    processor = AutoProcessor.from_pretrained(tiny_model)
    with pytest.raises(BadInstruction, match="over the maximum length 64"):
        Collator(processor, max_length=64)(_items(tmp_path, 1))


def test_a_lora_run_is_a_checkpoint_that_evaluate_loads(tiny_model: Path, tmp_path: Path) -> None:
    """``--lora`` leaves a merged checkpoint (the adapter beside it), trained at LoRA's own learning rate."""
    import subprocess
    import sys

    from radvlm_pacs import main
    from training import instructions

    data, out = tmp_path / "train.json", tmp_path / "lora"
    instructions.write(_items(tmp_path, 2), data)
    assert main(["train", "finetune", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--lora",
                 "--epochs", "2", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1",
                 "--workers", "0"]) == 0
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(out).state_dict()
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model).state_dict()
    assert merged.keys() == base.keys()  # no LoRA layers left
    changed = {name for name in base if not torch.equal(merged[name], base[name])}
    assert changed and all("language_model" in name and "proj" in name for name in changed)
    env = {"RADVLM_MODEL__ID": str(out), "RADVLM_MODEL__DEVICE": "cpu", "RADVLM_MODEL__MAX_NEW_TOKENS": "4",
           "RADVLM_MODEL__PREFIX_CACHE_MB": "0", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "radvlm_pacs", "train", "evaluate", "--data", str(data),
                           "--out", str(tmp_path / "eval"), "--limit", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    [prediction] = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert prediction["id"] == "t0" and len(prediction["answers"]) == 2
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert (out / "adapter" / "adapter_config.json").exists()

    # LoRA's learning rate when none is given (--lr); the full fine-tune keeps RadVLM's
    assert json.loads((out / "recipe.json").read_text())["learning_rate"] == 2e-4
    assert Recipe(lora=True).learning_rate == 2e-4 and Recipe().learning_rate == 1e-5
    assert Recipe(lora=True, learning_rate=5e-5).learning_rate == 5e-5

"""Instructions to model inputs: the chat template renders each conversation and marks the
assistant's tokens, and only those carry a loss.

The template (``radvlm_training_template.jinja``) writes exactly the text the service prompts
with (``radvlm/radvlm_chat_template.jinja``: no system message, the image first in the first
user turn); it adds transformers' ``{% generation %}`` marks around each answer and its
``<|im_end|>``, which ``apply_chat_template(return_assistant_tokens_mask=True)`` turns into a
token mask after the processor has expanded the image tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.images import load
from training.instructions import BadInstruction, Instruction

TRAINING_TEMPLATE = Path(__file__).with_name("radvlm_training_template.jinja").read_text()
IGNORE = -100  # the label that carries no loss


def messages(item: Instruction, picture: Image.Image | None) -> list[dict[str, Any]]:
    """The conversation in transformers' chat format; the picture opens the first user turn."""
    out: list[dict[str, Any]] = []
    for index, (question, answer) in enumerate(item.rounds):
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if index == 0:
            content.insert(0, {"type": "image", "image": picture} if picture is not None else {"type": "image"})
        out.append({"role": "user", "content": content})
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


class Collator:
    """Batches of instructions to ``input_ids``, ``attention_mask``, ``labels`` and the image tensors."""

    def __init__(self, processor: Any, image_folder: Path | None = None, max_length: int = 32768,
                 load_image: Callable[[Path], Image.Image] = load) -> None:
        self.processor = processor
        self.image_folder = image_folder
        self.max_length = max_length
        self.load_image = load_image

    def image_path(self, item: Instruction) -> Path:
        path = Path(item.image)
        return path if path.is_absolute() or self.image_folder is None else self.image_folder / path

    def __call__(self, items: Sequence[Instruction]) -> dict[str, torch.Tensor]:
        conversations = [messages(item, self.load_image(self.image_path(item))) for item in items]
        batch = self.processor.apply_chat_template(
            conversations, chat_template=TRAINING_TEMPLATE, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, return_tensors="pt", processor_kwargs={"padding": True})
        if batch["input_ids"].shape[1] > self.max_length:
            raise BadInstruction(f"{[i.id for i in items]}: {batch['input_ids'].shape[1]} tokens, "
                                 f"over the maximum length {self.max_length}")
        mask = batch.pop("assistant_masks").bool() & batch["attention_mask"].bool()
        batch["labels"] = torch.where(mask, batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE))
        batch.pop("batch_num_images", None)
        return dict(batch)

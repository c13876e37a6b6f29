"""RadVLM's questions, word for word, and the chat template it was evaluated with.

Source: the canonical instruction templates of RadVLM (``radvlm/data/create_instructions.py``)
and its evaluation prompt (``radvlm/evaluation/models_loading_inference.py``): no system message,
the image first in the first user turn, greedy decoding. Change anything here and bump
``PROMPT_VERSION``: stored results record it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROMPT_VERSION = "radvlm-eval-1"

#: The same template as a Jinja chat template (each message's content a list of parts), for
#: checkpoints and model servers: ``vllm serve ... --chat-template radvlm/radvlm_chat_template.jinja``.
CHAT_TEMPLATE = Path(__file__).with_name("radvlm_chat_template.jinja").read_text()

REPORT = "Write a radiology report for this Chest X-ray."
ABNORMALITIES = "Are there any abnormalities on this Chest X-ray?"
GROUNDING = "Where is the {label} located in this Chest X-ray?"
DETECTION = "Could you indicate if there are any abnormalities on this Chest X-ray and their locations?"
PHRASE = "Please locate the following sentence: {phrase}"

#: CheXpert labels RadVLM can localise, with the name its grounding data used (VinDr-CXR).
#: Labels absent here (edema, pneumonia, fracture, support devices, ...) get no box.
GROUNDABLE: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Nodule/Mass",
    "Pleural Effusion": "Pleural effusion",
    "Pleural Other": "Pleural thickening",
    "Pneumothorax": "Pneumothorax",
    "Enlarged Cardiomediastinum": "Aortic enlargement",
}


def label_in_question(label: str) -> str:
    """As RadVLM's templates write a label: lower case unless it is all capitals (e.g. ILD)."""
    return label if label.isupper() else label.lower()


def grounding_question(label: str) -> str:
    """RadVLM's question that boxes ``label``: a finding as its grounding data named it (``GROUNDABLE``'s values) or an
    anatomical region, written as its templates write a label."""
    return GROUNDING.format(label=label_in_question(label))


def phrase_question(phrase: str) -> str:
    """RadVLM's phrase-grounding question: where the sentence ``phrase``, inserted as given, is on the image."""
    return PHRASE.format(phrase=phrase)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation, ``role`` user or assistant; ``render`` puts the image in the first user turn."""

    role: str  # "user" or "assistant"
    text: str


def render(turns: list[Turn]) -> str:
    """The prompt text for ``turns``, ending with the assistant's turn to speak.

    ``<|im_start|>{role}\\n<image>\\n{text}<|im_end|>\\n`` for the first user turn, text only for
    the others, then ``<|im_start|>assistant\\n``. The processor expands ``<image>``.
    """
    if not turns or turns[0].role != "user":
        raise ValueError("turns must start with a user turn")
    parts = []
    for index, turn in enumerate(turns):
        if turn.role not in ("user", "assistant"):
            raise ValueError(f"unknown role {turn.role!r}")
        body = f"<image>\n{turn.text}" if index == 0 else turn.text
        parts.append(f"<|im_start|>{turn.role}\n{body}<|im_end|>\n")
    if turns[-1].role != "user":
        raise ValueError("the last turn must be the user's question")
    return "".join(parts) + "<|im_start|>assistant\n"

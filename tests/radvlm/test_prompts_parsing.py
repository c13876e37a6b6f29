"""RadVLM's prompt format, and parsing of its answers into labels and pixel boxes."""

from __future__ import annotations

import pytest

from radvlm import prompts
from radvlm.parsing import boxes_from_answer, labels_as_radvlm_evaluates, labels_from_answer
from radvlm.prompts import CHAT_TEMPLATE, REPORT, Turn, render


def test_first_turn_carries_the_image_and_no_system_message():
    text = render([Turn("user", prompts.REPORT)])
    assert text == ("<|im_start|>user\n<image>\nWrite a radiology report for this Chest X-ray.<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_later_turns_are_text_only():
    text = render([Turn("user", "Is there an effusion?"), Turn("assistant", "Yes, on the left."),
                   Turn("user", "Where is it?")])
    assert text.count("<image>") == 1
    assert text.endswith("<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n")
    assert "system" not in text


@pytest.mark.parametrize("turns", [[], [Turn("assistant", "hi")], [Turn("user", "a"), Turn("assistant", "b")]])
def test_malformed_conversations_are_refused(turns):
    with pytest.raises(ValueError):
        render(turns)


def test_grounding_question_lowercases_unless_all_caps():
    assert prompts.grounding_question("Pleural effusion") == \
        "Where is the pleural effusion located in this Chest X-ray?"
    assert prompts.grounding_question("ILD") == "Where is the ILD located in this Chest X-ray?"


def present(labels: dict[str, bool]) -> set[str]:
    return {label for label, value in labels.items() if value}


@pytest.mark.parametrize("answer, expected", [
    ("The following abnormalities are identified: cardiomegaly, lung opacity and pleural effusion.",
     {"Cardiomegaly", "Lung Opacity", "Pleural Effusion"}),
    ("Yes, there is one abnormality identified: enlarged cardiomediastinum.", {"Enlarged Cardiomediastinum"}),
    ("No abnormalities or lesions are detected on this Chest X-ray.", {"No Finding"}),
    ("The following abnormalities are identified: pleural other and support devices.",
     {"Pleural Other", "Support Devices"}),
])
def test_radvlm_answer_formats(answer, expected):
    assert present(labels_from_answer(answer)) == expected
    assert present(labels_as_radvlm_evaluates(answer)) == expected


def test_negated_mentions_differ_from_the_papers_matching():
    report = "There is no pneumothorax. Mild cardiomegaly. No pleural effusion, but lung opacity at the left base."
    assert present(labels_from_answer(report)) == {"Cardiomegaly", "Lung Opacity"}
    # the paper's substring matching counts the negated ones as present
    assert present(labels_as_radvlm_evaluates(report)) == {"Cardiomegaly", "Lung Opacity", "Pneumothorax",
                                                            "Pleural Effusion"}


def test_boxes_map_to_pixels_of_the_original_image():
    answer = "The pleural effusion is located at the coordinates [0.1, 0.23, 0.5, 0.6] and [0.62, 0.2, 0.91, 0.58]."
    parsed = boxes_from_answer(answer, columns=1841, rows=1955)
    assert parsed.malformed is None
    first, second = parsed.boxes
    assert (first.x1, first.y1, first.x2, first.y2) == (0.1, 0.23, 0.5, 0.6)
    assert first.px == pytest.approx((184.1, 449.65, 920.5, 1173.0))
    assert second.px == pytest.approx((0.62 * 1841, 0.2 * 1955, 0.91 * 1841, 0.58 * 1955))


@pytest.mark.parametrize("answer, problem", [
    ("at [0.6, 0.5, 0.4, 0.9]", "out of range or unordered"),
    ("at [0.1, 0.2, 1.5, 0.9]", "out of range or unordered"),
    ("at [0.1, 0.2, 0.3]", "not a box"),
    ("at [0.1.2, 0.2, 0.3, 0.4]", "not numbers"),
])
def test_malformed_boxes_are_flagged_not_raised(answer, problem):
    parsed = boxes_from_answer(answer, 100, 100)
    assert parsed.boxes == []
    assert problem in parsed.malformed


def test_the_jinja_chat_template_renders_the_same_prompt():
    """What model servers and checkpoints are given renders exactly RadVLM's evaluation prompt."""
    from jinja2 import Template

    from radvlm.backends.openai_server import messages

    turns = [Turn("user", REPORT), Turn("assistant", "Findings: clear lungs."), Turn("user", "Any effusion?")]
    rendered = Template(CHAT_TEMPLATE).render(messages=messages(turns, "data:,"), add_generation_prompt=True)
    assert rendered == render(turns)

"""The paper's metrics against independent implementations, the LLM steps through a scripted
OpenAI-compatible endpoint, and ``radvlm-pacs train evaluate`` end to end."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from torchmetrics.detection import MeanAveragePrecision

from records.findings import FINDINGS
from testbed.llm_server import CONVERSATION, ScriptedLLM
from testbed.network import free_port
from tests.training.training_data import placeholder_png
from training import answers, conversations, evaluate, instructions, metrics
from training.conversations import Case
from training.instructions import Instruction
from training.llm import ChatLLM, Endpoint
from training.reports import LLMCleaner


def _box(rng: random.Random) -> tuple[float, float, float, float]:
    x, y = rng.random() * 0.7, rng.random() * 0.7
    return (x, y, x + 0.05 + rng.random() * 0.3, y + 0.05 + rng.random() * 0.3)


def test_grounding_ap_agrees_with_torchmetrics_coco_ap() -> None:
    rng = random.Random(7)
    for _ in range(150):
        truth = [_box(rng) for _ in range(rng.randint(1, 4))]
        answer = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.6:  # near a reference box, or anywhere
                x1, y1, x2, y2 = rng.choice(truth)
                answer.append(tuple(v + rng.uniform(-0.05, 0.05) for v in (x1, y1, x2, y2)))
            else:
                answer.append(_box(rng))
        coco = MeanAveragePrecision(iou_thresholds=[0.5], box_format="xyxy")
        n = len(answer)  # the answer's order is its ranking: first written, most confident
        coco.update([{"boxes": torch.tensor(answer, dtype=torch.float64),
                      "scores": torch.tensor([1 - i / (n + 1) for i in range(n)], dtype=torch.float64),
                      "labels": torch.zeros(n, dtype=torch.long)}],
                    [{"boxes": torch.tensor(truth, dtype=torch.float64),
                      "labels": torch.zeros(len(truth), dtype=torch.long)}])
        expected = float(coco.compute()["map"])
        ours = metrics.average_precision(answer, truth, interpolation="101-point")
        assert ours == pytest.approx(expected, abs=1e-6)  # torchmetrics computes in float32


def test_grounding_ap_all_point_by_hand() -> None:
    a, b = (0.1, 0.1, 0.3, 0.3), (0.6, 0.6, 0.9, 0.9)
    miss = (0.4, 0.0, 0.5, 0.05)
    # hit, miss, hit: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1/2 * 1 + 1/2 * 2/3
    assert metrics.average_precision([a, miss, b], [a, b]) == pytest.approx(0.5 + 1 / 3)
    assert metrics.average_precision([a, a], [a]) == 1.0  # the second copy cannot take the same box
    assert metrics.average_precision([], [a]) == 0.0 and metrics.average_precision([a], []) == 0.0
    assert metrics.average_precision([], []) == 1.0  # no finding, no box drawn: a true negative
    assert metrics.mean_average_precision([("At [0.1, 0.1, 0.3, 0.3].", "At [0.1, 0.1, 0.3, 0.3]."),
                                           ("At [0.6, 0.6, 0.9, 0.9].", "At [0.1, 0.1, 0.3, 0.3].")]) == 0.5


def test_label_f1_agrees_with_scikit_learn() -> None:
    rng = random.Random(3)
    names = [label.lower() for label in FINDINGS]

    def text() -> str:
        chosen = rng.sample(names, rng.randint(0, 4))
        return f"The following abnormalities are identified: {', '.join(chosen)}." if chosen else \
            "No abnormalities or lesions are detected on this Chest X-ray."

    answers, references = [text() for _ in range(300)], [text() for _ in range(300)]
    ours = metrics.label_scores(answers, references)
    truth, predicted = metrics.label_matrix(references), metrics.label_matrix(answers)
    p, r, f, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    for index, label in enumerate(FINDINGS):
        assert ours.per_label[label]["f1"] == pytest.approx(f[index])
        assert ours.per_label[label]["precision"] == pytest.approx(p[index])
        assert ours.per_label[label]["support"] == support[index]
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        assert getattr(ours, average)["f1"] == pytest.approx(f)
        assert getattr(ours, average)["recall"] == pytest.approx(r)
    # RadVLM's matching, no negation: "no pneumothorax" names pneumothorax.
    assert metrics.label_matrix(["No pneumothorax."])[0][FINDINGS.index("Pneumothorax")]


def test_rouge_l() -> None:
    assert metrics.rouge_l(["the heart is enlarged"], ["the heart is enlarged"]) == 1.0
    # LCS "the heart is" of 4 and 5 words: P 3/4, R 3/5, F 2PR/(P+R)
    assert metrics.rouge_l(["the heart is normal"], ["the heart is mildly enlarged"]) == pytest.approx(2 / 3)


def _tiny_bert(folder: Path) -> str:
    """A 2-layer BERT with random weights and a 14-word vocabulary, for BERTScore."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "the heart is enlarged normal lungs are clear there no effusion".split()
    vocab = {word: index for index, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizerFast(vocab=vocab, model_max_length=64).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return str(folder)


def test_bertscore_with_a_local_model(tmp_path: Path) -> None:
    model = _tiny_bert(tmp_path / "bert")
    same = metrics.bert_score_f1(["the heart is enlarged"], ["the heart is enlarged"], model, num_layers=2)
    other = metrics.bert_score_f1(["the lungs are clear"], ["the heart is enlarged"], model, num_layers=2)
    assert same == pytest.approx(1.0, abs=1e-5) and other < same


@pytest.fixture()
def llm() -> Iterator[ScriptedLLM]:
    scripted = ScriptedLLM()
    server = scripted.start()
    yield scripted
    server.should_exit = True


def test_report_cleaning_asks_the_llm_once_and_falls_back_to_rules(llm: ScriptedLLM, tmp_path: Path) -> None:
    cleaner = LLMCleaner(ChatLLM(Endpoint(url=llm.url, model="scripted")), tmp_path / "cache")
    text = "Heart size is normal. Effusion is larger than on the prior study. No pneumothorax."
    assert cleaner.clean("s1", text) == "Heart size is normal. No pneumothorax."
    assert cleaner.clean("s1", text) == "Heart size is normal. No pneumothorax."
    assert len(llm.prompts) == 1 and text in llm.prompts[0]  # the second answer came from the cache
    assert cleaner.clean("s2", "Unchanged since prior.") is None  # the LLM said None
    down = LLMCleaner(ChatLLM(Endpoint(url=f"http://127.0.0.1:{free_port()}/v1", model="x", max_retries=0,
                                       timeout_s=2)), tmp_path / "cache2")
    assert down.clean("s3", "Heart size is normal. Stable left effusion.") == "Heart size is normal."


def test_conversations_are_written_and_judged(llm: ScriptedLLM, tmp_path: Path) -> None:
    chat = ChatLLM(Endpoint(url=llm.url, model="scripted"))
    case = Case(id="d1", image="img.png", report="The heart is enlarged.", labels=("Cardiomegaly",), view="PA",
                sex="female", phrases=(("enlarged heart", ((0.33, 0.45, 0.78, 0.79),)),))
    [item] = conversations.generate([case], chat, tmp_path, "mimic-cxr")
    assert item.task == "grounded-conversation" and len(item.rounds) == 2
    assert item.rounds[1] == (CONVERSATION[2]["value"], CONVERSATION[3]["value"])
    assert "enlarged heart: [0.33, 0.45, 0.78, 0.79]" in llm.prompts[-1] and "Sex: female" in llm.prompts[-1]
    assert "Sex: female" in item.context
    with pytest.raises(conversations.ConversationError):
        conversations.parse_conversation('[{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]')
    assert conversations.parse_score("ok\nOverall score: 7/10") == 7.0
    assert conversations.parse_score("Overall score: 12/10") is None


def test_evaluate_command_end_to_end(llm: ScriptedLLM, tmp_path: Path) -> None:
    image = placeholder_png(tmp_path / "img.png", 100, 120)
    items = [
        Instruction(id="c1", image=str(image), rounds=(("Are there any abnormalities on this Chest X-ray?",
                                                        "The following abnormalities are identified: cardiomegaly "
                                                        "and pleural effusion."),), task="abnormalities", source="t"),
        Instruction(id="g1", image=str(image), rounds=(("Where is the cardiomegaly located in this Chest X-ray?",
                                                        "The cardiomegaly is located at the coordinates "
                                                        "[0.33, 0.45, 0.78, 0.79] on the image."),),
                    task="abnormality-grounding", source="t"),
        Instruction(id="g2", image=str(image), rounds=(("Where is the pneumothorax located in this Chest X-ray?",
                                                        "The pneumothorax is located at the coordinates "
                                                        "[0.6, 0.1, 0.9, 0.4] on the image."),),
                    task="abnormality-grounding", source="t"),
        Instruction(id="v1", image=str(image), rounds=((CONVERSATION[0]["value"], CONVERSATION[1]["value"]),),
                    task="conversation", source="t", context="Radiology report: enlarged heart"),
    ]
    data = tmp_path / "test.json"
    instructions.write(items, data)
    env = {"RADVLM_MODEL__BACKEND": "scripted", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "radvlm_pacs", "train", "evaluate", "--data", str(data),
                           "--out", str(tmp_path / "eval"), "--judge-url", llm.url, "--judge-model", "scripted"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # the scripted model names cardiomegaly and pleural effusion, and draws cardiomegaly where expected
    assert scores["abnormalities"]["micro"]["f1"] == 1.0
    assert scores["abnormality-grounding"]["map50"] == 0.5  # found the heart; no box for the pneumothorax
    assert scores["conversation"]["judge_score"] == 7.0
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(p["answers"] for p in predictions)
    judge_prompt = llm.prompts[-1]
    assert "Expected answer: The heart appears enlarged." in judge_prompt and "enlarged heart" in judge_prompt


class ExactJudge(ScriptedLLM):
    """A judge that gives 10/10 when every generated answer is the expected one, else 0/10."""

    def reply(self, prompt: str) -> str:
        expected = re.findall(r"^Expected answer: (.*)$", prompt, re.MULTILINE)
        generated = re.findall(r"^Generated answer: (.*)$", prompt, re.MULTILINE)
        return f"Overall score: {10 if expected and generated == expected else 0}/10"


def test_the_references_score_perfectly_on_every_task(tmp_path: Path) -> None:
    """Each task ``train evaluate`` scores, with the reference answers as the model's: every metric perfect,
    images without findings included (detection's "no lesion", "No abnormalities")."""
    rng = random.Random(5)
    a, b, c = (0.1, 0.2, 0.4, 0.5), (0.55, 0.3, 0.9, 0.7), (0.3, 0.1, 0.7, 0.35)
    rounds = {
        "report": [answers.report(rng, "The heart is enlarged. No effusion."),
                   answers.report(rng, "The lungs are clear.")],
        # every label named somewhere: macro F1 averages all 13 (RadVLM's definition)
        "abnormalities": [answers.abnormalities(rng, list(FINDINGS[:7])),
                          answers.abnormalities(rng, list(FINDINGS[7:])),
                          answers.abnormalities(rng, ["Pneumothorax"]), answers.abnormalities(rng, [])],
        "abnormality-grounding": [answers.location(rng, "Cardiomegaly", [a]),
                                  answers.location(rng, "Nodule/Mass", [a, b])],
        "anatomical-grounding": [answers.location(rng, "right lung", [b])],
        "phrase-grounding": [answers.phrase(rng, "small left effusion", [c, a])],
        "detection": [answers.detection(rng, {"Cardiomegaly": [a], "Pleural effusion": [b, c]}),
                      answers.detection(rng, {}), answers.detection(rng, {})],  # two images without findings
        "conversation": [(CONVERSATION[0]["value"], CONVERSATION[1]["value"])],
        "grounded-conversation": [(CONVERSATION[2]["value"], CONVERSATION[3]["value"])],
    }
    assert set(rounds) == set(instructions.TASKS)  # a new task needs its reference test
    predictions = [evaluate.Prediction(id=f"{task}{index}", task=task, source="t", questions=[question],
                                       references=[answer], answers=[answer])
                   for task, pairs in rounds.items() for index, (question, answer) in enumerate(pairs)]
    judge = ExactJudge()
    server = judge.start()
    try:
        scores = evaluate.score(predictions, evaluate.Scoring(
            bertscore_model=_tiny_bert(tmp_path / "bert"), bertscore_layers=2,
            judge=ChatLLM(Endpoint(url=judge.url, model="scripted"))))
    finally:
        server.should_exit = True

    assert set(scores) == set(instructions.TASKS)
    assert scores["report"]["rouge_l"] == 1.0 and scores["report"]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    for average in ("micro", "macro"):
        assert scores["abnormalities"][average] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert all(entry["f1"] == 1.0 for entry in scores["abnormalities"]["per_label"].values())
    for task in evaluate.GROUNDING_TASKS:
        assert scores[task]["map50"] == 1.0, task
    for task in evaluate.CONVERSATION_TASKS:
        assert scores[task]["judge_score"] == 10.0 and scores[task]["judged"] == 1, task

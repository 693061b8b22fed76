"""vlkit eval vqa: answer normalisation, exact match and VQA accuracy on hand-made cases with known numbers, both data
forms (question files, LLaVA conversations), --match, and the command on a tiny saved NeVA."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlkit.cli import main
from vlkit.data.conversation import get_template
from vlkit.eval.vqa import Answer, evaluate_vqa, normalize_answer, read_vqa_items, score_answer


@pytest.mark.parametrize(
    ("text", "want"),
    [("The Red.", "red"), ("  a  big, RED star! ", "big red star"), ("top-left", "top left"), ("an apple", "apple")],
)
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_score_single_and_several_references():
    assert score_answer("Red.", ["red"]) == (1.0, 1.0)
    assert score_answer("blue", ["red"]) == (0.0, 0.0)
    # Humans' answers, VQA's rule: min(1, matches among the other humans / 3), averaged over the humans. Two say red,
    # one blue: red scores (1/3 + 1/3 + 2/3) / 3 = 4/9, blue (0 + 1/3 + 1/3) / 3 = 2/9; four agreeing cap at 1.
    assert score_answer("the red", ["red", "Red", "blue"]) == pytest.approx((1.0, 4 / 9))
    assert score_answer("blue", ["red", "red", "blue"]) == pytest.approx((1.0, 2 / 9))
    assert score_answer("red", ["red"] * 4 + ["blue"]) == (1.0, 1.0)
    # VQAv2's ten answers: 1, 2, 3, 4 humans agreeing score 0.3, 0.6, 0.9, 1.
    for k, want in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)):
        assert score_answer("red", ["red"] * k + ["blue"] * (10 - k))[1] == pytest.approx(want)
    assert score_answer("green", ["red", "blue"]) == (0.0, 0.0)


class ScriptedAssistant:
    """Answers from a dict question -> answer, recording what it was asked (stands in for a model)."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []
        self.chat = SimpleNamespace(template=get_template("vicuna_v1"))
        self.inner = torch.nn.Linear(1, 1)

    def answer(self, conversations, images, **kwargs):
        self.asked += [(list(turns), image) for turns, image in zip(conversations, images)]
        return [Answer(self.answers[turns[-1].text.split("\n")[-1]], [1], "eos") for turns in conversations]


@pytest.fixture
def question_file(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [
        {"question_id": 1, "image": "a.png", "text": "What colour?", "answer": "Red", "category": "color"},
        {"question_id": 2, "image": "a.png", "question": "What shape?", "answers": ["circle"], "category": "shape"},
        {"question_id": 3, "image": "a.png", "text": "Count?", "answers": [{"answer": "two"}, {"answer": "two"},
                                                                            {"answer": "three"}], "category": "count"},
        {"question_id": 4, "image": "a.png", "text": "What colour is the sky?", "answer": "blue", "category": "color"},
        {"question_id": 5, "image": "missing.png", "text": "Where?", "answer": "left"},
    ]  # fmt: skip
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metrics_on_a_hand_made_case(question_file):
    answers = {"What colour?": "red.", "What shape?": "square", "Count?": "two", "What colour is the sky?": "Blue"}
    bot = ScriptedAssistant(answers)
    result = evaluate_vqa(bot, question_file, batch_size=3)
    # exact: 1, 0, 1, 1 -> 0.75; VQA: 1, 0, 4/9 (two of three humans), 1; the missing image is skipped and counted.
    assert result.metrics["exact_match"] == pytest.approx(0.75)
    assert result.metrics["vqa_accuracy"] == pytest.approx((1 + 0 + 4 / 9 + 1) / 4)
    assert result.metrics["exact_match/color"] == 1.0 and result.metrics["exact_match/shape"] == 0.0
    assert result.num_samples == 4 and result.info["skipped"] == {"image_missing": 1}
    assert result.to_json()["task"] == "vqa" and result.to_json()["metrics"]["exact_match"] == 0.75
    # The image placeholder is put in front of the question, the image path under the file's folder.
    turns, image = bot.asked[0]
    assert turns[0].text == "<image>\nWhat colour?" and image == question_file.parent / "a.png"
    assert [p["question_id"] for p in result.details["predictions"]] == ["1", "2", "3", "4"]


def test_match_filters_questions(question_file):
    bot = ScriptedAssistant({"What colour?": "red", "What colour is the sky?": "green"})
    result = evaluate_vqa(bot, question_file, match="colou?r")
    assert result.num_samples == 2 and result.metrics["exact_match"] == 0.5


def test_conversations_give_one_question_per_answer(tmp_path):
    record = {"id": "s1", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "star"}]}  # fmt: skip
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([record]))
    items = read_vqa_items(path)
    assert [it.question_id for it in items] == ["s1:0", "s1:1"]
    assert [it.answers for it in items] == [["red"], ["star"]]
    # The second question is asked after the first exchange, with its reference answer as history.
    assert [(t.role, t.text) for t in items[1].turns] == [
        ("human", "<image>\nWhat colour is the shape?"), ("gpt", "red"), ("human", "What shape is it?")]  # fmt: skip


def test_malformed_records_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question_id": 1, "text": "q?"}) + "\n" + json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"2 malformed sample\(s\)") as e:
        read_vqa_items(path)
    assert "bad.jsonl sample 0" in str(e.value) and "no question" in str(e.value)


# -- the command, on a tiny saved NeVA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_neva(tmp_path_factory):
    from vlkit.data.shapes_vqa import write_shapes_vqa
    from vlkit.interop.native import save_model
    from vlkit.models import create_model

    root = tmp_path_factory.mktemp("vqa")
    write_shapes_vqa(root / "data", train=8, val=4, progress=False)
    torch.manual_seed(0)
    model = create_model("neva-tiny", llm__tokenizer=str(root / "data" / "tokenizer"))
    save_model(model, root / "model")
    return root


def test_command_json(tiny_neva, capsys):
    data = tiny_neva / "data" / "instruct_val.json"
    code = main(["eval", "vqa", "--model", str(tiny_neva / "model"), "--data", str(data), "--max-new-tokens", "4",
                 "--json", "--answers", str(tiny_neva / "answers.jsonl")])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    n = len(read_vqa_items(data))
    assert out["task"] == "vqa" and out["vlkit"]["num_questions"] == n
    assert set(out["metrics"]) == {"exact_match", "vqa_accuracy"} and out["vlkit"]["template"] == "llama_2"
    assert len((tiny_neva / "answers.jsonl").read_text().splitlines()) == n


def test_command_usage_errors(tiny_neva, tmp_path, capsys):
    data = tiny_neva / "data" / "instruct_val.json"
    assert main(["eval", "vqa", "--model", str(tiny_neva / "model"), "--data", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    from vlkit.interop.native import save_model
    from vlkit.models import create_model

    save_model(create_model("llama-tiny"), tmp_path / "llama")
    assert main(["eval", "vqa", "--model", str(tmp_path / "llama"), "--data", str(data)]) == 2
    assert "not a NeVA" in capsys.readouterr().err

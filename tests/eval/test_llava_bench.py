"""vlkit eval llava-bench: the official VQA normalisation and accuracy, each benchmark's answer rule and scores on
small files in its public layout with hand-computed numbers, bad inputs, and the command on a tiny saved NeVA."""

import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

from vlkit.cli import main
from vlkit.eval.llava_bench import (
    first_questions,
    mmbench_letter,
    pope_metrics,
    pope_yes_no,
    read_benchmark,
    score_benchmark,
    sqa_letter,
    write_outputs,
)
from vlkit.eval.llava_bench_data import LETTER_ANSWER, SHORT_ANSWER
from vlkit.eval.results import EvalUsageError
from vlkit.eval.vqa_normalize import evalai_answer, normalize_vqa_answer, vqa_accuracy

# -- VQAv2's normalisation and accuracy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The cat.", "cat"),  # period at the end deleted, article dropped
        ("Two", "2"),  # number words to digits
        ("twenty two", "twenty 2"),  # word by word: only zero..ten
        ("none", "0"),
        ("dont", "don't"),  # contractions table
        ("don't", "don t"),  # ' is punctuation officially: not touching a space -> a space
        ("2,000", "2000"),  # digit-comma-digit: every mark deleted
        ("red, white", "red white"),  # a mark touching a space is deleted
        ("red/white", "red white"),  # else replaced by a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes!", "yes!"),  # ! is not in the official list
        ("  an\tapple \n", "apple"),
    ],
)
def test_official_normalisation(text, want):
    assert normalize_vqa_answer(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("Yes!", "yes"), ("well-known", "well known"), ("Don't", "don't"), ("dog's", "dog 's"), ("1,000.", "1000")],
)
def test_evalai_submission_processing(text, want):
    assert evalai_answer(text) == want


@pytest.mark.parametrize(("k", "want"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_annotator_subsets(k, want):
    # k of 10 humans said "2": a human who said it sees k-1 matches among the other 9, one who did not sees k;
    # k=1: (1*0 + 9*1/3)/10 = 0.3; k=2: (2/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9.
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_accuracy("Two.", answers) == pytest.approx(want)


def test_vqa_accuracy_references_normalised_only_by_punctuation():
    # Disagreeing references lose punctuation ("cat." -> "cat") but keep articles and number words, as in vqaEval.py.
    assert vqa_accuracy("the cat", ["cat."] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("two", ["two"] * 10) == 0.0  # all agree: compared as written, "two" vs the prediction "2"
    assert vqa_accuracy("Red", ["red"]) == 1.0  # one reference: exact match


# -- the answer rules --------------------------------------------------------------------------------------------------


def test_letter_and_yes_no_rules():
    assert [sqa_letter(t, 4) for t in ("B", "C. three", "The answer is D.", "E", "B.", "b", "A or B")] == [
        "B", "C", "D", None, None, None, None]  # fmt: skip
    assert [mmbench_letter(t, 3) for t in ("B", "B.", "(C)", "A) red", "A cat", "D", "The answer is C")] == [
        "B", "B", "C", "A", None, None, "C"]  # fmt: skip
    # A capital past the option letters is a failed answer, as LLaVA's get_pred_idx returns -1 (not an error).
    assert sqa_letter("The answer is K.", 4) is None and mmbench_letter("The answer is Yes", 4) is None
    assert [pope_yes_no(t) for t in ("Yes", "No", "no, there is not.", "Yes. It is not red.", "There is not one",
                                     "I see No cat")] == ["yes", "no", "no", "yes", "no", "no"]  # fmt: skip


def test_pope_metrics_on_a_confusion_matrix():
    # TP 3, FP 1, TN 4, FN 2.
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 4, 2)
    assert m["accuracy"] == pytest.approx(0.7) and m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(0.4)
    assert pope_metrics(["no"], ["no"])["precision"] == 0.0  # no yes answers: 0, not a division by zero


# -- the files, in each benchmark's public layout ----------------------------------------------------------------------


def _png(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _b64_png(colour="red"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def vqav2_files(tmp_path):
    _png(tmp_path / "COCO_val2014_000000000042.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "How many cats?", "question_id": 420},
        {"image_id": 42, "question": "What colour?", "question_id": 421},
        {"image_id": 42, "question": "Is it red?", "question_id": 422}]}  # fmt: skip

    def ann(qid, answers, qtype, atype):
        return {"question_id": qid, "image_id": 42, "question_type": qtype, "answer_type": atype,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}  # fmt: skip

    annotations = {"annotations": [
        ann(420, ["2"] * 2 + ["3"] * 8, "how many", "number"),
        ann(421, ["red"] * 3 + ["orange"] * 7, "what color is the", "other"),
        ann(422, ["yes"] * 10, "is the", "yes/no")]}  # fmt: skip
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    return tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "v2_mscoco_val2014_annotations.json"


def test_vqav2_official_files_scores(vqav2_files):
    questions, annotations = vqav2_files
    items = read_benchmark("vqav2", questions, annotations=annotations)
    assert items[0].image == "COCO_val2014_000000000042.jpg" and items[0].prompt == f"How many cats?\n{SHORT_ANSWER}"
    metrics, records = score_benchmark("vqav2", items, ["two", "Red.", "No"])
    # 0.6 (2 of 10 humans), 0.9 (3 of 10), 0 -> mean 0.5; one question per type.
    assert metrics["vqa_accuracy"] == pytest.approx(0.5)
    assert metrics["vqa_accuracy/answer_type/number"] == pytest.approx(0.6)
    assert metrics["vqa_accuracy/answer_type/other"] == pytest.approx(0.9)
    assert metrics["vqa_accuracy/question_type/is the"] == 0.0
    assert [r["accuracy"] for r in records] == pytest.approx([0.6, 0.9, 0.0])
    # Scored as submitted (EvalAI's processing first), so the local number is the server's for the same answers:
    # "yes!" is submitted as "yes" (1.0 against 10 x "yes"), "t-shirt" as "t shirt" (0 against 10 x "t-shirt").
    items[2].answers = ["yes"] * 10
    assert score_benchmark("vqav2", items[2:], ["yes!"])[1][0]["accuracy"] == 1.0
    items[2].answers = ["t-shirt"] * 10
    record = score_benchmark("vqav2", items[2:], ["t-shirt"])[1][0]
    assert record["submitted"] == "t shirt" and record["accuracy"] == 0.0


def test_vqav2_test_dev_images_and_the_whole_test_submission(tmp_path):
    # The official test-dev question file says data_subtype test-dev2015; its images are test2015's.
    questions = {"data_subtype": "test-dev2015", "questions": [{"image_id": 7, "question": "Why?", "question_id": 70}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    items = read_benchmark("vqav2", tmp_path / "q.json")
    assert items[0].image == "COCO_test2015_000000000007.jpg"
    # The server takes only a submission of all test2015 questions: those not asked get "".
    out = tmp_path / "out"
    write_outputs("vqav2", items, ["Yes!"], [], out, tmp_path / "q.json", submission_ids=[69, 70, 71])
    sub = json.loads((out / "vqav2_submission.json").read_text())
    assert sub == [{"question_id": 69, "answer": ""}, {"question_id": 70, "answer": "yes"},
                   {"question_id": 71, "answer": ""}]  # fmt: skip


def test_llava_question_files_keep_their_instruction(tmp_path):
    path = _jsonl(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 7, "image": "COCO_test2015_000000000007.jpg", "text": f"Why?\n{SHORT_ANSWER}",
         "category": "default"}])  # fmt: skip
    (item,) = read_benchmark("vqav2", path)
    assert item.prompt == f"Why?\n{SHORT_ANSWER}" and item.answers is None
    assert score_benchmark("vqav2", [item], ["x"])[0] == {}  # test-dev: no references, no scores


def test_gqa_scores(tmp_path):
    questions = {
        "q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "fullAnswer": "Yes, it is.",
               "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "q2": {"imageId": "n1", "question": "What is it?", "answer": "cat",
               "types": {"structural": "query", "semantic": "cat", "detailed": "categoryQuery"}},
        "q3": {"imageId": "n2", "question": "Which side?", "answer": "left",
               "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    }  # fmt: skip
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    items = read_benchmark("gqa", path)
    assert items[0].image == "n1.jpg"
    metrics, records = score_benchmark("gqa", items, ["Yes.", "a cat", "Left"])
    # "yes" == "yes"; "a cat" != "cat" (GQA does not drop articles); "left" == "left" -> 2/3.
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy/structural/query"] == 0.5 and metrics["accuracy/structural/verify"] == 1.0
    assert records[1]["prediction"] == "a cat"
    # LLaVA's question file with the official file as annotations.
    llava = _jsonl(
        tmp_path / "llava_gqa_testdev_balanced.jsonl",
        [{"question_id": "q3", "image": "n2.jpg", "text": f"Which side?\n{SHORT_ANSWER}", "category": "default"}],
    )
    (item,) = read_benchmark("gqa", llava, annotations=path)
    assert item.answers == ["left"] and item.meta["semantic"] == "rel"


@pytest.fixture
def sqa_dir(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["frog", "cat", "fish"], "answer": 1, "hint": "",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "2": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "Look at the picture.",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "3": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
              "image": None, "subject": "language science", "split": "test"},
        "4": {"question": "Train?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "subject": "social science", "split": "train"},
        "5": {"question": "Which country?", "choices": ["France", "Peru", "Chad", "Laos"], "answer": 3, "hint": "",
              "image": "image.png", "subject": "social science", "split": "test"},
    }  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["4"], "test": ["1", "2", "3", "5"]}))
    for pid in ("1", "2", "5"):
        _png(tmp_path / "images" / "test" / pid / "image.png")
    return tmp_path


def test_scienceqa_img_scores(sqa_dir):
    items = read_benchmark("sqa", sqa_dir)
    assert [it.question_id for it in items] == ["1", "2", "5"]  # test split, image problems only
    assert items[0].prompt == f"Which is a mammal?\nA. frog\nB. cat\nC. fish\n{LETTER_ANSWER}"
    assert items[1].prompt.startswith("Context: Look at the picture.\nWhich is hot?\nA. ice\nB. fire\n")
    assert items[0].image == "1/image.png" and [it.answers for it in items] == [["B"], ["B"], ["D"]]
    metrics, records = score_benchmark("sqa", items, ["B", "The answer is A.", "the fourth"])
    # right, wrong, failed -> 1/3; natural science 1/2, social science 0.
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["failed"] == pytest.approx(1 / 3)
    assert metrics["accuracy/subject/natural science"] == 0.5
    assert [r["parsed"] for r in records] == ["B", "A", "FAILED"]


def test_scienceqa_llava_file(tmp_path):
    rows = [
        {"id": "1", "image": "1/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich is a mammal?\nA. frog\nB. cat"},
            {"from": "gpt", "value": "B"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Noun?\nA. run\nB. dog"},
                                      {"from": "gpt", "value": "B"}]},
    ]  # fmt: skip
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(rows))
    (item,) = read_benchmark("sqa", path)
    assert item.prompt == f"Which is a mammal?\nA. frog\nB. cat\n{LETTER_ANSWER}" and item.answers == ["B"]
    # The number of choices comes from the prompt's option lines: "C" on a two-choice question failed.
    assert item.meta["num_choices"] == 2
    assert score_benchmark("sqa", [item], ["C"])[1][0]["parsed"] == "FAILED"


def _mmbench_tsv(path, rows):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        for r in rows:
            writer.writerow({"hint": "nan", "C": "nan", "D": "nan", "image": _b64_png(), "source": "s",
                             "comment": "nan", "split": "dev", **r})  # fmt: skip
    return path


def _rotations(index, options, answer, category):
    rows = []
    for k in range(len(options)):
        rotated = options[k:] + options[:k]
        row = {
            "index": index + k * 1_000_000,
            "question": "Which colour?",
            "answer": "ABCD"[(("ABCD".index(answer)) - k) % len(options)],
            "category": category,
            "l2-category": "perception",
        }
        rows.append({**row, **dict(zip("ABCD", rotated))})  # fmt: skip
    return rows


def test_mmbench_circular_evaluation(tmp_path):
    # Question 0: 4 options, answer B (= "blue"); question 1: 2 options, answer A.
    rows = _rotations(0, ["red", "blue", "green", "pink"], "B", "colour") + _rotations(1, ["yes", "no"], "A", "count")
    path = _mmbench_tsv(tmp_path / "mmbench_dev.tsv", rows)
    items = read_benchmark("mmbench", path)
    assert [it.question_id for it in items] == [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001]
    assert items[1].prompt == f"Which colour?\nA. blue\nB. green\nC. pink\nD. red\n{LETTER_ANSWER}"
    assert [it.answers[0] for it in items] == ["B", "A", "D", "C", "A", "B"]
    # Question 0 right in 3 of its 4 rotations -> 0; question 1 right in both -> 1.
    metrics, _ = score_benchmark("mmbench", items, ["B", "A.", "D", "A", "A", "(B)"])
    assert metrics["circular_accuracy"] == 0.5 and metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["circular_accuracy/category/colour"] == 0.0
    assert metrics["circular_accuracy/category/count"] == 1.0
    # Without circular copies, --circular makes them (index + k*1e6, answer letter moved with its option).
    single = _mmbench_tsv(tmp_path / "single.tsv", [rows[0]])
    made = read_benchmark("mmbench", single, circular=True)
    assert [(it.question_id, it.answers[0]) for it in made] == [(it.question_id, it.answers[0]) for it in items[:4]]
    assert [it.prompt for it in made] == [it.prompt for it in items[:4]]
    mixed = read_benchmark("mmbench", _mmbench_tsv(tmp_path / "mixed.tsv", rows[4:] + [rows[0]]), circular=True)
    assert [it.question_id for it in mixed] == [1, 1_000_001, 0, 1_000_000, 2_000_000, 3_000_000]


def test_mmbench_options_pandas_reads_as_missing_end_the_list(tmp_path):
    # LLaVA reads the TSV with pandas: "N/A", "NA", "NULL" ... are NaN there, so the options stop before them.
    rows = [
        {"index": 0, "question": "Which?", "A": "cat", "B": "dog", "C": "N/A", "answer": "A", "category": "c"},
        {"index": 1, "question": "Which?", "A": "none", "B": "dog", "C": "NULL", "answer": "A", "category": "c"},
    ]
    items = read_benchmark("mmbench", _mmbench_tsv(tmp_path / "na.tsv", rows), circular=True)
    assert [it.meta["options"] for it in items if it.question_id < 1_000_000] == [["cat", "dog"], ["none", "dog"]]
    assert len(items) == 4  # two rotations each


def test_mmbench_circular_copies_stay_out_of_the_submission_and_whole_in_max_samples(tmp_path):
    rows = [{"index": i, "question": "Which?", "A": "cat", "B": "dog", "C": "bird", "answer": "A", "category": "c"}
            for i in range(3)]  # fmt: skip
    path = _mmbench_tsv(tmp_path / "mm.tsv", rows)
    items = read_benchmark("mmbench", path, circular=True)
    assert len(items) == 9
    kept = first_questions(items, 2, "mmbench")
    assert sorted(it.question_id for it in kept) == [0, 1, 1_000_000, 1_000_001, 2_000_000, 2_000_001]
    write_outputs("mmbench", items, ["A"] * 9, [], tmp_path / "out", path)
    with (tmp_path / "out" / "mmbench_submission.csv").open(newline="") as f:
        assert [r["index"] for r in csv.DictReader(f)] == ["0", "1", "2"]  # only the TSV's own rows


def test_pope_per_split(tmp_path):
    for split, labels in (("adversarial", ["yes", "no"]), ("random", ["yes", "yes"])):
        _jsonl(tmp_path / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?",
             "label": label} for i, label in enumerate(labels)])  # fmt: skip
    items = read_benchmark("pope", tmp_path)
    assert [it.meta["split"] for it in items] == ["adversarial", "adversarial", "random", "random"]
    metrics, _ = score_benchmark("pope", items, ["Yes, there is.", "Yes", "No.", "There is a cat."])
    # adversarial: TP 1, FP 1 -> acc .5, P .5, R 1, F1 2/3; random: TP 1, FN 1 -> acc .5, P 1, R .5, F1 2/3.
    assert metrics["adversarial/precision"] == 0.5 and metrics["adversarial/recall"] == 1.0
    assert metrics["random/precision"] == 1.0 and metrics["random/yes_ratio"] == 0.5
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["accuracy"] == 0.5
    # LLaVA's llava_pope_test.jsonl: labels from the folder, in order per category.
    llava = _jsonl(
        tmp_path.parent / "llava_pope_test.jsonl",
        [{"question_id": 10 + i, "image": "x.jpg", "text": "Is there a cat?", "category": "random"} for i in range(2)],
    )
    assert [it.answers for it in read_benchmark("pope", llava, annotations=tmp_path)] == [["yes"], ["yes"]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vqav2", {"questions": [{"question_id": 1}]}, "not in the expected layout"),
        ("gqa", [{"question": "q"}], "not in the expected layout"),
        ("sqa", {"1": {"question": "q"}}, "pid_splits.json: no such file"),
        ("pope", "not json", "not valid JSON"),
    ],
)
def test_wrong_layouts_are_named(tmp_path, name, content, message):
    path = tmp_path / "data.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(EvalUsageError, match=message) as e:
        read_benchmark(name, path)
    assert str(tmp_path) in str(e.value)


def test_mmbench_without_columns(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\n0\tq\n")
    with pytest.raises(EvalUsageError, match=r"bad.tsv: .*missing column\(s\) A, B, image"):
        read_benchmark("mmbench", path)


# -- the command, on a tiny saved NeVA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_neva(tmp_path_factory):
    from vlkit.data.shapes_vqa import write_shapes_vqa
    from vlkit.interop.native import save_model
    from vlkit.models import create_model

    root = tmp_path_factory.mktemp("bench")
    write_shapes_vqa(root / "data", train=2, val=1, progress=False)
    torch.manual_seed(0)
    save_model(create_model("neva-tiny", llm__tokenizer=str(root / "data" / "tokenizer")), root / "model")
    return root / "model"


def _run(tiny_neva, name, data, out, *extra):
    return main(["eval", "llava-bench", name, "--model", str(tiny_neva), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "2", "--json", *extra])  # fmt: skip


def test_command_vqav2_and_gqa(tiny_neva, vqav2_files, tmp_path, capsys):
    questions, annotations = vqav2_files
    assert _run(tiny_neva, "vqav2", questions, tmp_path / "v", "--annotations", str(annotations)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "vqav2" and out["vlkit"]["num_scored"] == 3 and "vqa_accuracy" in out["metrics"]
    sub = json.loads((tmp_path / "v" / "vqav2_submission.json").read_text())
    assert [set(s) for s in sub] == [{"question_id", "answer"}] * 3 and sub[0]["question_id"] == 420
    assert len((tmp_path / "v" / "answers.jsonl").read_text().splitlines()) == 3

    _png(tmp_path / "g" / "n1.jpg")
    gqa = tmp_path / "g" / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"q1": {"imageId": "n1", "question": "Red?", "answer": "yes"}}))
    assert _run(tiny_neva, "gqa", gqa, tmp_path / "g" / "out") == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)["metrics"]
    preds = json.loads((tmp_path / "g" / "out" / "testdev_balanced_predictions.json").read_text())
    assert [set(p) for p in preds] == [{"questionId", "prediction"}] and preds[0]["questionId"] == "q1"


def test_command_sqa_mmbench_pope(tiny_neva, sqa_dir, tmp_path, capsys):
    assert _run(tiny_neva, "sqa", sqa_dir, tmp_path / "s") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vlkit"]["num_questions"] == 3 and "accuracy" in out["metrics"]
    assert set(json.loads((tmp_path / "s" / "sqa_results.json").read_text())) == {
        "acc", "correct", "count", "results", "outputs"}  # fmt: skip

    tsv = _mmbench_tsv(tmp_path / "mm.tsv", _rotations(0, ["yes", "no"], "A", "count"))
    assert _run(tiny_neva, "mmbench", tsv, tmp_path / "m") == 0
    assert "circular_accuracy" in json.loads(capsys.readouterr().out)["metrics"]
    with (tmp_path / "m" / "mmbench_submission.csv").open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [r[0] for r in table[1:]] == ["0", "1000000"]

    pope = tmp_path / "pope"
    pope.mkdir()
    _png(pope / "COCO_val2014_000000000001.jpg")
    _jsonl(pope / "coco_pope_random.json", [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
                                             "text": "Is there a cat in the image?", "label": "no"}])  # fmt: skip
    assert _run(tiny_neva, "pope", pope, tmp_path / "p") == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert {"random/accuracy", "random/f1", "random/yes_ratio", "f1"} <= set(metrics)


def test_command_bad_inputs_exit_2(tmp_path, capsys):
    # Checked before the model is loaded: the model path need not even exist.
    model = str(tmp_path / "no-model")
    assert main(["eval", "llava-bench", "pope", "--model", model, "--data", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps({"questions": "nope"}))
    assert main(["eval", "llava-bench", "vqav2", "--model", model, "--data", str(bad)]) == 2
    assert "questions.json: not in the expected layout" in capsys.readouterr().err
    pope = tmp_path / "pope"
    pope.mkdir()
    _jsonl(pope / "coco_pope_random.json", [{"question_id": 1, "image": "x.jpg", "text": "Cat?", "label": "no"}])
    assert main(["eval", "llava-bench", "pope", "--model", model, "--data", str(pope), "--out", str(tmp_path),
                 "--submission-questions", str(pope / "coco_pope_random.json")]) == 2  # fmt: skip
    assert "--submission-questions is for vqav2" in capsys.readouterr().err

"""The public file layouts of LLaVA-1.5's benchmarks, read into :class:`BenchItem` lists (see docs/neva.md).

Each reader takes the benchmark's own files and LLaVA's converted question files, and raises
:class:`~vlkit.eval.results.EvalUsageError` naming the file when a file is missing or not in the layout.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.eval.results import EvalUsageError

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"
MMBENCH_CIRCULAR = 1_000_000  # MMBench's circular copies of question i have index i + k * 1e6
POPE_SPLITS = ("adversarial", "popular", "random")
# test-dev is a subset of test2015's questions and its images are test2015's (COCO_test2015_*.jpg)
VQA_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}
# What pandas' read_table (LLaVA's MMBench reader) reads as NaN: an option spelled so ends the option list.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})  # fmt: skip


_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text: str, num_choices: int) -> str | None:
    """The chosen letter as LLaVA's ``eval_science_qa.py`` reads it: the answer is a letter, or starts with
    ``"X. "``, or holds exactly one ``"The answer is X."``; None (failed) otherwise or for a letter past the
    choices."""
    options = LETTERS[:5]  # eval_science_qa.py's A-E
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in LETTERS[:num_choices] else None


_LEADING_LETTER = re.compile(r"^\(?([A-J])(?:[.):]|$)")


def mmbench_letter(text: str, num_options: int) -> str | None:
    """The chosen letter of an MMBench answer: a leading option letter (``"B"``, ``"B."``, ``"(B)"``, ``"B) ..."``;
    not ``"A cat"``), else exactly one ``"The answer is X"``; None otherwise. (MMBench's own evaluator asks an LLM
    when its matching fails; vlkit does not.)"""
    text = text.strip()
    m = _LEADING_LETTER.match(text)
    letter = m.group(1) if m else None
    if letter is None:
        found = _THE_ANSWER_IS.findall(text + ".")
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in LETTERS[:num_options] else None


@dataclass
class BenchItem:
    """One question of a benchmark.

    Attributes:
        question_id: the benchmark's id (its own type: int for VQAv2 / MMBench, str for GQA / ScienceQA).
        prompt: the text asked, with the benchmark's instruction (the image placeholder is added when asked).
        image: a path relative to the image folder, an MMBench base64 string (``meta["base64"]``), or None.
        answers: the references (VQAv2's 10 humans; one for the others; a letter for multiple choice), or None.
        meta: what the scores group by and the submission needs (question/answer type, category, split, options).
    """

    question_id: Any
    prompt: str
    image: str | None
    answers: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _with_instruction(text: str, instruction: str) -> str:
    # LLaVA's converted question files already carry the instruction; the official files do not.
    text = text.replace("<image>", "").strip()
    return text if instruction in text else f"{text}\n{instruction}"


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise EvalUsageError(f"{path}: no such file ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        # One object per line (POPE's coco_pope_*.json, LLaVA's .jsonl).
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            return [json.loads(ln) for ln in lines]
        except json.JSONDecodeError:
            raise EvalUsageError(f"{path}: not valid JSON or JSON lines ({e.msg}, line {e.lineno})") from None


def _layout_error(path: Path, expected: str) -> EvalUsageError:
    return EvalUsageError(f"{path}: not in the expected layout ({expected})")


def _records(data: Any, path: Path, keys: tuple[str, ...], expected: str) -> list[dict]:
    if isinstance(data, dict):
        data = [data]
    if (
        not isinstance(data, list)
        or not data
        or not all(isinstance(r, dict) and all(k in r for k in keys) for r in data)
    ):
        raise _layout_error(path, expected)
    return data


# --------------------------------------------------------------------------------------------------------- VQAv2


def read_vqav2(path: str | os.PathLike, annotations: str | os.PathLike | None = None) -> list[BenchItem]:
    """VQAv2 questions: the official ``v2_OpenEnded_mscoco_<split>_questions.json`` (``{"data_subtype", "questions":
    [{"question_id", "image_id", "question"}]}``, images ``COCO_<subtype>_<image_id:012d>.jpg``) or LLaVA's
    ``llava_vqav2_mscoco_*.jsonl`` (``{"question_id", "image", "text"}``); with ``annotations``
    (``v2_mscoco_<split>_annotations.json``) each question gets its 10 answers, question type and answer type."""
    path = Path(path)
    data = _load_json(path, "VQAv2 questions")
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        subtype = str(data.get("data_subtype", ""))
        subtype = VQA_IMAGE_SUBTYPE.get(subtype, subtype)
        rows = _records(data["questions"], path, ("question_id", "image_id", "question"), "VQAv2 questions")
        items = [BenchItem(int(r["question_id"]), _with_instruction(r["question"], SHORT_ANSWER),
                           f"COCO_{subtype}_{int(r['image_id']):012d}.jpg") for r in rows]  # fmt: skip
    else:
        expected = 'the official {"questions": [...]} or LLaVA\'s JSONL {"question_id", "image", "text"}'
        rows = _records(data, path, ("question_id", "image", "text"), expected)
        items = [BenchItem(r["question_id"], _with_instruction(r["text"], SHORT_ANSWER), r["image"]) for r in rows]
    if annotations is not None:
        ann_path = Path(annotations)
        ann = _load_json(ann_path, "VQAv2 annotations")
        if not (isinstance(ann, dict) and isinstance(ann.get("annotations"), list)):
            raise _layout_error(ann_path, 'VQAv2 annotations {"annotations": [{"question_id", "answers", ...}]}')
        rows = _records(ann["annotations"], ann_path, ("question_id", "answers"), "VQAv2 annotations")
        by_id = {int(r["question_id"]): r for r in rows}
        missing = [it.question_id for it in items if int(it.question_id) not in by_id]
        if missing:
            raise EvalUsageError(f"{ann_path}: no annotation for {len(missing)} question(s), e.g. {missing[0]}")
        for it in items:
            a = by_id[int(it.question_id)]
            it.answers = [x["answer"] if isinstance(x, dict) else str(x) for x in a["answers"]]
            it.meta.update(question_type=a.get("question_type"), answer_type=a.get("answer_type"))
    return items


# ----------------------------------------------------------------------------------------------------------- GQA


def _gqa_from_questions(data: dict, path: Path) -> list[BenchItem]:
    items = []
    for qid, q in data.items():
        if not (isinstance(q, dict) and "imageId" in q and "question" in q):
            raise _layout_error(path, 'GQA questions {qid: {"imageId", "question", "answer", ...}}')
        types = q.get("types") or {}
        items.append(BenchItem(str(qid), _with_instruction(q["question"], SHORT_ANSWER), f"{q['imageId']}.jpg",
                               [q["answer"]] if "answer" in q else None,
                               {"structural": types.get("structural"), "semantic": types.get("semantic")}))  # fmt: skip
    return items


def read_gqa(path: str | os.PathLike, annotations: str | os.PathLike | None = None) -> list[BenchItem]:
    """GQA questions: the official ``testdev_balanced_questions.json`` (``{qid: {"imageId", "question", "answer",
    "types"}}``, images ``<imageId>.jpg``) or LLaVA's ``llava_gqa_testdev_balanced.jsonl``; ``annotations`` (the
    official questions file) supplies the answers to LLaVA's file."""
    path = Path(path)
    data = _load_json(path, "GQA questions")
    if isinstance(data, dict) and not {"question_id", "text"} <= set(data):
        items = _gqa_from_questions(data, path)
    else:
        expected = 'the official {qid: {"imageId", "question", "answer"}} or LLaVA\'s JSONL {"question_id", "image", ' \
                   '"text"}'  # fmt: skip
        rows = _records(data, path, ("question_id", "image", "text"), expected)
        items = [BenchItem(str(r["question_id"]), _with_instruction(r["text"], SHORT_ANSWER), r["image"]) for r in rows]
    if annotations is not None:
        ann_path = Path(annotations)
        ann = _load_json(ann_path, "GQA questions with answers")
        if not isinstance(ann, dict):
            raise _layout_error(ann_path, 'GQA questions {qid: {"imageId", "question", "answer", ...}}')
        by_id = {it.question_id: it for it in _gqa_from_questions(ann, ann_path)}
        for it in items:
            if it.question_id not in by_id:
                raise EvalUsageError(f"{ann_path}: no question {it.question_id}")
            it.answers, it.meta = by_id[it.question_id].answers, by_id[it.question_id].meta
    return items


# --------------------------------------------------------------------------------------------------- ScienceQA


def sqa_prompt(question: str, choices: list[str], hint: str = "") -> str:
    """LLaVA-1.5's ScienceQA prompt: the context (hint) when there is one, the question, one ``"A. choice"`` line
    per option, then the instruction to answer with the letter."""
    lines = ([f"Context: {hint}"] if hint else []) + [question]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + [LETTER_ANSWER])


_OPTION_LINE = re.compile(r"^[A-J]\. ", re.M)  # "A. choice" lines of a multiple-choice prompt


def read_scienceqa(path: str | os.PathLike, split: str = "test") -> list[BenchItem]:
    """ScienceQA-IMG: the problems of ``split`` that have an image, from ScienceQA's ``problems.json`` +
    ``pid_splits.json`` (``path`` is their folder or ``problems.json``; images ``<pid>/image.png`` under
    ``images/<split>``), or LLaVA's ``llava_test_CQM-A.json`` (conversations; the reference letter from the gpt
    turn)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    problems_file = path / "problems.json" if path.is_dir() else path
    data = _load_json(problems_file, "ScienceQA problems.json or LLaVA's llava_test_CQM-A.json")
    if isinstance(data, list):  # LLaVA's conversation file
        rows = _records(data, problems_file, ("id", "conversations"), 'LLaVA\'s [{"id", "conversations", "image"}]')
        items = []
        for r in rows:
            turns = r["conversations"]
            if "image" not in r:
                continue  # IMG: image problems only
            if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2])):
                raise _layout_error(problems_file, f"record {r['id']}: a human and a gpt turn")
            question = str(turns[0].get("value", ""))
            num_choices = len(_OPTION_LINE.findall(question)) or len(LETTERS)
            letter = sqa_letter(str(turns[1].get("value", "")).strip(), num_choices)
            meta = {"subject": r.get("subject"), "num_choices": num_choices}
            items.append(BenchItem(str(r["id"]), _with_instruction(turns[0].get("value", ""), LETTER_ANSWER),
                                   r["image"], None if letter is None else [letter], meta))  # fmt: skip
        return items
    splits = _load_json(folder / "pid_splits.json", "ScienceQA pid_splits.json")
    if not isinstance(data, dict) or not isinstance(splits, dict):
        raise _layout_error(problems_file, '{pid: {"question", "choices", "answer", "image", ...}}')
    if split not in splits:
        raise EvalUsageError(f"{folder / 'pid_splits.json'}: no split {split!r} (has {', '.join(sorted(splits))})")
    items = []
    for pid in splits[split]:
        p = data.get(str(pid))
        if not isinstance(p, dict) or not {"question", "choices", "answer"} <= set(p):
            raise _layout_error(problems_file, f'problem {pid}: {{"question", "choices", "answer", "image"}}')
        if not p.get("image"):
            continue
        prompt = sqa_prompt(p["question"], list(p["choices"]), (p.get("hint") or "").strip())
        items.append(BenchItem(str(pid), prompt, f"{pid}/{p['image']}", [LETTERS[int(p["answer"])]],
                               {"subject": p.get("subject"), "num_choices": len(p["choices"])}))  # fmt: skip
    return items


# ------------------------------------------------------------------------------------------------------ MMBench


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in PANDAS_NA


def mmbench_prompt(question: str, options: list[str], hint: str | None = None) -> str:
    """LLaVA-1.5's MMBench prompt: hint, question, one ``"A. option"`` line per option, the letter instruction."""
    lines = ([] if _is_none(hint) else [str(hint)]) + [question]
    return "\n".join(lines + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [LETTER_ANSWER])


def read_mmbench(path: str | os.PathLike, *, circular: bool = False) -> list[BenchItem]:
    """MMBench's TSV (``index, question, hint, A..D, answer, category, l2-category, image`` with base64 images).

    The TSV holds the circular copies of a question (its options rotated) at ``index + k * 1e6``; with ``circular``
    a question without copies gets them here (rotation k moves option k to A, as LLaVA's ``--all-rounds``).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalUsageError(f"{path}: no such file (MMBench TSV)")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in ("index", "question", "A", "B", "image") if c not in columns]
        if missing:
            raise _layout_error(path, f"an MMBench TSV; missing column(s) {', '.join(missing)}")
        rows = list(reader)
    items = []
    for row in rows:
        try:
            index = int(float(row["index"]))
        except ValueError:
            raise EvalUsageError(f"{path}: index {row['index']!r} is not a number") from None
        options = []
        for letter in "ABCD":
            if _is_none(row.get(letter)):
                break
            options.append(row[letter])
        answer = row.get("answer")
        meta = {"index": index, "options": options, "hint": row.get("hint"), "question": row["question"],
                "category": row.get("category"), "l2-category": row.get("l2-category"), "row": row}  # fmt: skip
        items.append(BenchItem(index, mmbench_prompt(row["question"], options, row.get("hint")), row["image"],
                               None if _is_none(answer) else [answer.strip()], meta))  # fmt: skip
    if circular:
        sizes = Counter(it.question_id % MMBENCH_CIRCULAR for it in items)
        items = [r for it in items for r in ([it] if sizes[it.question_id % MMBENCH_CIRCULAR] > 1 else _rotations(it))]
    return items


def _rotations(item: BenchItem) -> list[BenchItem]:
    options = item.meta["options"]
    out = [item]
    for k in range(1, len(options)):
        rotated = options[k:] + options[:k]
        answers = None
        if item.answers:
            answers = [LETTERS[(LETTERS.index(item.answers[0]) - k) % len(options)]]
        meta = {**item.meta, "index": item.question_id + k * MMBENCH_CIRCULAR, "options": rotated, "generated": True,
                "row": {**item.meta["row"], **dict(zip("ABCD", rotated)), "answer": (answers or [""])[0]}}  # fmt: skip
        meta["row"]["index"] = str(meta["index"])
        prompt = mmbench_prompt(item.meta["question"], rotated, item.meta["hint"])
        out.append(BenchItem(meta["index"], prompt, item.image, answers, meta))
    return out


def decode_base64_image(text: str, where: str) -> Any:
    """An MMBench image cell -> RGB PIL image."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")
    except Exception as e:  # noqa: BLE001 -- binascii, PIL: all mean the cell is not an image
        raise EvalUsageError(f"{where}: the image is not a base64-encoded picture ({e})") from None


# --------------------------------------------------------------------------------------------------------- POPE


def _pope_file(path: Path, split: str) -> list[BenchItem]:
    rows = _records(_load_json(path, "POPE questions"), path, ("question_id", "image", "text"),
                    'POPE JSON lines {"question_id", "image", "text", "label"}')  # fmt: skip
    return [BenchItem(r["question_id"], _with_instruction(r["text"], SHORT_ANSWER), r["image"],
                      [r["label"]] if "label" in r else None, {"split": split}) for r in rows]  # fmt: skip


def _pope_split(path: Path) -> str:
    name = path.stem
    return name[len("coco_pope_") :] if name.startswith("coco_pope_") else name


def read_pope(path: str | os.PathLike, annotations: str | os.PathLike | None = None) -> list[BenchItem]:
    """POPE: a folder of ``coco_pope_{adversarial,popular,random}.json`` (JSON lines ``{"question_id", "image",
    "text", "label"}``; the split from the file name), one such file, or LLaVA's ``llava_pope_test.jsonl`` (a
    ``category`` per question) with ``annotations`` = the folder of label files (matched in order per split, as
    LLaVA's eval_pope.py does)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("coco_pope_*.json"))
        if not files:
            raise EvalUsageError(f"{path}: no coco_pope_*.json files in this folder")
        return [it for f in files for it in _pope_file(f, _pope_split(f))]
    if annotations is None and path.name.startswith("coco_pope_"):
        return _pope_file(path, _pope_split(path))
    data = _load_json(path, "POPE questions")
    rows = _records(data, path, ("question_id", "image", "text"), 'JSON lines {"question_id", "image", "text", '
                    '"category" | "label"}')  # fmt: skip
    items = [BenchItem(r["question_id"], _with_instruction(r["text"], SHORT_ANSWER), r["image"],
                       [r["label"]] if "label" in r else None, {"split": str(r.get("category", "default"))})
             for r in rows]  # fmt: skip
    if annotations is not None:
        per_split: dict[str, list[str | None]] = {}
        for it in read_pope(annotations):
            per_split.setdefault(it.meta["split"], []).append(it.answers[0] if it.answers else None)
        seen: dict[str, int] = {}
        for it in items:
            split = it.meta["split"]
            i = seen.get(split, 0)
            if i >= len(per_split.get(split, [])):
                raise EvalUsageError(f"{annotations}: no label for question {it.question_id} (split {split})")
            label = per_split[split][i]
            it.answers, seen[split] = (None if label is None else [label]), i + 1
    return items

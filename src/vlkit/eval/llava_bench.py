"""LLaVA-1.5's benchmarks with a NeVA model: ``vlkit eval llava-bench vqav2|gqa|sqa|mmbench|pope --model PATH
--data FILE``.

Each benchmark is read from its public file layout (:mod:`vlkit.eval.llava_bench_data`), asked with the prompt LLaVA-1.5
uses (greedy, batched, in the model's conversation template), scored by the benchmark's own rule, and its
submission file is written:

* ``vqav2``: VQA accuracy over the 10 humans' answers after the official normalisation
  (:mod:`vlkit.eval.vqa_normalize`), per question type and answer type; the test-dev submission JSON
  ``[{"question_id", "answer"}]``;
* ``gqa``: exact match of the answer (trailing periods dropped, lowercased, as LLaVA converts it), per structural and
  semantic type; GQA's ``<tier>_predictions.json`` ``[{"questionId", "prediction"}]``;
* ``sqa``: ScienceQA-IMG multiple choice, the letter read as LLaVA's ``eval_science_qa.py`` reads it; per subject;
* ``mmbench``: the letter of the answer, circular accuracy (a question counts only when every rotation of its options
  is answered right) and per-row accuracy, per category and l2-category; the submission table as CSV;
* ``pope``: yes/no as LLaVA's ``eval_pope.py`` reads it; accuracy, precision, recall, F1 and yes-ratio per split
  (adversarial, popular, random) and their means.

Files without reference answers (VQAv2 test-dev, MMBench test) give the submission files and no scores.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlkit.eval.llava_bench_data import (
    LETTERS,
    MMBENCH_CIRCULAR,
    BenchItem,
    decode_base64_image,
    mmbench_letter,
    read_gqa,
    read_mmbench,
    read_pope,
    read_scienceqa,
    read_vqav2,
    sqa_letter,
)
from vlkit.eval.results import EvalResult, EvalUsageError
from vlkit.eval.vqa_normalize import evalai_answer, vqa_accuracy

BENCHMARKS = {
    "vqav2": "VQAv2: 10-annotator VQA accuracy after the official normalisation; test-dev submission JSON",
    "gqa": "GQA: exact match; GQA's predictions JSON",
    "sqa": "ScienceQA-IMG: multiple-choice accuracy (the answer's letter)",
    "mmbench": "MMBench: circular accuracy over option rotations, per category; submission CSV",
    "pope": "POPE: yes/no accuracy, precision, recall, F1, yes-ratio per split",
}


def read_benchmark(
    name: str,
    data: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    split: str = "test",
    circular: bool = False,
) -> list[BenchItem]:
    """The questions of benchmark ``name`` from ``data`` (see each reader in :mod:`vlkit.eval.llava_bench_data`)."""
    if name == "vqav2":
        items = read_vqav2(data, annotations)
    elif name == "gqa":
        items = read_gqa(data, annotations)
    elif name == "sqa":
        items = read_scienceqa(data, split)
    elif name == "mmbench":
        items = read_mmbench(data, circular=circular)
    elif name == "pope":
        items = read_pope(data, annotations)
    else:
        raise EvalUsageError(f"unknown benchmark {name!r} (one of {', '.join(BENCHMARKS)})")
    if not items:
        raise EvalUsageError(f"{data}: no questions")
    return items


# ------------------------------------------------------------------------------------------------- answer rules


def pope_yes_no(text: str) -> str:
    """LLaVA's ``eval_pope.py`` rule: in the first sentence (commas dropped), a word ``No``, ``no`` or ``not`` means
    no; anything else yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def gqa_prediction(text: str) -> str:
    """The answer as LLaVA's ``convert_gqa_for_eval.py`` writes it for GQA's evaluator: trailing periods dropped,
    lowercased."""
    return text.strip().rstrip(".").lower()


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes is the positive class) and the share of yes answers; a ratio whose
    denominator is 0 is 0."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t != "yes" for p, t in pairs)
    tn = sum(p != "yes" and t != "yes" for p, t in pairs)
    fn = sum(p != "yes" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(pairs), 1)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ scoring


def _mean_by(scores: list[tuple[Any, float]]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in scores:
        if key is not None:
            groups[str(key)].append(value)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _add_groups(metrics: dict[str, float], prefix: str, scores: list[tuple[Any, float]]) -> None:
    metrics.update({f"{prefix}/{k}": v for k, v in _mean_by(scores).items()})


def score_benchmark(name: str, items: Sequence[BenchItem], texts: Sequence[str | None]) -> tuple[dict, list[dict]]:
    """Metrics of the answers ``texts`` (None: not asked, its image missing) to ``items``, and one record per
    item (question id, prompt, answer, what was read from it, its score). Items without references are not
    scored; with none scored the metrics are empty."""
    metrics: dict[str, float] = {}
    records = []
    scored = [(it, t) for it, t in zip(items, texts, strict=True) if it.answers and t is not None]
    for it, text in zip(items, texts):
        records.append({"question_id": it.question_id, "prompt": it.prompt, "text": text})
    by_id = {id(it): r for it, r in zip(items, records)}
    if name == "vqav2":
        accs = []
        for it, text in scored:
            # The answer as submitted (EvalAI's processing, as LLaVA's converter) is what the server scores: the
            # local number then equals the server's for the same answers.
            submitted = evalai_answer(text)
            acc = vqa_accuracy(submitted, it.answers)
            by_id[id(it)].update(submitted=submitted, accuracy=acc)
            accs.append((it, acc))
        if accs:
            metrics["vqa_accuracy"] = sum(a for _, a in accs) / len(accs)
            _add_groups(metrics, "vqa_accuracy/answer_type", [(it.meta.get("answer_type"), a) for it, a in accs])
            _add_groups(metrics, "vqa_accuracy/question_type", [(it.meta.get("question_type"), a) for it, a in accs])
    elif name == "gqa":
        hits = []
        for it, text in scored:
            hit = float(gqa_prediction(text) == it.answers[0])
            by_id[id(it)].update(prediction=gqa_prediction(text), correct=hit)
            hits.append((it, hit))
        if hits:
            metrics["accuracy"] = sum(h for _, h in hits) / len(hits)
            _add_groups(metrics, "accuracy/structural", [(it.meta.get("structural"), h) for it, h in hits])
            _add_groups(metrics, "accuracy/semantic", [(it.meta.get("semantic"), h) for it, h in hits])
    elif name == "sqa":
        hits = []
        for it, text in scored:
            letter = sqa_letter(text.strip(), it.meta.get("num_choices", len(LETTERS)))
            hit = float(letter == it.answers[0])
            by_id[id(it)].update(parsed=letter or "FAILED", correct=hit)
            hits.append((it, hit))
        if hits:
            metrics["accuracy"] = sum(h for _, h in hits) / len(hits)
            metrics["failed"] = sum(by_id[id(it)]["parsed"] == "FAILED" for it, _ in hits) / len(hits)
            _add_groups(metrics, "accuracy/subject", [(it.meta.get("subject"), h) for it, h in hits])
    elif name == "mmbench":
        metrics.update(_score_mmbench(scored, by_id))
    elif name == "pope":
        splits: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for it, text in scored:
            pred = pope_yes_no(text)
            by_id[id(it)].update(parsed=pred, split=it.meta["split"], correct=float(pred == it.answers[0]))
            splits[it.meta["split"]][0].append(pred)
            splits[it.meta["split"]][1].append(it.answers[0])
        per_split = {s: pope_metrics(*splits[s]) for s in sorted(splits)}
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            if per_split:
                metrics[key] = sum(m[key] for m in per_split.values()) / len(per_split)
            metrics.update({f"{s}/{key}": m[key] for s, m in per_split.items()})
    return metrics, records


def _score_mmbench(scored: list[tuple[BenchItem, str]], by_id: dict[int, dict]) -> dict[str, float]:
    groups: dict[int, list[float]] = defaultdict(list)
    first: dict[int, BenchItem] = {}
    for it, text in scored:
        letter = mmbench_letter(text, len(it.meta["options"]))
        hit = float(letter == it.answers[0])
        by_id[id(it)].update(parsed=letter or "FAILED", correct=hit)
        main = it.question_id % MMBENCH_CIRCULAR
        groups[main].append(hit)
        first.setdefault(main, it)
    if not groups:
        return {}
    circular = {main: float(all(h == 1.0 for h in hits)) for main, hits in groups.items()}
    metrics = {
        "circular_accuracy": sum(circular.values()) / len(circular),
        "accuracy": sum(sum(h) for h in groups.values()) / sum(len(h) for h in groups.values()),
    }
    for key in ("category", "l2-category"):
        _add_groups(metrics, f"circular_accuracy/{key}", [(first[m].meta.get(key), c) for m, c in circular.items()])
    return metrics


# ------------------------------------------------------------------------------------------------------ outputs


def _gqa_tier(data: Path) -> str:
    stem = data.name.split(".")[0]
    stem = stem.removeprefix("llava_gqa_").removesuffix("_questions")
    return stem or "gqa"


def write_outputs(
    name: str,
    items: Sequence[BenchItem],
    texts: Sequence[str | None],
    records: list[dict],
    out_dir: Path,
    data: Path,
    submission_ids: Sequence[Any] | None = None,
) -> list[Path]:
    """Write ``answers.jsonl`` (one record per question, as LLaVA's answer files plus what was read and scored) and
    the benchmark's submission file into ``out_dir``; returns the files written. ``submission_ids``: VQAv2's
    submission holds these questions, in this order (the whole test2015 set: the server refuses test-dev alone),
    ``""`` for those not answered."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = out_dir / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    written = [answers]
    if name == "vqav2":  # as LLaVA's convert_vqav2_for_submission.py: EvalAI's processing, "" where unanswered
        answered = {int(it.question_id): "" if t is None else evalai_answer(t) for it, t in zip(items, texts)}
        ids = list(answered) if submission_ids is None else [int(i) for i in submission_ids]
        sub = [{"question_id": i, "answer": answered.get(i, "")} for i in ids]
        written.append(_write_json(out_dir / "vqav2_submission.json", sub))
    elif name == "gqa":
        preds = [{"questionId": it.question_id, "prediction": "" if t is None else gqa_prediction(t)}
                 for it, t in zip(items, texts)]  # fmt: skip
        written.append(_write_json(out_dir / f"{_gqa_tier(data)}_predictions.json", preds))
    elif name == "sqa":
        scored = [r for r in records if "correct" in r]
        correct = sum(int(r["correct"]) for r in scored)
        result = {"acc": 100.0 * correct / len(scored) if scored else None, "correct": correct, "count": len(scored),
                  "results": {r["question_id"]: LETTERS.find(r.get("parsed") or "FAILED") for r in records},
                  "outputs": {r["question_id"]: r["text"] for r in records}}  # fmt: skip
        written.append(_write_json(out_dir / "sqa_results.json", result))
    elif name == "mmbench":
        written.append(_write_mmbench_submission(out_dir / "mmbench_submission.csv", items, texts))
    return written


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value) + "\n", encoding="utf-8")
    return path


def _write_mmbench_submission(path: Path, items: Sequence[BenchItem], texts: Sequence[str | None]) -> Path:
    # LLaVA's convert_mmbench_for_submission.py: the TSV's columns without hint, category, source, image, comment and
    # l2-category, with the model's answer as "prediction" after D. CSV (Excel opens it) instead of .xlsx.
    dropped = {"hint", "category", "source", "image", "comment", "l2-category"}
    columns = [c for c in items[0].meta["row"] if c not in dropped]
    columns.insert(min(6, len(columns)), "prediction")
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for it, text in zip(items, texts):
            if not it.meta.get("generated"):  # --circular's own rotations are not rows of the TSV the server knows
                writer.writerow({**it.meta["row"], "prediction": text or ""})
    return path


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate_llava_bench(
    assistant: Any,
    name: str,
    data: str | os.PathLike,
    *,
    items: list[BenchItem] | None = None,
    image_folder: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    split: str = "test",
    circular: bool = False,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_samples: int | None = None,
    out_dir: str | os.PathLike | None = None,
    submission_ids: Sequence[int] | None = None,
    progress: bool = False,
    dataset_name: str | None = None,
    model_name: str | None = None,
    model_path: str | None = None,
) -> EvalResult:
    """Answer benchmark ``name``'s questions from ``data`` with ``assistant`` (a :class:`vlkit.eval.vqa.Assistant`)
    and score them (module docstring).

    Args:
        items: the questions already read (:func:`read_benchmark`); read from ``data`` when None.
        image_folder: image paths are relative to it (default: the data file's folder, or ScienceQA's
            ``images/<split>`` beside ``problems.json``); MMBench's images are in its TSV.
        annotations: VQAv2's annotations JSON, GQA's questions JSON (answers for LLaVA's question file), POPE's
            label folder (for LLaVA's ``llava_pope_test.jsonl``).
        split: ScienceQA's split (``pid_splits.json``).
        circular: MMBench: make the rotated copies of questions that have none in the TSV.
        max_samples: the first N questions only (MMBench: with all their circular copies).
        out_dir: write ``answers.jsonl`` and the submission file there.
        submission_ids: VQAv2: the submission lists these questions (the test2015 set, from
            ``read_vqav2(test2015_questions)``), ``""`` for those not answered.

    Returns:
        An EvalResult (task = ``name``); ``details["records"]`` holds one record per question, ``info["files"]``
        the files written.
    """
    from vlkit.eval.data import progress_bar
    from vlkit.eval.results import model_names

    data = Path(data)
    if items is None:
        items = read_benchmark(name, data, annotations=annotations, split=split, circular=circular)
    if max_samples is not None:
        items = first_questions(items, max_samples, name)
    folder = Path(image_folder) if image_folder is not None else _default_image_folder(name, data, split)
    asked = [it for it in items if it.image is None or name == "mmbench" or (folder / it.image).is_file()]
    if not asked:
        raise EvalUsageError(f"{data}: none of the {len(items)} questions' images exist under {folder}")
    from vlkit.data.conversation import HUMAN, IMAGE_TOKEN, Turn

    answers: dict[int, str] = {}
    reasons: dict[str, int] = defaultdict(int)
    bar = progress_bar(progress, len(asked), name, unit="q")
    for start in range(0, len(asked), batch_size):
        batch = asked[start : start + batch_size]
        images = [_image(name, it, folder, data) for it in batch]
        turns = [[Turn(HUMAN, it.prompt if it.image is None else f"{IMAGE_TOKEN}\n{it.prompt}")] for it in batch]
        for it, ans in zip(batch, assistant.answer(turns, images, max_new_tokens=max_new_tokens)):
            answers[id(it)] = ans.text
            reasons[ans.finish_reason] += 1
        bar.update(len(batch))
    bar.close()
    texts = [answers.get(id(it)) for it in items]
    metrics, records = score_benchmark(name, items, texts)
    info = {
        "benchmark": name,
        "num_questions": len(asked),
        "num_scored": sum(1 for it, t in zip(items, texts) if it.answers and t is not None),
        "template": assistant.chat.template.name,
        "max_new_tokens": max_new_tokens,
        "finish_reasons": dict(reasons),
        "skipped": {"image_missing": len(items) - len(asked)} if len(items) > len(asked) else {},
    }
    if out_dir is not None:
        files = write_outputs(name, items, texts, records, Path(out_dir), data, submission_ids)
        info["files"] = [str(p) for p in files]
    model, pretrained = model_names(model_path, model_name)
    return EvalResult(name, metrics, dataset_name or str(data), model, pretrained, len(asked), info,
                      {"records": records})  # fmt: skip


def first_questions(items: list[BenchItem], n: int, name: str) -> list[BenchItem]:
    """The first ``n`` questions; for MMBench a question is a group of circular copies, kept or left out whole."""
    if name != "mmbench":
        return items[:n]
    keep: set[int] = set()
    for it in items:
        if len(keep) == n:
            break
        keep.add(it.question_id % MMBENCH_CIRCULAR)
    return [it for it in items if it.question_id % MMBENCH_CIRCULAR in keep]


def _default_image_folder(name: str, data: Path, split: str) -> Path:
    folder = data if data.is_dir() else data.parent
    if name == "sqa" and (folder / "images" / split).is_dir():
        return folder / "images" / split
    return folder


def _image(name: str, item: BenchItem, folder: Path, data: Path) -> Any:
    if item.image is None:
        return None
    if name == "mmbench":
        return decode_base64_image(item.image, f"{data} index {item.question_id}")
    return folder / item.image

"""Visual question answering with a NeVA model: ``vlkit eval vqa --model PATH --data FILE [--json]``.

Questions come with images and reference answers, in either of two forms (a JSON list or JSONL):

* LLaVA's question files: ``{"question_id", "image", "text" | "question", "answer" | "answers"}``, where
  ``answers`` is a list of strings or VQAv2's ``[{"answer": ...}, ...]``; an optional ``category`` (or
  ``question_type``) groups the metrics;
* LLaVA conversations (``{"id", "image", "conversations": [...]}``, e.g. ``vlkit data shapes-vqa``'s
  ``instruct_val.json``): every assistant turn is a question, asked after the turns before it (the reference answers
  of earlier rounds serve as the history, as in training).

Each question is answered greedily (batched, with a KV cache) in the model's conversation template, and scored on
normalised text (lowercase, punctuation and the articles a/an/the removed, whitespace collapsed):

* ``exact_match``: the answer equals one of the references;
* ``vqa_accuracy``: VQA's accuracy for questions with several references (humans' answers): ``min(1, #other
  humans who gave the answer / 3)`` averaged over the humans (:func:`vlkit.eval.vqa_normalize.annotator_average`;
  0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ of 10), the exact match for questions with one.

:class:`Assistant` (a model with its tokenizer, template and image transform) is what ``vlkit chat`` talks to, and
:func:`evaluate_vqa` is what NeVA training evaluates on its held-out split.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.data.conversation import GPT, HUMAN, IMAGE_TOKEN, ConversationTokenizer, Turn
from vlkit.eval.results import EvalResult, EvalUsageError
from vlkit.eval.vqa_normalize import annotator_average

ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
RUN_STATE_FILE = "train_state.json"


# ------------------------------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, articles dropped, whitespace collapsed: ``"The Red."`` -> ``"red"``."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def score_answer(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(exact match, VQA accuracy) of one answer against its references (see the module docstring)."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    exact = float(pred in refs)
    return exact, annotator_average(sum(r == pred for r in refs), len(refs))


# --------------------------------------------------------------------------------------------------------- items


@dataclass
class VqaItem:
    """One question: ``turns`` end with the human turn to answer (the image placeholder in the first one)."""

    question_id: str
    image: str | None
    turns: list[Turn]
    answers: list[str]
    category: str | None = None
    system: str | None = None

    @property
    def question(self) -> str:
        return self.turns[-1].text.replace(IMAGE_TOKEN, "").strip()


def _answers(raw: dict, where: str) -> list[str]:
    value = raw.get("answers", raw.get("answer"))
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        out = [v.get("answer") if isinstance(v, dict) else v for v in value]
        if all(isinstance(v, str) for v in out):
            return out
    raise ValueError(f"{where}: 'answer' must be a string or 'answers' a non-empty list of strings (or of "
                     f"{{'answer': str}}), got {value!r}")  # fmt: skip


def _with_placeholder(turns: list[Turn], has_image: bool) -> list[Turn]:
    """LLaVA's convention: an image whose text has no ``<image>`` goes in front of the first human turn."""
    if has_image and not any(IMAGE_TOKEN in t.text for t in turns):
        turns = [turns[0]._replace(text=f"{IMAGE_TOKEN}\n{turns[0].text}"), *turns[1:]]
    return turns


def _conversation_items(raw: dict, where: str) -> list[VqaItem]:
    from vlkit.data.conversation import turns_from_json

    turns = turns_from_json(raw.get("conversations"), where)
    if turns and turns[0].role == GPT:  # as in training: a leading assistant turn is dropped
        turns = turns[1:]
    image = raw.get("image")
    turns = _with_placeholder(turns, image is not None)
    items = []
    for i, turn in enumerate(turns):
        if turn.role != GPT:
            continue
        if i == 0 or turns[i - 1].role != HUMAN:
            raise ValueError(f"{where}: turn {i} (gpt) does not follow a human turn")
        items.append(VqaItem(f"{raw.get('id', where)}:{len(items)}", image, list(turns[:i]), [turn.text],
                             raw.get("category"), raw.get("system")))  # fmt: skip
    if not items:
        raise ValueError(f"{where}: no gpt turn to answer")
    return items


def _question_item(raw: dict, where: str, index: int) -> VqaItem:
    text = next((raw[k] for k in ("text", "question", "prompt") if isinstance(raw.get(k), str)), None)
    if text is None:
        raise ValueError(f"{where}: no question ('text' or 'question', a string)")
    image = raw.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise ValueError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    turns = _with_placeholder([Turn(HUMAN, text)], image is not None)
    qid = raw.get("question_id", raw.get("id", index))
    category = raw.get("category", raw.get("question_type"))
    return VqaItem(str(qid), image, turns, _answers(raw, where), None if category is None else str(category),
                   raw.get("system"))  # fmt: skip


def read_vqa_items(path: str | os.PathLike) -> list[VqaItem]:
    """The questions of a question file or a LLaVA conversation file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed records, all reported at once (up to 10), each named by file and index.
    """
    from vlkit.data.llava import read_json_records

    items, problems = [], []
    for index, raw in enumerate(read_json_records(path)):
        where = f"{path} sample {index}"
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: a sample must be a JSON object, got {type(raw).__name__}")
            if "conversations" in raw:
                items.extend(_conversation_items(raw, where))
            else:
                items.append(_question_item(raw, where, index))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{path}: {len(problems)} malformed sample(s):\n  " + "\n  ".join(problems[:10]) + more)
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


# ----------------------------------------------------------------------------------------------------- assistant


@dataclass
class Answer:
    text: str
    tokens: list[int]
    finish_reason: str  # eos | stop | length


@dataclass
class Assistant:
    """A NeVA model with what it needs to talk: its tokenizer and conversation template, and the image transform.

    Args:
        model: a :class:`vlkit.models.neva.NevaModel` (or one wrapped by DDP / sharded by FSDP2).
        chat: the template's :class:`ConversationTokenizer`.
        transform: PIL image -> [3, H, W] tensor (``vlkit.data.llava.image_transform`` with the aspect mode).
        dtype: autocast dtype (None: none).
    """

    model: nn.Module
    chat: ConversationTokenizer
    transform: Callable[[Any], torch.Tensor]
    dtype: torch.dtype | None = None
    extra_stops: tuple[str, ...] = field(default=())

    @property
    def inner(self) -> nn.Module:
        from vlkit.utils.modules import unwrap

        return unwrap(self.model)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.chat.template.stop, *self.extra_stops)))

    def eos_token_ids(self) -> list[int]:
        ids = list(self.inner.config.llm.eos_token_ids) + list(self.chat.stop_token_ids)
        return list(dict.fromkeys(ids))

    def decode(self, ids: Sequence[int]) -> str:
        return self.chat.tokenizer.decode(list(ids), skip_special_tokens=False)

    def image_tensor(self, image: Any) -> torch.Tensor:
        """A path or PIL image -> the tower's input tensor (an unreadable image raises ImageDecodeError)."""
        if isinstance(image, torch.Tensor):
            return image
        from vlkit.data.images import read_image, to_rgb

        if isinstance(image, (str, os.PathLike)):
            image = to_rgb(read_image(Path(image)), key=str(image))
        return self.transform(image)

    def answer(
        self,
        conversations: Sequence[Sequence[Turn]],
        images: Sequence[Any],
        *,
        systems: Sequence[str | None] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        lockstep: bool = False,
    ) -> list[Answer]:
        """Answer a batch of conversations (each ending with a human turn) about their images, in one batched
        generation with a KV cache. ``temperature`` 0 is greedy; above 0 samples (with ``top_p`` / ``top_k``).

        ``images[i]`` is a path, PIL image or transformed tensor, or None for a text-only conversation. ``lockstep``
        runs exactly ``max_new_tokens`` steps (answers are cut afterwards), as a model sharded across ranks needs.
        """
        from vlkit.models.generate import generate, left_pad, trim_at_stop
        from vlkit.models.neva import IMAGE_TOKEN_INDEX

        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
        systems = systems or [None] * len(conversations)
        prompts = [self.chat.prompt(list(turns), system=system) for turns, system in zip(conversations, systems)]
        inner = self.inner
        vision = inner.config.vision
        pixels = torch.zeros(len(prompts), 3, vision.img_h, vision.img_w)
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            if IMAGE_TOKEN_INDEX in prompt:
                if image is None:
                    raise ValueError(f"conversation {i} has an {IMAGE_TOKEN} placeholder but no image")
                pixels[i] = self.image_tensor(image)
        from vlkit.eval.runtime import autocast, register_forward_methods
        from vlkit.utils.modules import model_device

        device = model_device(inner)
        pad = inner.config.llm.pad_token_id
        ids, mask = left_pad(prompts, self.chat.tokenizer.pad_token_id if pad is None else pad)
        eos, stops = self.eos_token_ids(), self.stop_strings
        # Splicing runs outside forward(): FSDP2 must gather the root's parameters (embeddings, projector) for it.
        register_forward_methods(inner, ["prepare_inputs_embeds"])
        with torch.no_grad(), autocast(device, self.dtype):
            s = inner.prepare_inputs_embeds(ids.to(device), pixels.to(device), mask.to(device), padding_side="left")
            out = generate(
                inner,
                s.input_ids,
                inputs_embeds=s.inputs_embeds,
                attention_mask=s.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
                top_p=top_p,
                top_k=top_k,
                repetition_penalty=repetition_penalty,
                eos_token_ids=[] if lockstep else eos,
                pad_token_id=eos[0] if eos else 0,
                stop_strings=() if lockstep else stops,
                decode=self.decode,
                seed=seed,
            )
        answers = []
        for row, reason in zip(out.rows(), out.finish_reasons):
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            if cut is not None:  # the end marker is not part of the answer
                row, reason = row[:cut], "eos"
            text = self.decode(row)
            trimmed = trim_at_stop(text, stops)
            if lockstep and trimmed != text:
                reason = "stop"
            answers.append(Answer(trimmed.strip(), row, reason))
        return answers


def run_config(model_dir: str | os.PathLike) -> dict | None:
    """The training config stored with a trainer checkpoint (``train_state.json``), or None for other directories."""
    file = Path(model_dir) / RUN_STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = state.get("state", {}).get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def find_tokenizer(model_dir: str | os.PathLike, model: nn.Module) -> Path:
    """The LLM tokenizer of a saved NeVA: ``tokenizer.json`` in the model directory (converted LLaVA), else the
    config's ``model.llm.tokenizer`` (NeVA runs record it), else ``mm_cfg.llm.from_pretrained``'s directory.

    Raises:
        EvalUsageError: none of them holds a tokenizer.json (pass --tokenizer).
    """
    cfg = model.config
    candidates = [Path(model_dir)]
    if cfg.llm.tokenizer:
        candidates.append(Path(cfg.llm.tokenizer))
    if cfg.mm_cfg is not None and cfg.mm_cfg.llm.from_pretrained:
        candidates.append(Path(cfg.mm_cfg.llm.from_pretrained))
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c.is_file() and c.name.endswith(".json")):
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise EvalUsageError(f"no tokenizer.json found for the model (looked in {looked}); pass --tokenizer DIR")


def load_assistant(
    model_path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    template: str | None = None,
    aspect: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    stops: Sequence[str] = (),
) -> tuple[Assistant, dict[str, str]]:
    """A NeVA ready to answer, from a model directory, a training checkpoint (whole or, for stage 1, the projector
    over the pretrained parts its config names), a run directory (its latest checkpoint), or a converted or Hugging
    Face LLaVA directory. Returns the assistant and what was chosen (model dir, tokenizer, template, aspect).

    The template is ``template``, else the run's ``data.conv_template`` (stored with a checkpoint), else the
    model's ``mm_cfg.llm.model_type``, with the run's ``data.system_prompt`` when it set one; the aspect mode likewise
    from ``data.image_aspect_ratio``, else ``keep`` (the tower's own eval transform, as Hugging Face's LLaVA
    processor does).

    Raises:
        EvalUsageError: a missing path, a model that is not NeVA, no tokenizer, or a template it cannot serve.
    """
    from vlkit.config import ConfigError
    from vlkit.data.conversation import template_with_system
    from vlkit.data.llava import image_transform
    from vlkit.data.tokenizer import get_tokenizer
    from vlkit.eval.runtime import autocast_dtype, resolve_device
    from vlkit.interop.native import ModelFormatError, load_model, resolve_model_path
    from vlkit.models.neva import NevaModel

    if not os.path.exists(model_path):
        raise EvalUsageError(f"--model {model_path}: no such file or directory")
    where = resolve_model_path(str(model_path))
    device = resolve_device(device)
    try:
        model = load_model(where, device=device)
    except (ModelFormatError, ConfigError, FileNotFoundError) as e:
        raise EvalUsageError(f"--model {model_path}: {e}") from None
    if not isinstance(model, NevaModel):
        raise EvalUsageError(f"--model {model_path}: a {type(model).__name__}, not a NeVA (LLaVA-style) model")
    model.eval()
    run = run_config(where) or {}
    data = run.get("data", {}) if isinstance(run.get("data"), dict) else {}
    name = template or data.get("conv_template") or model.config.mm_cfg.llm.model_type
    aspect = aspect or data.get("image_aspect_ratio") or "keep"
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer(where, model)
    try:
        chat = ConversationTokenizer(get_tokenizer(tok_path), template_with_system(name, data.get("system_prompt")))
        transform = image_transform(model.config.vision, aspect)
    except (ValueError, FileNotFoundError) as e:
        raise EvalUsageError(str(e)) from None
    assistant = Assistant(model, chat, transform, autocast_dtype(precision, device), tuple(stops))
    return assistant, {"model": str(where), "tokenizer": str(tok_path), "template": name, "aspect": aspect}


# ---------------------------------------------------------------------------------------------------- evaluation


def evaluate_vqa(
    assistant: Assistant,
    data: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_samples: int | None = None,
    match: str | None = None,
    distributed: bool | None = None,
    group: Any = None,
    progress: bool = False,
    dataset_name: str | None = None,
    model_name: str | None = None,
    model_path: str | None = None,
) -> EvalResult:
    """Answer every question of ``data`` and score the answers (see the module docstring).

    Args:
        assistant: the model with its tokenizer and template.
        data: a question file or LLaVA conversation file (JSON or JSONL); image paths are relative to
            ``image_folder`` (default: the file's folder).
        max_samples: the first N questions only (after ``match``).
        match: only questions whose text matches this regular expression (case-insensitive), e.g. ``colou?r``.
        distributed / group: shard the questions over the ranks of ``group`` (see ``vlkit.eval.distributed``).

    Returns:
        An EvalResult with ``exact_match`` and ``vqa_accuracy`` (and ``exact_match/<category>`` when questions carry
        a category); ``details["predictions"]`` holds one dict per question answered on this rank.
    """
    from vlkit.eval.data import progress_bar
    from vlkit.eval.distributed import all_reduce_sum, lockstep, resolve_shard
    from vlkit.eval.results import model_names

    items = read_vqa_items(data)
    if match is not None:
        try:
            pattern = re.compile(match, re.IGNORECASE)
        except re.error as e:
            raise EvalUsageError(f"--match {match!r}: not a regular expression ({e})") from None
        items = [it for it in items if pattern.search(it.question)]
        if not items:
            raise EvalUsageError(f"{data}: no question matches {match!r}")
    folder = Path(image_folder) if image_folder is not None else Path(data).parent
    usable = [it for it in items if it.image is None or (folder / it.image).is_file()]
    missing = len(items) - len(usable)
    if not usable:
        raise EvalUsageError(f"{data}: none of the {len(items)} questions' images exist under {folder}")
    items = usable if max_samples is None else usable[:max_samples]
    shard = resolve_shard(distributed, group)
    mine = items[shard.rank :: shard.world_size]
    # A model sharded over the ranks needs every rank in every forward: fixed-length generation in lockstep.
    from vlkit.utils.modules import is_sharded

    sharded = shard.distributed and is_sharded(assistant.inner)
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    categories = sorted({it.category for it in items if it.category is not None})
    reasons = ("eos", "stop", "length")
    # Sums over this rank's questions: exact, vqa, count, finish reasons, then (exact, count) per category.
    sums = torch.zeros(6 + 2 * len(categories), dtype=torch.float64)
    predictions = []
    bar = progress_bar(progress and shard.rank == 0, len(mine), "vqa", unit="q")
    for batch in lockstep(batches, shard) if sharded else batches:
        dummy = batch is None  # this rank is out of questions; the others still need it in their forwards
        batch = [items[0]] if dummy else batch
        answers = assistant.answer(
            [it.turns for it in batch],
            [None if it.image is None else folder / it.image for it in batch],
            systems=[it.system for it in batch],
            max_new_tokens=max_new_tokens,
            lockstep=sharded,
        )
        if dummy:
            continue
        for it, ans in zip(batch, answers):
            exact, acc = score_answer(ans.text, it.answers)
            sums[:3] += torch.tensor([exact, acc, 1.0], dtype=torch.float64)
            sums[3 + reasons.index(ans.finish_reason)] += 1
            if it.category is not None:
                c = 6 + 2 * categories.index(it.category)
                sums[c : c + 2] += torch.tensor([exact, 1.0], dtype=torch.float64)
            predictions.append({"question_id": it.question_id, "question": it.question, "answer": ans.text,
                                "references": it.answers, "exact_match": exact, "vqa_accuracy": acc})  # fmt: skip
        bar.update(len(batch))
    bar.close()
    sums = all_reduce_sum(sums, shard)
    n = max(float(sums[2]), 1.0)
    metrics = {"exact_match": float(sums[0]) / n, "vqa_accuracy": float(sums[1]) / n}
    for i, name in enumerate(categories):
        count = float(sums[7 + 2 * i])
        if count:
            metrics[f"exact_match/{name}"] = float(sums[6 + 2 * i]) / count
    model, pretrained = model_names(model_path, model_name)
    info = {
        "num_questions": int(sums[2]),
        "template": assistant.chat.template.name,
        "max_new_tokens": max_new_tokens,
        "match": match,
        "finish_reasons": {r: int(sums[3 + i]) for i, r in enumerate(reasons)},
        "skipped": {"image_missing": missing} if missing else {},
    }
    return EvalResult("vqa", metrics, dataset_name or str(data), model, pretrained, int(sums[2]), info,
                      {"predictions": predictions})  # fmt: skip

"""LLaVA instruction data: JSON/JSONL records -> tokenised conversations + images -> padded batches (NeVA).

A data file is LLaVA's JSON list (or JSONL, one object per line) of::

    {"id": "000123", "image": "images/000123.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"}, ...],
     "system": "optional: replaces the template's system prompt"}

``image`` is relative to ``data.image_folder`` (default: the data file's folder); a sample without one is text-only.
Malformed records fail at load time, all at once, each named by file and sample index. At training time nothing
stops the run: a sample whose image is missing or undecodable, or whose image would not fit the context, is
replaced by the next usable one and counted (:attr:`LlavaDataset.stats`); template/tokenizer mismatches and samples
left without a supervised token are kept fully masked and counted. Counts live in shared memory, so they include
what DataLoader workers saw.

Sequence arithmetic: a sample's ``input_ids`` hold one :data:`IMAGE_TOKEN_INDEX` per image; the NeVA model replaces
it by :func:`image_token_count` positions. Text is cut so that the *spliced* sequence fits the LLM context.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from vlkit.config.schema import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlkit.data.conversation import (
    GPT,
    HUMAN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    ConversationTokenizer,
    Template,
    Tokenized,
    Turn,
    WarningLimiter,
    fit_to_context,
    get_template,
    turns_from_json,
)
from vlkit.data.images import REASONS, ImageDecodeError, read_image, to_rgb
from vlkit.data.index_loader import IndexLoader
from vlkit.data.transforms import INTERPOLATIONS, ImageTransform, ToRGB, get_transform
from vlkit.utils.errors import DataError

logger = logging.getLogger("vlkit.data.llava")

ASPECT_MODES = ("square", "pad", "keep")
# Why an image could not be used: "missing" (no such file) or a decoding reason of vlkit.data.images.
IMAGE_REASONS = ("missing", *REASONS)
# Per-sample flags (a bit mask in shared memory).
_MISMATCH, _ALL_MASKED, _TRUNCATED, _TOO_LONG = 1, 2, 4, 8
_FLAG_NAMES = {_MISMATCH: "tokenization_mismatch", _ALL_MASKED: "all_masked", _TRUNCATED: "truncated",
               _TOO_LONG: "too_long"}  # fmt: skip
_MAX_LISTED_PROBLEMS = 10


# ------------------------------------------------------------------------------------------------------------ records


class Record(NamedTuple):
    """One validated sample of a data file."""

    id: str
    image: str | None
    turns: tuple[Turn, ...]
    system: str | None
    where: str  # "file sample N", for messages


class NoUsableSamplesError(DataError, RuntimeError):
    """Every sample of a data file was skipped (a RuntimeError, as it was before the error family)."""


def read_json_records(path: str | os.PathLike) -> list[Any]:
    """The raw objects of a LLaVA ``.json`` (a list) or ``.jsonl`` file (one object per line; blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON (with line and column), or a ``.json`` whose top level is not a list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # One object per line in a file not named .jsonl: read it as JSONL below.
            if not (e.msg == "Extra data" and text.lstrip().startswith("{")):
                raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of samples, got a {type(data).__name__}")
            return data
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
    return items


def parse_record(
    raw: Any,
    where: str,
    index: int,
    template: Template,
    *,
    is_multimodal: bool = True,
    sep_image_conv_front: bool = False,
) -> Record:
    """Validate one raw sample and normalise it into a :class:`Record`.

    The image placeholder is put where LLaVA puts it: an image without ``<image>`` in the text gets ``"<image>\\n"``
    in front of the first human turn, and so does every image when ``sep_image_conv_front``; without
    ``is_multimodal`` images are dropped and placeholders removed. A leading gpt turn is dropped (as LLaVA does).

    Raises:
        ValueError: a malformed sample; the message starts with ``where``.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(raw).__name__}")
    sample_id = raw.get("id", index)
    if not isinstance(sample_id, (str, int)):
        raise DataError(f"{where}: 'id' must be a string or a number, got {type(sample_id).__name__}")
    where = f"{where} (id {sample_id!r})" if "id" in raw else where
    image = raw.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise DataError(f"{where}: {len(image)} images; one image per sample is supported")
        image = image[0]
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    turns = turns_from_json(raw.get("conversations"), where)
    if turns and turns[0].role == GPT:
        turns = turns[1:]
    if not is_multimodal:
        image = None
        turns = [t._replace(text=t.text.replace(IMAGE_TOKEN, "").strip()) for t in turns]
    # Checked before the placement below, which would quietly strip it: an answer that shows the image is a broken
    # sample (docs/data.md: reported), not one to repair by moving the placeholder.
    in_answer = [i for i, t in enumerate(turns) if t.role == GPT and IMAGE_TOKEN in t.text]
    if in_answer:
        raise DataError(f"{where}: turn {in_answer[0]} (gpt) contains {IMAGE_TOKEN}; the image belongs in a human turn")
    placeholders = sum(t.text.count(IMAGE_TOKEN) for t in turns if t.role == HUMAN)
    if image is None and placeholders:
        raise DataError(f"{where}: the text has {IMAGE_TOKEN} but the sample has no 'image'")
    if placeholders > 1:
        raise DataError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholders; one image per sample is supported")
    if image is not None and turns and (placeholders == 0 or sep_image_conv_front):
        turns = [t._replace(text=t.text.replace(IMAGE_TOKEN, "").strip()) for t in turns]
        turns[0] = turns[0]._replace(text=f"{IMAGE_TOKEN}\n{turns[0].text}")
    problem = template.check(turns, has_image=image is not None)
    if problem:
        raise DataError(f"{where}: {problem} (template {template.name!r})")
    return Record(str(sample_id), image, tuple(turns), system, where)


def load_llava_records(
    path: str | os.PathLike,
    template: Template | str,
    *,
    is_multimodal: bool = True,
    sep_image_conv_front: bool = False,
) -> list[Record]:
    """Read and validate a LLaVA data file; every malformed sample is reported in one error.

    Raises:
        ValueError: the file is not JSON, or samples are malformed (up to 10 listed, each with its index).
    """
    if isinstance(template, str):
        template = get_template(template)
    records, problems = [], []
    for index, raw in enumerate(read_json_records(path)):
        try:
            records.append(
                parse_record(
                    raw,
                    f"{path} sample {index}",
                    index,
                    template,
                    is_multimodal=is_multimodal,
                    sep_image_conv_front=sep_image_conv_front,
                )
            )
        except ValueError as e:
            problems.append(str(e))
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more" if len(problems) > _MAX_LISTED_PROBLEMS else ""
        )
        raise DataError(f"{path}: {len(problems)} malformed sample(s):\n  {listed}{more}")
    if not records:
        raise DataError(f"{path}: no samples")
    return records


# ------------------------------------------------------------------------------------------------------------ images


def pad_to_aspect(img: Image.Image, height: int, width: int, fill: tuple[int, int, int]) -> Image.Image:
    """Pad ``img`` with ``fill`` to the aspect ratio ``width / height``, the image centred.

    For a square target this is LLaVA-1.5's ``expand2square``: a 20x10 image becomes 20x20 with 5 rows of ``fill``
    above and below (the offset is floored, as there).
    """
    w, h = img.size
    if w * height >= h * width:  # wider than the target: add rows
        new_w, new_h = w, max(h, round(w * height / width))
    else:
        new_w, new_h = max(w, round(h * width / height)), h
    if (new_w, new_h) == (w, h):
        return img
    canvas = Image.new(img.mode, (new_w, new_h), fill)
    canvas.paste(img, ((new_w - w) // 2, (new_h - h) // 2))
    return canvas


class PadToAspect:
    """:func:`pad_to_aspect` as a transform step (a class, so that DataLoader workers can pickle it)."""

    def __init__(self, height: int, width: int, fill: tuple[int, int, int]) -> None:
        self.height, self.width, self.fill = height, width, tuple(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        return pad_to_aspect(img, self.height, self.width, self.fill)


def mean_color(vision: Any) -> tuple[int, int, int]:
    """The image processor's mean as an 8-bit RGB colour, truncated as LLaVA does (``int(m * 255)``)."""
    mean = getattr(vision, "mean", None) or getattr(vision, "image_mean", None)
    if mean is None:
        mean = OPENAI_CLIP_MEAN
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def image_transform(vision: Any, aspect: str = "square", *, normalize: bool = True) -> Callable[[Any], torch.Tensor]:
    """PIL image (any mode) -> float tensor ``[3, img_h, img_w]`` for the vision tower, by aspect mode.

    * ``square``: resize to ``img_h x img_w``, ignoring the aspect ratio (the whole image, stretched);
    * ``pad``: pad to the target's aspect ratio with the processor's mean colour (:func:`mean_color`), then resize:
      the whole image, undistorted (LLaVA-1.5);
    * ``keep``: keep the aspect ratio without padding: resize the short side to the target and centre-crop the long
      side -- the tower's own eval transform (``get_transform``; CLIPImageProcessor's behaviour). The crop is the
      tower's constraint: its position embeddings fix the input at ``img_h x img_w``.

    Args:
        vision: a ``VisionConfig``, or anything with ``img_h``, ``img_w``, ``mean``/``image_mean`` and
            ``std``/``image_std`` (optionally ``resize_interpolation`` and ``crop_style``).
        aspect: one of :data:`ASPECT_MODES` (``data.image_aspect_ratio``).
        normalize: False returns pixels in [0, 1] (for tests and previews).
    """
    if aspect not in ASPECT_MODES:
        raise ValueError(f"data.image_aspect_ratio={aspect!r} is not one of {', '.join(ASPECT_MODES)}")
    if aspect == "keep":
        return get_transform(vision, train=False, normalize=normalize)
    size = (int(vision.img_h), int(vision.img_w))
    interpolation = INTERPOLATIONS[getattr(vision, "resize_interpolation", None) or "bicubic"]
    steps: list[Callable] = [ToRGB()]
    if aspect == "pad":
        steps.append(PadToAspect(*size, mean_color(vision)))
    steps.append(functools.partial(F.resize, size=list(size), interpolation=interpolation, antialias=True))
    if not normalize:
        return ImageTransform(steps, None, None)
    mean = getattr(vision, "mean", None) or getattr(vision, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(vision, "std", None) or getattr(vision, "image_std", None) or OPENAI_CLIP_STD
    return ImageTransform(steps, tuple(mean), tuple(std))


def image_token_count(vision: Any, *, class_token_length: int | None = None, use_im_start_end: bool = False) -> int:
    """Positions one image takes in the LLM sequence after splicing.

    The tower emits ``num_patches + vision.class_token_length`` tokens; NeVA drops the first ``class_token_length``
    (``mm_cfg.vision_encoder.class_token_length``; None: all class tokens) and, with ``use_im_start_end``, adds a
    learned start and end embedding. CLIP ViT-L/14 at 224 px: 256 (258 with start/end).
    """
    prefix = int(getattr(vision, "class_token_length", 0))
    dropped = prefix if class_token_length is None else int(class_token_length)
    if not 0 <= dropped <= prefix:
        raise ValueError(f"class_token_length={dropped}: the vision tower has {prefix} class token(s)")
    patches = (int(vision.img_h) // int(vision.patch_dim)) * (int(vision.img_w) // int(vision.patch_dim))
    return patches + prefix - dropped + (2 if use_im_start_end else 0)


# ------------------------------------------------------------------------------------------------------------ dataset


class LlavaDataset(Dataset):
    """LLaVA conversations with their images, tokenised and cut to the context, for NeVA training.

    Items are dicts: ``input_ids`` and ``labels`` (LongTensor [T], see :class:`vlkit.data.conversation.Tokenized`),
    ``image`` (float [3, H, W], or None for a text-only sample) and ``id``.

    Args:
        records: the validated samples (:func:`load_llava_records`), or a data file path.
        tokenizer: a :class:`ConversationTokenizer` (it carries the template).
        image_transform: PIL -> tensor (:func:`image_transform`).
        max_length: the LLM context length (``model.llm.encoder_seq_length``).
        image_tokens: positions per image after splicing (:func:`image_token_count`).
        image_folder: where image paths are relative to (``data.image_folder``); None: the data file's folder
            (or the current directory for records given directly).
        lazy_preprocess: tokenise when an item is read (True, ``data.lazy_preprocess``) or all up front (False:
            mismatch and length problems are counted before training starts).
        is_multimodal, sep_image_conv_front: see :func:`parse_record` (used when ``records`` is a path).
        strict: raise instead of counting when a sample has no supervised token (for checking a dataset).
    """

    def __init__(
        self,
        records: Sequence[Record] | str | os.PathLike,
        tokenizer: ConversationTokenizer,
        image_transform: Callable[[Any], torch.Tensor],
        *,
        max_length: int,
        image_tokens: int,
        image_folder: str | os.PathLike | None = None,
        lazy_preprocess: bool = True,
        is_multimodal: bool = True,
        sep_image_conv_front: bool = False,
        strict: bool = False,
    ) -> None:
        if isinstance(records, (str, os.PathLike)):
            self.source = str(records)
            folder = image_folder if image_folder is not None else Path(records).parent
            records = load_llava_records(
                records, tokenizer.template, is_multimodal=is_multimodal, sep_image_conv_front=sep_image_conv_front
            )
        else:
            self.source = "records"
            folder = image_folder if image_folder is not None else "."
        if max_length < 1 or image_tokens < 1:
            raise ValueError(f"max_length={max_length} and image_tokens={image_tokens} must be positive")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.max_length = max_length
        self.image_tokens = image_tokens
        self.image_folder = Path(folder)
        self.strict = strict
        n = len(self.records)
        # Shared memory: DataLoader workers write what they found, the main process reads the counts.
        self._image_status = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self._flags = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self._warn = WarningLimiter(logger)
        self._cache: list[Tokenized] | None = None
        if not lazy_preprocess:
            self._cache = [self._tokenize(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.records)

    # -- counts -------------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """Samples met so far with each problem (each sample counted once per problem), over all workers:
        ``image_<reason>`` (reasons :data:`IMAGE_REASONS`) and ``too_long`` were skipped; ``tokenization_mismatch``
        and ``all_masked`` were kept fully masked; ``truncated`` were cut to the context. Zero counts are left out."""
        out: dict[str, int] = {}
        codes = torch.bincount(self._image_status.long(), minlength=1 + len(IMAGE_REASONS)).tolist()
        for reason, count in zip(IMAGE_REASONS, codes[1:]):
            if count:
                out[f"image_{reason}"] = count
        for bit, name in _FLAG_NAMES.items():
            count = int(((self._flags & bit) != 0).sum())
            if count:
                out[name] = count
        return out

    @property
    def skipped(self) -> dict[str, int]:
        """The part of :attr:`stats` that was skipped (replaced by another sample)."""
        return {k: v for k, v in self.stats.items() if k.startswith("image_") or k == "too_long"}

    def _flag(self, index: int, bit: int) -> bool:
        """Set a flag; True the first time (so each sample is reported once, whichever worker meets it)."""
        if int(self._flags[index]) & bit:
            return False
        self._flags[index] |= bit
        return True

    # -- items --------------------------------------------------------------------------------------------------------
    def _tokenize(self, index: int) -> Tokenized:
        rec = self.records[index]
        return self.tokenizer(rec.turns, system=rec.system, sample_id=rec.id)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The item at ``index``; an unusable sample is replaced by the next usable one (and counted)."""
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if self._image_status[i] or int(self._flags[i]) & _TOO_LONG:
                continue  # known to be unusable
            item = self._build(i)
            if item is not None:
                return item
        raise NoUsableSamplesError(f"{self.source}: none of the {n} samples can be used ({self.stats})")

    def _build(self, index: int) -> dict[str, Any] | None:
        """The item, or None when the sample must be skipped (flagged). Problems of kept samples are flagged only
        once the sample is known to be kept, so a skipped sample is counted under its skip reason alone."""
        rec = self.records[index]
        tokens = self._cache[index] if self._cache is not None else self._tokenize(index)
        fitted = fit_to_context(tokens, self.max_length, self.image_tokens)
        if fitted is None:
            if self._flag(index, _TOO_LONG):
                self._warn(
                    "too_long",
                    "%s: skipped: its image (at position %d, %d positions once spliced) does not fit the context of %d",
                    rec.where,
                    tokens.input_ids.index(IMAGE_TOKEN_INDEX),
                    self.image_tokens,
                    self.max_length,
                )
            return None
        if fitted.num_supervised == 0 and self.strict:
            problem = "tokenization mismatch" if fitted.mismatch else "the context ends before the first answer"
            raise ValueError(f"{rec.where}: no supervised token ({problem})")
        image = None
        if rec.image is not None:
            try:
                image = self.image_transform(self._load_image(rec.image))
            except ImageDecodeError as e:
                reason = e.reason if e.reason in IMAGE_REASONS else "corrupt"
                self._image_status[index] = 1 + IMAGE_REASONS.index(reason)
                detail = f" ({e.detail})" if e.detail else ""
                self._warn("image", "%s: skipped: image %s is %s%s", rec.where, e.key, reason, detail)
                return None
        if fitted.mismatch:
            self._flag(index, _MISMATCH)  # logged by the tokenizer, with the sample id
        if fitted.truncated:
            self._flag(index, _TRUNCATED)
        if fitted.num_supervised == 0 and self._flag(index, _ALL_MASKED) and not fitted.mismatch:
            self._warn(
                "all_masked", "%s: no supervised token left (the context ends before the first answer)", rec.where
            )
        return {
            "input_ids": torch.tensor(fitted.input_ids, dtype=torch.long),
            "labels": torch.tensor(fitted.labels, dtype=torch.long),
            "image": image,
            "id": rec.id,
        }

    def _load_image(self, name: str) -> Image.Image:
        path = self.image_folder / name
        if not path.is_file():
            raise ImageDecodeError("missing", str(path))
        return to_rgb(read_image(path), key=str(path))


# ------------------------------------------------------------------------------------------------------------ batches


class LlavaCollator:
    """Items of :class:`LlavaDataset` -> a right-padded batch.

    Returns a dict: ``input_ids`` [B, T] long (padded with ``pad_token_id``), ``labels`` [B, T] long (padded with
    :data:`IGNORE_INDEX`), ``attention_mask`` [B, T] long (1 on real tokens), ``images`` [B, 3, H, W] float (zeros
    for text-only samples), ``image_present`` [B] bool and ``ids`` (list of sample ids). T is the longest row,
    rounded up to ``pad_to_multiple_of``.
    """

    def __init__(self, pad_token_id: int, image_size: tuple[int, int], pad_to_multiple_of: int = 1) -> None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
        self.pad_token_id = int(pad_token_id)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        b = len(items)
        longest = max((len(it["input_ids"]) for it in items), default=0)
        t = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        images = torch.zeros((b, 3, *self.image_size), dtype=torch.float32)
        present = torch.zeros(b, dtype=torch.bool)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = it["input_ids"]
            labels[row, :n] = it["labels"]
            attention_mask[row, :n] = 1
            if it["image"] is not None:
                if tuple(it["image"].shape) != (3, *self.image_size):
                    raise ValueError(
                        f"sample {it['id']!r}: image of shape {tuple(it['image'].shape)}, "
                        f"expected {(3, *self.image_size)}"
                    )
                images[row] = it["image"]
                present[row] = True
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "images": images,
            "image_present": present,
            "ids": [it["id"] for it in items],
        }


class LlavaLoader(IndexLoader):
    """Epochs of batches over a :class:`LlavaDataset`: the :class:`~vlkit.data.index_loader.IndexLoader` (seeded
    shuffling, whole batches dealt to data-parallel ranks, an exact resumable position, skip counters) with a
    :class:`LlavaCollator`.

    Args:
        dataset: the dataset.
        batch_size: samples per batch (per rank).
        collate: a :class:`LlavaCollator`.
        shuffle: permute each epoch (False: file order).
        seed: the shuffling seed.
        rank, world_size: this rank and the data-parallel size.
        num_workers: DataLoader worker processes.
        drop_last: deal only full batches (every step then has the same batch size); False pads the epoch so every
            rank gets ``ceil(n / world_size)`` samples, the last batch smaller.
    """

    def __init__(
        self,
        dataset: LlavaDataset,
        batch_size: int,
        collate: LlavaCollator,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            batch_size,
            collate=collate,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
            name=getattr(dataset, "source", "the LLaVA data"),
        )


def build_llava_dataset(
    data: Any,
    split: str,
    tokenizer: Any,
    vision: Any,
    *,
    context_length: int,
    image_tokens: int,
    default_template: str | None = None,
    strict: bool = False,
) -> LlavaDataset:
    """A :class:`LlavaDataset` from the ``data`` section of a config (``DataConfig``).

    Args:
        data: ``cfg.data``: ``train_path`` / ``val_path``, ``conv_template``, ``image_folder``,
            ``image_aspect_ratio``, ``is_multimodal``, ``lazy_preprocess``, ``sep_image_conv_front``.
        split: ``"train"`` or ``"val"``.
        tokenizer: the LLM's tokenizer (``HFTokenizer``) or a ready :class:`ConversationTokenizer`.
        vision: the vision tower's config (image size, mean, std).
        context_length: the LLM context (``model.llm.encoder_seq_length``).
        image_tokens: positions per image after splicing (:func:`image_token_count`).
        default_template: the template when ``data.conv_template`` is null: the LLM's ``model_type``.
    """
    path = data.train_path if split == "train" else data.val_path
    if not path:
        raise DataError(f"data.{'train' if split == 'train' else 'val'}_path is not set (a LLaVA .json/.jsonl file)")
    name = data.conv_template or default_template
    if not name:
        raise DataError("data.conv_template is not set and no default was given (the LLM's model_type)")
    if not isinstance(tokenizer, ConversationTokenizer):
        tokenizer = ConversationTokenizer(tokenizer, name)
    return LlavaDataset(
        path,
        tokenizer,
        image_transform(vision, data.image_aspect_ratio),
        max_length=context_length,
        image_tokens=image_tokens,
        image_folder=data.image_folder,
        lazy_preprocess=data.lazy_preprocess,
        is_multimodal=data.is_multimodal,
        sep_image_conv_front=data.sep_image_conv_front,
        strict=strict,
    )

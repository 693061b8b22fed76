"""Image-text retrieval: recall@k and mean / median rank in both directions, with several captions per image.

Definitions (COCO / Flickr30k practice; names as CLIP_benchmark's):

- ``text_retrieval_*`` (image -> text): an image's rank is the position of its *best-placed* true caption among all
  captions; recall@k is the share of images whose rank is <= k (a hit if any true caption is in the top k).
- ``image_retrieval_*`` (text -> image): a caption's rank is the position of its image among all images.

Ranks start at 1. Ties count against the model: a false candidate scoring the same as the true one is placed
before it (a model that maps everything to one point gets no recall rather than perfect recall).

The similarity matrix is never held whole: it is computed in ``chunk_size x chunk_size`` blocks, each block counting,
for both directions at once, how many false candidates score at least as high as the true one. Memory is
O((images + captions) x D + chunk_size^2), so 25k images x 125k captions needs no more than one block.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.eval.data import no_samples_error, open_eval_data, progress_bar, skipped_counts
from vlkit.eval.distributed import (
    Shard,
    all_gather_counts,
    all_gather_objects,
    all_gather_rows,
    all_reduce_sum,
    lockstep,
)
from vlkit.eval.results import EvalResult, model_names
from vlkit.eval.runtime import autocast, eval_mode, image_size, prepare_clip_eval

TASK = "zeroshot_retrieval"
DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 4096


def _true_scores(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each text's score with its own image [Nt], each image's best score with its own texts [Ni])."""
    text_true = torch.empty(len(text_features), dtype=text_features.dtype, device=text_features.device)
    for s in range(0, len(text_features), chunk_size):
        owners = image_features[text_to_image[s : s + chunk_size]]
        text_true[s : s + chunk_size] = (text_features[s : s + chunk_size] * owners).sum(-1)
    best = torch.full((len(image_features),), float("-inf"), dtype=text_true.dtype, device=text_true.device)
    best.scatter_reduce_(0, text_to_image, text_true, reduce="amax")
    return text_true, best


def _outranking_counts(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_to_image: torch.Tensor,
    text_true: torch.Tensor,
    image_best: torch.Tensor,
    image_offset: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """False candidates scoring at least the true score: per image (over all texts) and per text (over ``images``).

    ``images`` are rows ``image_offset ...`` of the global image list, so a rank can count its own images against
    every text; the per-text counts are then summed over ranks.
    """
    n_img, n_txt = len(images), len(texts)
    per_image = torch.zeros(n_img, dtype=torch.long, device=images.device)
    per_text = torch.zeros(n_txt, dtype=torch.long, device=images.device)
    for r in range(0, n_img, chunk_size):
        rows = images[r : r + chunk_size]
        row_ids = torch.arange(r, r + len(rows), device=images.device) + image_offset
        best = image_best[r : r + chunk_size, None]
        for c in range(0, n_txt, chunk_size):
            sim = rows @ texts[c : c + chunk_size].T
            false = row_ids[:, None] != text_to_image[None, c : c + chunk_size]
            per_image[r : r + len(rows)] += ((sim >= best) & false).sum(1)
            per_text[c : c + chunk_size] += ((sim >= text_true[None, c : c + chunk_size]) & false).sum(0)
    return per_image, per_text


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {image_features.shape} and {text_features.shape}")
    if text_to_image.shape != (len(text_features),):
        raise ValueError(f"text_to_image must be [{len(text_features)}] (one per text), got {text_to_image.shape}")
    n = len(image_features)
    if len(text_to_image) and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n):
        raise ValueError(f"text_to_image holds an index outside the {n} images")
    lonely = torch.bincount(text_to_image, minlength=n) == 0
    if lonely.any():
        raise ValueError(f"image {int(lonely.nonzero()[0])} has no text: every image needs at least one caption")


def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks: (image -> text [N_img], the rank of each image's best true caption; text -> image [N_txt]).

    Args:
        image_features: [N_img, D]; compared by dot product (pass L2-normalised rows for cosine similarity).
        text_features: [N_txt, D].
        text_to_image: [N_txt] the image each text describes; every image needs at least one text.
        chunk_size: rows and columns of the similarity block computed at a time.
    """
    text_to_image = text_to_image.long().to(image_features.device)
    _check_inputs(image_features, text_features, text_to_image)
    text_true, image_best = _true_scores(image_features, text_features, text_to_image, chunk_size)
    per_image, per_text = _outranking_counts(
        image_features, text_features, text_to_image, text_true, image_best, 0, chunk_size
    )
    return per_image + 1, per_text + 1


def rank_metrics(
    image_to_text_ranks: torch.Tensor, text_to_image_ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@k, mean and median rank in both directions, under CLIP_benchmark's names.

    ``text_retrieval_*`` are image -> text (from ``image_to_text_ranks``), ``image_retrieval_*`` text -> image.
    """
    out: dict[str, float] = {}
    for prefix, ranks in (("image_retrieval", text_to_image_ranks), ("text_retrieval", image_to_text_ranks)):
        ranks = ranks.detach().cpu().double()
        for k in ks:
            out[f"{prefix}_recall@{k}"] = float((ranks <= k).double().mean())
        out[f"{prefix}_mean_rank"] = float(ranks.mean())
        out[f"{prefix}_median_rank"] = float(np.median(ranks.numpy()))
    return out


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """:func:`rank_metrics` of :func:`retrieval_ranks` (the arguments are those of the two)."""
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image, chunk_size=chunk_size)
    return rank_metrics(i2t, t2i, ks)


def sharded_ranks(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_to_image: torch.Tensor,
    shard: Shard,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`retrieval_ranks` over the union of every rank's images and texts (``text_to_image`` indexes this
    rank's images). Each rank counts its own images against all gathered texts; counts are summed.

    Returns:
        (image -> text ranks, text -> image ranks, global text_to_image), all ranks' rows in rank order.
    """
    text_to_image = text_to_image.long().to(images.device)
    _check_inputs(images, texts, text_to_image)
    text_true, image_best = _true_scores(images, texts, text_to_image, chunk_size)
    counts = all_gather_counts(len(images), shard)
    offset = sum(counts[: shard.rank])
    all_texts = all_gather_rows(texts, shard)
    all_owner = all_gather_rows(text_to_image + offset, shard)
    all_true = all_gather_rows(text_true, shard)
    per_image, per_text = _outranking_counts(images, all_texts, all_owner, all_true, image_best, offset, chunk_size)
    per_text = all_reduce_sum(per_text, shard)
    return all_gather_rows(per_image + 1, shard), per_text + 1, all_owner


def evaluate_retrieval(
    model: nn.Module,
    data: str | os.PathLike | Iterable,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    split: str | None = None,
    caption_key: str = "txt",
    batch_size: int = 64,
    num_workers: int = 2,
    precision: str = "auto",
    distributed: bool | None = None,
    group: Any = None,
    max_samples: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK,
    keep_features: bool = False,
    progress: bool = True,
    dataset_name: str | None = None,
    model_name: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> EvalResult:
    """Image <-> text retrieval of a CLIP model over image-caption data.

    Args:
        model: a CLIP model (also wrapped in DDP or FSDP2).
        data: webdataset shards (a directory, ``.tar``, brace range, glob or URL; a dataset root with a ``val/``
            split), or an iterable of batches: dicts with ``image`` [B, 3, H, W] and ``captions`` (a list of B lists
            of strings) or ``caption`` (B strings).
        tokenizer, transform, split, batch_size, num_workers, precision, distributed, group, max_samples, progress:
            as for :func:`vlkit.eval.zeroshot.evaluate_zeroshot`.
        caption_key: the shard member holding a sample's captions: ``txt`` (one caption per non-empty line) or
            ``json`` (a list of strings, or an object with a ``"captions"`` list or a ``"caption"`` string).
            Samples without a caption are left out.
        ks: the k of recall@k.
        chunk_size: similarity block size (rows and columns).
        keep_features: keep ``image_features`` / ``text_features`` (normalised, fp32, CPU) in ``details``.
        dataset_name, model_name, model_path: names for the report.

    Returns:
        An :class:`EvalResult` with ``image_retrieval_recall@k`` (text -> image), ``text_retrieval_recall@k``
        (image -> text), ``*_mean_rank``, ``*_median_rank``; details ``image_to_text_ranks``,
        ``text_to_image_ranks``, ``text_to_image``, ``keys`` (and the features when asked).
    """
    setup = prepare_clip_eval(
        model,
        "retrieval",
        "Retrieval needs a CLIP model.",
        distributed=distributed,
        group=group,
        precision=precision,
        progress=progress,
        transform=transform,
        tokenizer=tokenizer,
    )
    inner, shard, device, dtype, progress = setup.inner, setup.shard, setup.device, setup.dtype, setup.progress
    transform, tokenizer = setup.transform, setup.tokenizer
    ed = open_eval_data(
        data,
        transform=transform,
        batch_size=batch_size,
        shard=shard,
        captions=True,
        caption_key=caption_key,
        split=split,
        num_workers=num_workers,
        max_samples=max_samples,
    )

    images, texts, owners, keys = [], [], [], []
    dim = None
    with eval_mode(model), progress_bar(progress, ed.num_samples, "retrieval") as bar:
        for batch in lockstep(ed.batches, shard):
            captions = [] if batch is None else batch["captions"]
            keep = [i for i, c in enumerate(captions) if c]
            if not keep:  # out of data (or no captions): a throwaway forward keeps a sharded model's ranks in step
                with autocast(device, dtype):
                    f = inner.encode_image(torch.zeros(1, 3, *image_size(inner), device=device))
                    inner.encode_text(tokenizer([""]).to(device))
                dim = f.shape[-1]
                continue
            pixels = batch["image"] if len(keep) == len(captions) else batch["image"][keep]
            flat = [c for i in keep for c in captions[i]]
            base = sum(len(x) for x in images)
            owners += [base + j for j, i in enumerate(keep) for _ in captions[i]]
            keys += [batch["key"][i] for i in keep]
            with autocast(device, dtype):
                fi = inner.encode_image(pixels.to(device, non_blocking=True))
                ft = inner.encode_text(tokenizer(flat).to(device))
            images.append(F.normalize(fi.float(), dim=-1))
            texts.append(F.normalize(ft.float(), dim=-1))
            dim = fi.shape[-1]
            bar.update(len(captions))
    skipped = skipped_counts(ed, shard)
    total = sum(all_gather_counts(sum(len(x) for x in images), shard))
    if total == 0:
        raise no_samples_error(ed, skipped, f"retrieval needs images with captions (the shards' .{caption_key})")
    image_features = torch.cat(images) if images else torch.zeros(0, dim, device=device)
    text_features = torch.cat(texts) if texts else torch.zeros(0, dim, device=device)
    text_to_image = torch.tensor(owners, dtype=torch.long, device=device)
    i2t, t2i, global_owner = sharded_ranks(image_features, text_features, text_to_image, shard, chunk_size)
    details: dict[str, Any] = {
        "image_to_text_ranks": i2t.cpu(),
        "text_to_image_ranks": t2i.cpu(),
        "text_to_image": global_owner.cpu(),
        "keys": [k for part in all_gather_objects(keys, shard) for k in part],
    }
    if keep_features:
        details["image_features"] = all_gather_rows(image_features, shard).cpu()
        details["text_features"] = all_gather_rows(text_features, shard).cpu()
    model_label, pretrained = model_names(model_path, model_name)
    return EvalResult(
        task=TASK,
        metrics=rank_metrics(i2t, t2i, ks),
        dataset=dataset_name or ed.name,
        model=model_label,
        pretrained=pretrained,
        num_samples=len(i2t),
        info={"num_texts": len(t2i), "caption_key": caption_key, "skipped": skipped},
        details=details,
    )

"""Evaluation data: an ImageFolder, webdataset shards or batches given in Python, sharded over the ranks (an
ImageFolder: every ``world_size``-th sample; shards: the readers' part), and the counts of what was skipped."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.eval.distributed import Shard, all_gather_objects
from vlkit.eval.results import EvalUsageError

CLASSES_FILE = "classes.json"


@dataclass
class EvalData:
    """Batches to evaluate, as dicts: ``image`` [B, 3, H, W], ``label`` [B] (classification), ``captions``
    list[list[str]] (retrieval), ``key`` list[str].

    Attributes:
        name: the data as named in reports.
        kind: ``imagefolder``, ``shards`` or ``batches`` (an iterable given in Python).
        num_samples: this rank's samples when known (for the progress bar).
        classes: class names the data carries (an ImageFolder's, or a ``classes.json`` found next to the shards).
        classes_file: that ``classes.json``, if any.
        skipped: a callable returning counts of skipped samples per reason.
    """

    batches: Iterable[dict]
    name: str
    kind: str
    num_samples: int | None = None
    classes: list[str] | None = None
    classes_file: Path | None = None
    skipped: Callable[[], dict[str, int]] = dict


def find_classes_file(*folders: Path | None) -> Path | None:
    """The first ``classes.json`` in ``folders`` or their parents (a split folder's dataset root holds it)."""
    for folder in folders:
        if folder is None:
            continue
        for candidate in (folder / CLASSES_FILE, folder.parent / CLASSES_FILE):
            if candidate.is_file():
                return candidate
    return None


def is_shard_spec(text: str) -> bool:
    """Shard specs that are not a single local path: URLs, ``::`` lists, brace ranges, globs."""
    return text.startswith("pipe:") or "://" in text or "::" in text or any(c in text for c in "{*?[")


def resolve_data_location(data: str | os.PathLike, split: str | None = None) -> tuple[str, str, Path | None]:
    """(source spec, ``"shards"`` or ``"imagefolder"``, local folder or None) for a ``--data`` argument.

    A directory holding ``.tar`` files is a shard directory; otherwise an ImageFolder. ``split`` selects a sub-folder;
    without it, a directory with no shards but a ``val/`` sub-folder (what ``vlkit data shapes`` writes) means
    ``val/``. Give ``split="."`` to use the directory itself.

    Raises:
        EvalUsageError: the path does not exist, or is a file that is not a ``.tar`` shard.
    """
    text = os.fspath(data)
    if is_shard_spec(text):
        from vlkit.data.sources import expand_urls, is_remote

        try:
            urls = expand_urls(text.split("::")[0])
        except ValueError as e:
            raise EvalUsageError(f"--data {text}: {e}") from None
        folder = None if is_remote(urls[0]) else Path(urls[0]).parent
        return text, "shards", folder
    path = Path(text).expanduser()
    if not path.exists():
        raise EvalUsageError(f"--data {text}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise EvalUsageError(f"--data {text}: not a .tar shard, a shard spec or a directory")
        return str(path), "shards", path.parent
    if split not in (None, "", "."):
        path = path / split
        if not path.is_dir():
            raise EvalUsageError(f"--data {text} --split {split}: {path} is not a directory")
    elif split is None and not any(path.glob("*.tar")) and (path / "val").is_dir():
        path = path / "val"
    if any(path.glob("*.tar")):
        return str(path), "shards", path
    return str(path), "imagefolder", path


def open_eval_data(
    data: str | os.PathLike | Iterable,
    *,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    shard: Shard,
    labels: bool = False,
    captions: bool = False,
    caption_key: str = "txt",
    split: str | None = None,
    num_workers: int = 2,
    max_samples: int | None = None,
) -> EvalData:
    """Open ``data`` for one evaluation pass on this rank.

    Args:
        data: a path or shard spec (see :func:`resolve_data_location`), or an iterable of batches (dicts with
            ``image`` and ``label`` / ``captions`` (or ``caption``), or ``(images, labels)`` pairs), used as is: the
            caller shards it.
        transform: PIL image -> tensor (the model's eval transform).
        batch_size: images per batch.
        shard: this rank's place; rank ``r`` of ``n`` reads its ``1/n`` of the samples.
        labels: the evaluation needs class labels (ImageFolder folders, or shards' ``cls`` member).
        captions: the evaluation needs captions (shards' ``caption_key`` member, see :func:`split_captions`).
        caption_key: the shard member holding the captions.
        split: see :func:`resolve_data_location`.
        num_workers: DataLoader workers.
        max_samples: evaluate at most this many samples in all (each rank its ``ceil(max_samples / n)``).
    """
    if not isinstance(data, (str, os.PathLike)):
        return EvalData(batches=_normalise_batches(data), name="batches", kind="batches")
    if batch_size < 1:
        raise EvalUsageError(f"batch size must be >= 1, got {batch_size}")
    spec, kind, folder = resolve_data_location(data, split)
    classes_file = find_classes_file(folder)
    if kind == "imagefolder":
        if captions:
            raise EvalUsageError(f"--data {data}: retrieval needs webdataset shards with captions, not an ImageFolder")
        return _imagefolder_data(spec, classes_file, transform, batch_size, shard, num_workers, max_samples, data)
    return _shard_data(
        spec, classes_file, transform, batch_size, shard, labels, captions, caption_key, num_workers, max_samples, data
    )


def _imagefolder_data(spec, classes_file, transform, batch_size, shard, num_workers, max_samples, name) -> EvalData:
    from torch.utils.data import DataLoader, Subset

    from vlkit.data.imagefolder import ImageFolder

    try:
        dataset = ImageFolder(spec, transform=transform, classes=classes_file)
    except (FileNotFoundError, ValueError) as e:
        raise EvalUsageError(f"--data {name}: {e}") from None
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = list(range(shard.rank, total, shard.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    root = Path(spec)

    def batches() -> Iterator[dict]:
        start = 0
        for images, targets in loader:
            n = len(targets)
            keys = [os.path.relpath(dataset.samples[i][0], root) for i in indices[start : start + n]]
            start += n
            yield {"image": images, "label": targets, "key": keys}

    return EvalData(
        batches=batches(),
        name=os.fspath(name),
        kind="imagefolder",
        num_samples=len(indices),
        classes=list(dataset.classes),
        classes_file=classes_file,
        skipped=lambda: dataset.skipped,
    )


def _shard_data(
    spec, classes_file, transform, batch_size, shard, labels, captions, caption_key, num_workers, max_samples, name
) -> EvalData:
    from vlkit.data.imagefolder import read_class_index
    from vlkit.data.shards import ShardDataset
    from vlkit.data.stream import ShardLoader

    try:
        dataset = ShardDataset(
            spec,
            batch_size=batch_size,
            image_transform=transform,
            tokenizer=None,
            text_key=caption_key if captions else None,
            label_key="cls" if labels else None,
            shuffle=False,
            rank=shard.rank,
            world_size=shard.world_size,
        )
    except ValueError as e:
        raise EvalUsageError(f"--data {name}: {e}") from None
    # Fewer shards than readers is fine for evaluation (readers then split shards sample by sample).
    workers = min(num_workers, max(1, len(dataset.shard_list()) // shard.world_size))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="only .* shard")
        loader = ShardLoader(dataset, num_workers=workers, equal_batches=False)
    per_rank = None if max_samples is None else math.ceil(max_samples / shard.world_size)
    known = dataset.num_samples
    if known is not None:
        known = len(range(shard.rank, known, shard.world_size))
    if per_rank is not None:
        known = per_rank if known is None else min(known, per_rank)

    def batches() -> Iterator[dict]:
        seen = 0
        for batch in loader:
            if per_rank is not None and seen + len(batch["key"]) > per_rank:
                batch = {k: v[: per_rank - seen] for k, v in batch.items()}
            seen += len(batch["key"])
            if captions:
                batch["captions"] = [split_captions(c, caption_key) for c in batch.pop("caption")]
            if batch["key"]:
                yield batch
            if per_rank is not None and seen >= per_rank:
                return

    try:
        classes = read_class_index(classes_file)[0] if classes_file is not None else None
    except ValueError as e:
        raise EvalUsageError(str(e)) from None
    return EvalData(
        batches=batches(),
        name=os.fspath(name),
        kind="shards",
        num_samples=known,
        classes=classes,
        classes_file=classes_file,
        skipped=lambda: dict(loader.metrics["skipped"]),
    )


def split_captions(raw: str, caption_key: str = "txt") -> list[str]:
    """The captions of one sample.

    A ``json`` member holds a list of strings, or an object with a ``"captions"`` list or a ``"caption"`` string;
    any other member (``txt``) holds one caption per non-empty line.
    """
    if caption_key.split(".")[-1] == "json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return []
        if isinstance(data, dict):
            data = data.get("captions", data.get("caption"))
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            return []
        return [c.strip() for c in data if isinstance(c, str) and c.strip()]
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _normalise_batches(batches: Iterable) -> Iterator[dict]:
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = {"image": batch[0], "label": batch[1]}
        batch = dict(batch)
        if "captions" not in batch and "caption" in batch:
            batch["captions"] = [[c] if isinstance(c, str) else list(c) for c in batch.pop("caption")]
        batch.setdefault("key", [""] * len(batch["image"]))
        yield batch


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def skipped_counts(data: EvalData, shard: Shard) -> dict[str, int]:
    """Skipped samples per reason, summed over the ranks."""
    total: dict[str, int] = {}
    for part in all_gather_objects(dict(data.skipped()), shard):
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + int(n)
    return total


def no_samples_error(data: EvalData, skipped: dict[str, int], needs: str) -> EvalUsageError:
    detail = f" (skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))})" if skipped else ""
    return EvalUsageError(f"--data {data.name}: no usable samples{detail}; {needs}")

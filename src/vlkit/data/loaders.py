"""Building a loader from a ``data:`` config section (webdataset shards or a CSV list)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vlkit.data.csvdata import CsvDataset
from vlkit.data.shards import ShardDataset
from vlkit.data.stream import ShardLoader


def loader_from_config(
    data_cfg: Any,
    *,
    batch_size: int,
    image_transform: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    train: bool = True,
    seed: int = 0,
    label_key: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ShardLoader:
    """Build the loader a ``data:`` config section describes (``kind`` webdataset or csv).

    Keys used: ``train_path`` / ``val_path``, ``dataset_size``, ``num_workers``, ``shuffle_buffer``, ``resampled``,
    ``image_key``, ``text_key``. Evaluation (``train=False``) reads every sample once, in order, unshuffled.
    ``rank`` / ``world_size``: the data-parallel coordinates (this reader's part of the data).
    """
    path = data_cfg.train_path if train else data_cfg.val_path
    if not path:
        raise ValueError(f"data.{'train' if train else 'val'}_path is not set")
    common = dict(
        batch_size=batch_size,
        image_transform=image_transform,
        tokenizer=tokenizer,
        seed=seed,
        shuffle=train,
        shuffle_buffer=data_cfg.shuffle_buffer,
        resampled=bool(data_cfg.resampled) and train,
        label_key=label_key,
        num_samples=data_cfg.dataset_size if train else None,
        rank=rank,
        world_size=world_size,
    )
    if data_cfg.kind == "csv":
        dataset = CsvDataset(path, **common)
    else:
        dataset = ShardDataset(path, image_key=data_cfg.image_key, text_key=data_cfg.text_key, **common)
    return ShardLoader(dataset, num_workers=data_cfg.num_workers, equal_batches=None if train else False)

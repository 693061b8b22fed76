"""The resumable loaders at an epoch's edge: a checkpoint saved right after an epoch's last batch resumes into the
next epoch exactly as an uninterrupted run goes on (through the trainer's endless batch stream), and the index
loader reads an ImageFolder position saved before it existed."""

import os

import pytest
import torch
from PIL import Image

from vlkit.data.index_loader import STATE_VERSION, IndexLoader
from vlkit.train.trainer import Trainer


class _Holder:
    """What Trainer._batches needs of the trainer: its loader."""

    def __init__(self, loader):
        self.loader = loader


def _stream(loader):
    return Trainer._batches(_Holder(loader))


def test_an_index_loader_saved_at_an_epoch_end_resumes_into_the_next_epoch():
    def make():
        return IndexLoader(torch.arange(16).float(), batch_size=4, seed=3)

    saved, uninterrupted = make(), _stream(make())
    first = _stream(saved)
    for _ in range(4):  # exactly one epoch
        next(first)
        next(uninterrupted)
    resumed = make()
    resumed.load_state_dict(saved.state_dict())
    assert resumed.state_dict()["position"] == 4  # the epoch is over but has not advanced yet
    stream = _stream(resumed)
    for _ in range(5):
        assert torch.equal(next(stream), next(uninterrupted))


def test_a_shard_loader_saved_at_an_epoch_end_resumes_into_the_next_epoch(tmp_path):
    from vlkit.data.csvdata import CsvDataset
    from vlkit.data.stream import ShardLoader

    rows = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        rows.append(f"{path},caption {i}")
    (tmp_path / "data.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")

    def make():
        dataset = CsvDataset(os.fspath(tmp_path / "data.csv"), batch_size=2, tokenizer=None, rows_per_part=2,
                             image_transform=lambda image: torch.zeros(3, 4, 4))  # fmt: skip
        return ShardLoader(dataset, num_workers=0)

    saved, uninterrupted = make(), _stream(make())
    first = _stream(saved)
    for _ in range(4):  # one epoch of 4 batches
        next(first)
        next(uninterrupted)
    resumed = make()
    resumed.load_state_dict(saved.state_dict())
    stream = _stream(resumed)
    for _ in range(3):
        assert next(stream)["key"] == next(uninterrupted)["key"]


def test_data_that_yields_nothing_still_fails():
    with pytest.raises(RuntimeError, match="yielded no batch"):
        next(_stream([]))


def test_an_imagefolder_position_saved_before_the_index_loader_resumes():
    loader = IndexLoader(list(range(100)), batch_size=4, world_size=2, rank=0, drop_last=True)
    old = {"epoch": 1, "position": 3, "seed": 0, "rank": 0, "world_size": 2, "num_samples": 100}
    loader.load_state_dict(old)
    assert (loader.epoch, loader.position) == (1, 3)
    with pytest.raises(ValueError, match="saved num_samples=99"):
        loader.load_state_dict({**old, "num_samples": 99})
    with pytest.raises(ValueError, match="saved version=1"):  # LLaVA's sample-level dealing: another order
        loader.load_state_dict({**old, "version": 1, "batch_size": 4})
    assert STATE_VERSION == 2

"""One resumable loader for map-style datasets (ImageFolder, LLaVA conversations): indices -> batches.

Each epoch the sample indices are permuted by ``(seed, epoch)`` (the same permutation on every rank) and cut into
batches of ``batch_size``; batch ``i`` of the epoch goes to data-parallel rank ``i % world_size``. Dealing whole
batches (rather than samples) keeps a batch's content independent of the layout: with the same batch size, one
process accumulating ``n`` micro-batches sees the very batches that ``n`` data-parallel ranks see, so batch-level
random draws keyed by the batch's number (mixup's ``mix_seed``) agree too. Every rank takes the same number of steps:

- ``drop_last=True``: only full rounds of ``world_size`` batches are dealt; the remainder waits for another epoch.
- ``drop_last=False``: the order is padded (repeating its first samples) so every rank gets ``ceil(n / world_size)``
  samples; the last, partial round is split into ``world_size`` equal smaller batches.

The position is ``(epoch, batches consumed)``; a resumed loader yields exactly what an uninterrupted one would next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlkit.data.stream import sample_seed, seeded

STATE_VERSION = 2  # 1: LlavaLoader's sample-level dealing (another batch order); refused rather than misread


class SeededSample:
    """``dataset[index]`` with torch's and Python's RNGs seeded by ``(seed, epoch, tag, index)``.

    A resumed run then draws the random augmentations an uninterrupted one would have, whichever worker loads the
    sample. A class rather than a closure, so that DataLoader workers can be started by pickling it.
    """

    def __init__(self, dataset: Any, seed: int, tag: str) -> None:
        self.dataset, self.seed, self.tag = dataset, seed, tag

    def __call__(self, epoch: int, index: int) -> Any:
        with seeded(sample_seed(self.seed, epoch, self.tag, index)):
            return self.dataset[index]


class _EpochSamples(Dataset):
    """The dataset as the DataLoader sees it in one epoch: ``sample(epoch, i)`` (or ``dataset[i]``)."""

    def __init__(self, dataset: Any, sample: Callable[[int, int], Any] | None, epoch: int) -> None:
        self.dataset, self.sample, self.epoch = dataset, sample, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index] if self.sample is None else self.sample(self.epoch, index)


class IndexLoader:
    """Epochs of batches over a map-style dataset, with an exact, resumable position (see the module docstring).

    Args:
        dataset: anything with ``len()`` and ``[index]``; its ``skipped`` (reason -> count), if any, is reported by
            :meth:`counters`.
        batch_size: samples per batch (per rank).
        collate: list of samples -> batch (None: torch's default collation).
        sample: ``(epoch, index) -> sample`` used instead of ``dataset[index]`` (e.g. :class:`SeededSample`).
        shuffle: permute each epoch (False: dataset order).
        seed: the shuffling seed.
        rank, world_size: this rank and the data-parallel size (the trainer's ``dp`` coordinates).
        num_workers, pin_memory: passed to torch's DataLoader.
        drop_last: see the module docstring.
        name: what the data is called in errors (e.g. its directory).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        collate: Callable[[list[Any]], Any] | None = None,
        sample: Callable[[int, int], Any] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        name: str = "the dataset",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.dataset, self.batch_size, self.collate, self.sample = dataset, batch_size, collate, sample
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            hint = "; use a smaller batch or drop_last=False" if drop_last else ""
            raise ValueError(
                f"{name}: {len(dataset)} samples do not fill one batch of {batch_size} on each of {world_size} "
                f"rank(s){hint}"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n, b, w = len(self.dataset), self.batch_size, self.world_size
        return n // (b * w) if self.drop_last else math.ceil(math.ceil(n / w) / b)

    def _order(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()

    def _numbered_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """This rank's batches of ``epoch``: (the batch's number in the epoch, its sample indices)."""
        order, b, w = self._order(epoch), self.batch_size, self.world_size
        if self.drop_last:
            rounds = len(order) // (b * w)
        else:
            per_rank = math.ceil(len(order) / w)
            order += [order[i % len(order)] for i in range(per_rank * w - len(order))]
            rounds = per_rank // b
        out = [(i, order[i * b : (i + 1) * b]) for i in range(self.rank, rounds * w, w)]
        tail = order[rounds * b * w :] if not self.drop_last else []
        if tail:  # a multiple of world_size after padding: an equal smaller batch for each rank
            k = len(tail) // w
            out.append((rounds * w + self.rank, tail[self.rank * k : (self.rank + 1) * k]))
        return out

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The sample indices of each of this rank's batches in ``epoch``."""
        return [indices for _, indices in self._numbered_batches(epoch)]

    def finish(self, batch: Any, indices: list[int], number: int) -> Any:
        """Hook: the batch as yielded, given its sample indices and its number in the epoch (here: unchanged)."""
        return batch

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch (from the restored position), then the epoch advances."""
        numbered = self._numbered_batches(self.epoch)
        if self.position >= len(numbered):  # saved right after the epoch's last batch, before it advanced
            self.epoch, self.position = self.epoch + 1, 0
            numbered = self._numbered_batches(self.epoch)
        numbered = numbered[self.position :]
        loader = DataLoader(
            _EpochSamples(self.dataset, self.sample, self.epoch),
            batch_sampler=[indices for _, indices in numbered],
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, and a resumed
            # run (which starts a new iterator mid-epoch) would shift the training loop's random stream (mixup).
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch),
        )
        for (number, indices), batch in zip(numbered, loader):
            self.position += 1
            yield self.finish(batch, indices, number)
        self.epoch, self.position = self.epoch + 1, 0

    def counters(self) -> dict[str, dict[str, int]]:
        """Skipped samples so far by reason (the dataset replaces or drops them; nothing is repaired)."""
        return {"skipped": dict(getattr(self.dataset, "skipped", {})), "repaired": {}}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": len(self.dataset),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved with another seed, dataset size, batch size or world
        size (the batch order would differ), or by another version of this loader. A state without a version is the
        ImageFolder loader's from before this class (the same batch order; its batch size is the config's, which
        resuming checks)."""
        if "version" not in state and {"seed", "world_size", "num_samples"} <= set(state):
            state = {**state, "version": STATE_VERSION, "batch_size": self.batch_size}
        for key, mine in self.state_dict().items():
            if key not in ("epoch", "position") and state.get(key) != mine:
                saved = state.get(key)
                raise ValueError(f"cannot resume the data position: saved {key}={saved!r}, this loader has {mine!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

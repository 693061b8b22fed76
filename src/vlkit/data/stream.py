"""The generic resumable stream engine: parts -> shuffled blocks -> samples -> batches, with an exact position.

A :class:`StreamDataset` reads a list of *parts* (tar shards in :mod:`vlkit.data.shards`, row ranges of a CSV file in
:mod:`vlkit.data.csvdata`); a subclass says how to list and read them. The stream is a pure function of
``(seed, epoch, rank, worker, shard, sample index)``, so a run resumed from :meth:`ShardLoader.state_dict` yields
exactly the batches an uninterrupted run would have yielded next:

1. **Shard order.** Each epoch the shard list is permuted by ``Random(f"{seed}:{epoch}")`` (the same on every rank)
   and dealt to the ``world_size x num_workers`` readers, reader ``rank * num_workers + worker`` taking every
   (readers)-th shard. With fewer shards than readers, readers share a shard and each keeps every k-th sample of it,
   so every sample is still read exactly once per epoch (at the price of reading such shards several times; a
   warning says so). In resampled mode each reader instead draws shards with replacement from its own
   ``Random(f"{seed}:{epoch}:{reader}")``: first a source by weight, then a shard of that source uniformly.
2. **Shuffle.** A reader cuts its stream of raw (undecoded) samples into blocks of ``shuffle_buffer`` samples and
   permutes each block with ``Random(f"{seed}:{epoch}:{reader}:{block}")``. Unlike a reservoir buffer, a block has a
   known start, so a position is "block *b* starting at (shard *p*, sample *j*), *m* samples of it consumed".
3. **Augmentation.** Before a sample is transformed, torch's and Python's RNGs are seeded from
   ``(seed, epoch, shard, sample index)``, so a random crop does not depend on which worker made it (or when).
4. **Batches are made in the worker** and carry that worker's position and the skips since its previous batch;
   :class:`ShardLoader` reads them off in the main process. The DataLoader takes batches from its workers round-robin,
   so on resume the workers are renamed (rotated) so that the first one asked is the one that was due next.

Bad input never stops the stream. A sample that cannot be used is skipped with one warning naming its shard and key
and counted by reason in :attr:`ShardLoader.metrics`; a shard that cannot be opened, or breaks off (truncated), is
reported by path after its good samples, and the run continues with the next shard.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import logging
import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlkit.data.sources import Source

logger = logging.getLogger("vlkit.data")

DEFAULT_TEXT_KEY = "txt"
STATE_VERSION = 1
_META = "_vlkit"  # the key under which a worker's batch carries its position and skips to the main process
_UNSAFE_KEY = re.compile(r"^[/\\]|^[A-Za-z]:|\0")


# --------------------------------------------------------------------------------------------------------------------
# Decoding


def default_decode(data: bytes, key: str = "") -> Any:
    """Decode image bytes to an RGB PIL image (``vlkit.data.images``: size limits, 16-bit and alpha handled)."""
    from vlkit.data.images import decode_image, to_rgb

    return to_rgb(decode_image(data, key))


# --------------------------------------------------------------------------------------------------------------------
# Records and read errors (what a part yields)


class ShardError(Exception):
    """A shard that could not be opened ("unreadable") or broke off part-way ("truncated")."""

    def __init__(self, url: str, reason: str, message: str):
        super().__init__(f"{url}: {reason}: {message}")
        self.url, self.reason, self.message = url, reason, message


class Record(NamedTuple):
    """A raw sample: its index in its shard, its key and its members (extension -> bytes, or TOO_LARGE)."""

    index: int
    key: str
    fields: dict


TOO_LARGE = object()


def is_unsafe_key(key: str) -> bool:
    """Keys that could escape a directory if someone used them as a file name (absolute, ``..``, NUL)."""
    return bool(_UNSAFE_KEY.search(key)) or ".." in key.replace("\\", "/").split("/")


# --------------------------------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class Part:
    """What one reader reads of one shard: samples ``index % stride == phase``."""

    url: str
    phase: int = 0
    stride: int = 1


@dataclass
class _WorkerPos:
    part: int = 0  # index in the reader's sequence of parts, where the current block starts
    offset: int = 0  # samples of that shard before the current block
    block: int = 0
    emitted: int = 0  # samples of the current block consumed
    batches: int = 0
    done: bool = False
    shard: str = ""  # for people reading the state: the shard at the block start

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Tally:
    """Skips and shard errors a worker has not yet reported."""

    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    shard_errors: list = field(default_factory=list)

    def drain(self) -> dict:
        out = {"skipped": dict(self.skipped), "repaired": dict(self.repaired), "shard_errors": self.shard_errors}
        self.skipped, self.repaired, self.shard_errors = Counter(), Counter(), []
        return out


class StreamDataset(IterableDataset):
    """Shared machinery of the shard and CSV datasets: parts, blocks, decoding, batching and positions.

    Iterating it yields *transport* items: batches (plus end-of-stream markers) carrying their worker's position under
    the ``"_vlkit"`` key. Use it through :class:`ShardLoader`, which strips that key and tracks the position.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        image_transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        decode: Callable[[bytes, str], Any] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        text_key: str | None = DEFAULT_TEXT_KEY,
        label_key: str | None = None,
        num_samples: int | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.decode = decode or default_decode
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer) if shuffle else 1
        self.resampled = resampled
        self.text_key = text_key
        self.label_key = label_key
        self.num_samples = num_samples
        self.drop_last = drop_last
        # The caller's data-parallel coordinates (the trainer's mesh): never the global rank, which would give
        # tensor-parallel peers different batches.
        self.rank = rank
        self.world_size = world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        # Set by ShardLoader: batches per worker per epoch (None: until the shards run out), and where to resume.
        self.batches_per_worker: int | None = None
        self.epoch = 0
        self._resume: dict | None = None
        self._rotation = 0

    # ---- what subclasses provide

    def shard_list(self) -> list[str]:
        """All shards (or parts of a CSV), in their given order."""
        raise NotImplementedError

    def _sources(self) -> list[Source]:
        return [Source(spec="", urls=tuple(self.shard_list()))]

    def _read(self, url: str, skip: int) -> Iterator[Record]:
        raise NotImplementedError

    def _image_bytes(self, record: Record) -> tuple[bytes | None, str | None]:
        """(bytes, None) or (None, skip reason)."""
        raise NotImplementedError

    def _skip_detail(self, record: Record) -> str:
        return ""

    def _caption_bytes(self, record: Record) -> Any:
        return record.fields.get(self.text_key)

    # ---- shard order

    def epoch_order(self, epoch: int) -> list[str]:
        """The shard order of an epoch: a permutation from (seed, epoch), the same on every rank."""
        urls = list(self.shard_list())
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(urls)
        return urls

    def _parts(self, epoch: int, reader: int, readers: int) -> Iterator[Part]:
        if self.resampled:
            yield from self._resampled_parts(epoch, reader)
            return
        order = self.epoch_order(epoch)
        n = len(order)
        if n >= readers:
            parts = [Part(u) for u in order[reader::readers]]
        else:
            shard = reader % n
            parts = [Part(order[shard], phase=reader // n, stride=len(range(shard, readers, n)))]
        if self.batches_per_worker is None:
            yield from parts
        else:
            # A fixed number of batches per worker: a reader that runs out goes round its shards again, so that
            # every rank takes the same number of steps (distributed training hangs otherwise).
            yield from itertools.cycle(parts)

    def _resampled_parts(self, epoch: int, reader: int) -> Iterator[Part]:
        rng = random.Random(f"{self.seed}:{epoch}:{reader}")
        sources = self._sources()
        weights = [s.weight for s in sources]
        while True:
            source = rng.choices(sources, weights=weights)[0] if len(sources) > 1 else sources[0]
            yield Part(rng.choice(source.urls))

    # ---- one reader's raw stream, cut into shuffled blocks

    def _raw(self, parts: Iterator[Part], start: _WorkerPos, tally: _Tally) -> Iterator[tuple[int, Part, Record]]:
        empty_parts = 0
        limit = max(16, 4 * len(self.shard_list()))
        for p, part in enumerate(parts, start=start.part):
            produced = False
            skip = start.offset if p == start.part else 0
            try:
                for record in self._read(part.url, skip):
                    if record.index % part.stride == part.phase:
                        produced = True
                        yield p, part, record
            except ShardError as e:
                logger.warning("shard %s: %s (%s); continuing with the next shard", e.url, e.reason, e.message)
                tally.shard_errors.append({"shard": e.url, "reason": e.reason, "error": e.message})
            # In cyclic or resampled mode a reader whose shards are all empty or broken would spin forever.
            empty_parts = 0 if produced else empty_parts + 1
            if empty_parts >= limit and (self.resampled or self.batches_per_worker is not None):
                logger.warning("reader gave up: %d shards in a row had no readable sample", empty_parts)
                return

    def _blocks(self, raw: Iterator, start: _WorkerPos) -> Iterator[tuple[int, list, tuple, tuple]]:
        """(block index, permuted records, (part, offset, shard) at the block start, the same after the block)."""
        block_index, begin = start.block, (start.part, start.offset, start.shard)
        while True:
            block = list(itertools.islice(raw, self.shuffle_buffer))
            if not block:
                return
            begin = (begin[0], begin[1], block[0][1].url)  # for people reading the state: where the block starts
            last_p, last_part, last_rec = block[-1]
            end = (last_p, last_rec.index + 1, last_part.url)
            if self.shuffle and len(block) > 1:
                random.Random(f"{self.seed}:{self.epoch}:{self._reader}:{block_index}").shuffle(block)
            yield block_index, block, begin, end
            block_index, begin = block_index + 1, end

    # ---- turning a record into a sample

    def _prepare(self, url: str, record: Record, tally: _Tally) -> dict | None:
        key = record.key
        reason, detail = None, ""
        if is_unsafe_key(key):
            reason = "unsafe_key"
        else:
            data, reason = self._image_bytes(record)
            detail = self._skip_detail(record) if reason else ""
        caption = label = None
        if reason is None and self.text_key is not None:
            raw = self._caption_bytes(record)
            if raw is None:
                reason = "no_caption"
            elif raw is TOO_LARGE:
                reason = "too_large"
            else:
                if isinstance(raw, bytes):
                    try:
                        caption = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        # One bad byte should not cost an image; the caption keeps its readable words.
                        caption = raw.decode("utf-8", errors="replace")
                        tally.repaired["caption_not_utf8"] += 1
                        logger.warning("sample %r of %s: caption is not UTF-8; decoded with replacement", key, url)
                else:
                    caption = str(raw)
                caption = caption.strip()
                if not caption:
                    reason = "empty_caption"
        if reason is None and self.label_key is not None:
            raw = record.fields.get(self.label_key)
            if raw is None or raw is TOO_LARGE:
                reason = "no_label"
            else:
                try:
                    label = int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)
                except (ValueError, UnicodeDecodeError):
                    reason = "bad_label"
        image = None
        if reason is None:
            try:
                image = self.decode(data, key)
            except Exception as e:
                reason, detail = getattr(e, "reason", None) or "corrupt", f"{type(e).__name__}: {e}"
        if reason is None:
            try:
                with seeded(sample_seed(self.seed, self.epoch, url, record.index)):
                    tensor = self.image_transform(image)
            except Exception as e:
                reason, detail = "transform_error", f"{type(e).__name__}: {e}"
        if reason is not None:
            tally.skipped[reason] += 1
            logger.warning("skipped sample %r of %s: %s%s", key, url, reason, f" ({detail})" if detail else "")
            return None
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"image_transform must return a tensor, got {type(tensor).__name__}")
        return {"image": tensor, "caption": caption, "key": key, "label": label}

    def _collate(self, samples: list[dict]) -> dict:
        images = [s["image"] for s in samples]
        out = None
        if get_worker_info() is not None:
            # Stacking straight into shared memory saves the copy the worker would make to send the batch.
            out = images[0].new_empty((len(images), *images[0].shape)).share_memory_()
        batch: dict[str, Any] = {"image": torch.stack(images, out=out), "key": [s["key"] for s in samples]}
        if self.text_key is not None:
            captions = [s["caption"] for s in samples]
            batch["caption"] = captions
            if self.tokenizer is not None:
                batch["text"] = self.tokenizer(captions)
        if self.label_key is not None:
            batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch

    # ---- the worker loop

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = 1 if info is None else info.num_workers
        worker = 0 if info is None else (info.id + self._rotation) % num_workers
        self._reader = self.rank * num_workers + worker
        resume = self._resume or {}
        if resume and resume.get("num_workers", num_workers) != max(1, num_workers):
            raise ValueError("resume state was saved with a different number of workers")
        state = resume.get("workers", {}).get(str(worker))
        pos = _WorkerPos(**state) if state else _WorkerPos()
        if pos.done:
            return
        yield from self._worker_stream(worker, num_workers, pos)

    def _worker_stream(self, worker: int, num_workers: int, pos: _WorkerPos) -> Iterator[dict]:
        tally = _Tally()
        parts = itertools.islice(self._parts(self.epoch, self._reader, self.world_size * num_workers), pos.part, None)
        raw = self._raw(parts, pos, tally)
        pending: list[dict] = []
        quota = self.batches_per_worker

        def item(batch: dict, done: bool) -> dict:
            meta = {"worker": worker, "epoch": self.epoch, "n": len(batch.get("key", ())), "done": done}
            meta.update(pos=pos.to_dict(), **tally.drain())
            batch[_META] = meta
            return batch

        if quota is not None and pos.batches >= quota:
            pos.done = True
            yield item({}, True)
            return
        for block_index, block, begin, end in self._blocks(raw, pos):
            skip = pos.emitted if block_index == pos.block else 0
            for k in range(skip, len(block)):
                p, part, record = block[k]
                sample = self._prepare(part.url, record, tally)
                if k + 1 == len(block):
                    (pos.part, pos.offset, pos.shard), pos.block, pos.emitted = end, block_index + 1, 0
                else:
                    (pos.part, pos.offset, pos.shard), pos.block, pos.emitted = begin, block_index, k + 1
                if sample is None:
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    pos.batches += 1
                    batch, pending = self._collate(pending), []
                    if quota is not None and pos.batches >= quota:
                        pos.done = True
                        yield item(batch, True)
                        return
                    yield item(batch, False)
        if pending and not self.drop_last and quota is None:
            pos.batches += 1
            yield item(self._collate(pending), False)
        pos.done = True
        yield item({}, True)


# --------------------------------------------------------------------------------------------------------------------
# The loader: position tracking and metrics in the main process


def sample_seed(seed: int, epoch: int, url: str, index: int) -> int:
    """The seed of one sample's random augmentation: a function of where it is, not of who reads it when."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{url}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    # In a worker process the RNGs belong to the data pipeline; in the main process (num_workers=0) they belong to the
    # training loop, so they are put back afterwards.
    restore = get_worker_info() is None
    if restore:
        torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if restore:
            torch.random.set_rng_state(torch_state)
            random.setstate(py_state)


def _empty_metrics() -> dict:
    return {"samples": 0, "batches": 0, "skipped": {}, "repaired": {}, "shard_errors": {}}


class ShardLoader:
    """A DataLoader over a :class:`StreamDataset` that knows its position and counts what it skipped.

    Iterating it runs the rest of the current epoch (from the saved position, if any) and then advances to the next
    epoch. Batches are dicts: ``image`` [B, 3, H, W] float, ``text`` [B, context_length] long (when a tokenizer is
    given), ``caption`` list[str], ``key`` list[str], and ``label`` [B] long when ``label_key`` is set.

    Args:
        dataset: the dataset (its ``batch_size`` is the batch size).
        num_workers: DataLoader worker processes (0: in this process).
        equal_batches: give every worker the same number of batches per epoch, cycling its shards if it runs out,
            so that all ranks take the same number of steps. None: on when ``world_size > 1`` and the epoch size
            is known. Always on in resampled mode with a known size (otherwise resampled epochs are endless).
        pin_memory, prefetch_factor, multiprocessing_context: passed to torch's DataLoader.
    """

    def __init__(
        self,
        dataset: StreamDataset,
        *,
        num_workers: int = 2,
        equal_batches: bool | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        multiprocessing_context: Any = None,
    ):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.multiprocessing_context = multiprocessing_context
        workers = max(1, num_workers)
        readers = dataset.world_size * workers
        n_shards = len(dataset.shard_list())
        if not dataset.resampled and n_shards < readers:
            warnings.warn(
                f"only {n_shards} shard(s) for {dataset.world_size} rank(s) x {workers} worker(s) = {readers} readers: "
                "readers share shards sample by sample so every sample is still read once, but such shards are "
                "read several times. Write more (smaller) shards, use fewer workers, or set resampled=True.",
                stacklevel=2,
            )
        if equal_batches is None:
            equal_batches = dataset.resampled or dataset.world_size > 1
        if equal_batches and dataset.num_samples is None:
            if dataset.world_size > 1 and not dataset.resampled:
                warnings.warn(
                    "epoch size unknown (no sizes.json, no dataset_size): ranks may take different numbers of steps",
                    stacklevel=2,
                )
            equal_batches = False
        if equal_batches:
            per_step = dataset.batch_size * dataset.world_size * workers
            dataset.batches_per_worker = max(1, math.ceil(dataset.num_samples / per_step))
        self._fingerprint = hashlib.sha1("\n".join(dataset.shard_list()).encode()).hexdigest()[:16]
        self._epoch = 0
        self._workers: dict[str, dict] = {}
        self._next_worker = 0
        self._metrics = _empty_metrics()

    # ---- epoch and length

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration (a no-op if already positioned in it)."""
        if epoch != self._epoch:
            self._epoch, self._workers, self._next_worker = epoch, {}, 0

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch (all workers of this rank), or None when unknown (an estimate without equal_batches)."""
        ds = self.dataset
        if ds.batches_per_worker is not None:
            return ds.batches_per_worker * max(1, self.num_workers)
        if ds.num_samples is None or ds.resampled:
            return None
        per_rank = ds.num_samples / ds.world_size / ds.batch_size
        return math.floor(per_rank) if ds.drop_last else math.ceil(per_rank)

    # ---- iteration

    def __iter__(self) -> Iterator[dict]:
        ds = copy.copy(self.dataset)
        ds.epoch = self._epoch
        ds._resume = {"num_workers": max(1, self.num_workers), "workers": copy.deepcopy(self._workers)}
        ds._rotation = self._next_worker
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None,
        )
        for item in loader:
            meta = item.pop(_META)
            self._absorb(meta)
            if meta["n"]:
                yield item
        self.set_epoch(self._epoch + 1)

    def _absorb(self, meta: dict) -> None:
        w = meta["worker"]
        self._workers[str(w)] = meta["pos"]
        self._next_worker = (w + 1) % max(1, self.num_workers)
        m = self._metrics
        if meta["n"]:
            m["samples"] += meta["n"]
            m["batches"] += 1
        for group in ("skipped", "repaired"):
            for reason, count in meta[group].items():
                m[group][reason] = m[group].get(reason, 0) + count
        for err in meta["shard_errors"]:
            entry = m["shard_errors"].setdefault(err["shard"], {"reason": err["reason"], "error": err["error"]})
            entry["count"] = entry.get("count", 0) + 1

    # ---- position and metrics

    def counters(self) -> dict[str, dict[str, int]]:
        """Skipped and repaired samples by reason so far (what the trainer logs)."""
        return {"skipped": dict(self._metrics["skipped"]), "repaired": dict(self._metrics["repaired"])}

    @property
    def metrics(self) -> dict:
        """Counts since construction (or the restored state), aggregated over workers:

        ``{"samples": int, "batches": int, "skipped": {reason: int}, "repaired": {reason: int},
        "shard_errors": {shard: {"reason": "unreadable"|"truncated", "error": str, "count": int}}}``
        """
        out = copy.deepcopy(self._metrics)
        out["skipped_total"] = sum(out["skipped"].values())
        return out

    def state_dict(self) -> dict:
        """The position as a JSON-able dict (see docs/data.md, "Shards and loaders")."""
        return {
            "version": STATE_VERSION,
            "seed": self.dataset.seed,
            "epoch": self._epoch,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": max(1, self.num_workers),
            "next_worker": self._next_worker,
            "shards": self._fingerprint,
            "workers": copy.deepcopy(self._workers),
            "metrics": copy.deepcopy(self._metrics),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises:
            ValueError: when the state was saved with other shards, seed, rank, world size or number of workers.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        expected = {
            "seed": self.dataset.seed,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": max(1, self.num_workers),
            "shards": self._fingerprint,
        }
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(
                    f"cannot resume the data position: saved {name}={state.get(name)!r}, this loader has {value!r}"
                )
        self._epoch = int(state["epoch"])
        self._workers = copy.deepcopy(state["workers"])
        self._next_worker = int(state["next_worker"])
        self._metrics = _empty_metrics() | copy.deepcopy(state.get("metrics", {}))

"""Image-text webdataset shards: reading tar files and the :class:`ShardDataset` over them.

The batching, shuffling, resumable position and skip metrics are the generic stream engine's
(:mod:`vlkit.data.stream`: :class:`~vlkit.data.stream.StreamDataset`, :class:`~vlkit.data.stream.ShardLoader`);
this module only knows how to list tar shards and read their members. Building a loader from a ``data:`` config
section is :func:`vlkit.data.loaders.loader_from_config`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from vlkit.data.sources import Source, SourceSpec, dataset_size, has_weights, is_remote, parse_sources
from vlkit.data.stream import DEFAULT_TEXT_KEY, TOO_LARGE, Record, ShardError, ShardLoader, StreamDataset
from vlkit.data.tar import TarReader

DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp"
# A member larger than this is not read into memory; its sample is skipped as "too_large".
MAX_MEMBER_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------------------------------
# Reading tar shards


def open_url(url: str):
    """Open a shard for reading: local paths directly, ``pipe:``/http/gs/... via webdataset, other URLs via fsspec."""
    if not is_remote(url):
        return open(url, "rb")
    scheme = "pipe" if url.startswith("pipe:") else url.split("://", 1)[0]
    # webdataset's package namespace exports the gopen *function* under the module's name.
    gopen = importlib.import_module("webdataset.gopen")
    if scheme in gopen.gopen_schemes or scheme == "file":
        return gopen.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def split_name(name: str) -> tuple[str | None, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``): webdataset's rule, the key ends at the first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


def iter_tar(
    url: str,
    *,
    skip: int = 0,
    wanted: Callable[[str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[Record]:
    """Yield the samples of one tar shard in order, never extracting anything to disk.

    Members are grouped into samples by key (consecutive members with the same key). The first ``skip`` samples are
    counted but their data is not read, which is how a resumed reader gets back to its place cheaply.

    Args:
        url: shard path or URL.
        skip: samples to pass over at the start.
        wanted: predicate on a member's extension; other members are not read (e.g. ``json``, never decoded).
        max_member_bytes: members larger than this are not read; their extension maps to ``TOO_LARGE``.

    Raises:
        ShardError: after the good samples, when the shard cannot be opened or is truncated.
    """
    try:
        fileobj = open_url(url)
    except Exception as e:
        raise ShardError(url, "unreadable", f"{type(e).__name__}: {e}") from e
    index, key, fields = -1, None, {}
    reading = False  # inside a member's data: a break there leaves the current sample incomplete
    try:
        with fileobj:
            tar = TarReader(fileobj)
            for member in tar:
                if not member.is_file:
                    continue
                k, ext = split_name(member.name)
                if k is None or (k.startswith("__") and ext.endswith("__")):
                    continue
                if k != key or ext in fields:
                    if index >= skip and key is not None:
                        yield Record(index, key, fields)
                    index, key, fields = index + 1, k, {}
                if index < skip or (wanted is not None and not wanted(ext)):
                    fields[ext] = None  # marks the extension as seen, so a repeated one starts a new sample
                    continue
                if member.size > max_member_bytes:
                    fields[ext] = TOO_LARGE
                    continue
                reading = True
                fields[ext] = tar.read()
                reading = False
    except Exception as e:
        if key is not None and index >= skip and not reading:
            yield Record(index, key, fields)  # the break came between members: those read are complete
        reason = "truncated" if key is not None else "unreadable"
        raise ShardError(url, reason, f"{type(e).__name__}: {e}") from e
    if key is not None and index >= skip:
        yield Record(index, key, fields)


# --------------------------------------------------------------------------------------------------------------------
# The dataset


class ShardDataset(StreamDataset):
    """Image-text (or image-label) samples from webdataset tar shards.

    Args:
        source: shard spec(s), see :mod:`vlkit.data.sources` (paths, brace ranges, globs, directories, URLs, ``::``
            lists, weighted lists).
        batch_size: samples per batch (per rank).
        image_transform: PIL image -> tensor [3, H, W].
        tokenizer: list of captions -> LongTensor [B, context_length]; None leaves ``text`` out of the batch.
        weights: per-source weights (share of samples); resampled mode only.
        image_key: image extensions to look for, ``;``-separated, first present wins.
        text_key: caption extension; None for image-only (e.g. classification) shards.
        label_key: extension of an integer class label (``cls``), or None.
        num_samples: samples per epoch; None reads ``sizes.json`` next to the shards.
        decode: bytes, key -> RGB PIL image; raises an exception with ``.reason`` for a bad image.
        seed, shuffle, shuffle_buffer, resampled, drop_last, rank, world_size: see :class:`StreamDataset` and the
            module docstring.
    """

    def __init__(
        self,
        source: SourceSpec,
        *,
        batch_size: int,
        image_transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        weights: Sequence[float] | str | None = None,
        image_key: str = DEFAULT_IMAGE_KEY,
        text_key: str | None = DEFAULT_TEXT_KEY,
        label_key: str | None = None,
        num_samples: int | None = None,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        **kwargs: Any,
    ):
        self.sources = parse_sources(source, weights)
        resampled = kwargs.get("resampled", False)
        if has_weights(self.sources) and not resampled:
            raise ValueError("source weights need resampled=True: without resampling every shard is read once")
        self.urls = [u for s in self.sources for u in s.urls]
        self.image_exts = tuple(e.strip().lower() for e in image_key.split(";") if e.strip())
        if not self.image_exts:
            raise ValueError(f"no image extension in image_key={image_key!r}")
        self.max_member_bytes = max_member_bytes
        if num_samples is None:
            num_samples = dataset_size(self.urls)
        super().__init__(
            batch_size=batch_size,
            image_transform=image_transform,
            tokenizer=tokenizer,
            text_key=text_key,
            label_key=label_key,
            num_samples=num_samples,
            **kwargs,
        )
        self._wanted = set(self.image_exts) | {k for k in (text_key, label_key) if k}

    def shard_list(self) -> list[str]:
        return self.urls

    def _sources(self) -> list[Source]:
        return self.sources

    def _read(self, url: str, skip: int) -> Iterator[Record]:
        return iter_tar(url, skip=skip, wanted=self._wanted.__contains__, max_member_bytes=self.max_member_bytes)

    def _image_bytes(self, record: Record) -> tuple[bytes | None, str | None]:
        for ext in self.image_exts:
            data = record.fields.get(ext)
            if data is TOO_LARGE:
                return None, "too_large"
            if data is not None:
                return data, None
        return None, "no_image"


def build_shard_loader(
    source: SourceSpec,
    *,
    batch_size: int,
    image_transform: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    num_workers: int = 2,
    equal_batches: bool | None = None,
    pin_memory: bool = False,
    **dataset_kwargs: Any,
) -> ShardLoader:
    """Build a :class:`ShardLoader` over webdataset shards.

    Args:
        source: shard spec(s): path, brace range, glob, directory, URL, ``::``-list or weighted list.
        batch_size: samples per batch on this rank.
        image_transform: PIL image -> tensor [3, H, W] (e.g. ``vlkit.data.transforms.get_transform(model, train)``).
        tokenizer: list[str] -> LongTensor [B, 77] (e.g. ``vlkit.data.tokenizer.get_tokenizer("clip")``).
        num_workers: DataLoader workers.
        equal_batches, pin_memory: see :class:`ShardLoader`.
        **dataset_kwargs: :class:`ShardDataset` options (weights, seed, shuffle, shuffle_buffer, resampled,
            image_key, text_key, label_key, num_samples, drop_last, decode, rank, world_size).
    """
    dataset = ShardDataset(
        source, batch_size=batch_size, image_transform=image_transform, tokenizer=tokenizer, **dataset_kwargs
    )
    return ShardLoader(dataset, num_workers=num_workers, equal_batches=equal_batches, pin_memory=pin_memory)

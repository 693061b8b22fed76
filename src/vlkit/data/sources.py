"""Where shards come from: brace ranges, directories, globs, URLs, weighted source lists and ``sizes.json``.

A *source spec* is one of:

- a local path to a ``.tar`` shard, a brace range (``cc3m/{0000..0301}.tar``), a glob (``cc3m/*.tar``) or a directory
  (every ``*.tar`` directly inside it, sorted);
- a URL passed through untouched except for brace expansion: ``pipe:CMD``, ``http(s)://``, ``s3://``, ``gs://``,
  ``file://`` and any other fsspec protocol;
- several of these joined with ``::`` (open_clip's convention), or a Python list of them, each optionally weighted:
  ``[("laion/{000..999}.tar", 3.0), ("cc12m/{0000..1044}.tar", 1.0)]`` or ``[{"url": ..., "weight": ...}]``.

A weight is the *share of samples* drawn from its source in resampled mode (3:1 above means three laion samples for
every cc12m sample, however many shards each has). open_clip's ``--train-data-upsampling-factors`` instead multiplies
the chance of each *shard*, so its proportions also scale with the shard counts.

``sizes.json`` next to the shards maps shard file names to sample counts, ``{"000000.tar": 1000, ...}`` (open_clip's
format). When it is missing, img2dataset's per-shard ``000000_stats.json`` (its ``"successes"`` field) is used.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import braceexpand

SIZES_FILE = "sizes.json"
_GLOB_CHARS = set("*?[")

SourceSpec = Union[str, os.PathLike, tuple, Mapping, Sequence]


@dataclass(frozen=True)
class Source:
    """One source of shards.

    Attributes:
        spec: the spec as given (for messages).
        urls: the expanded shard paths or URLs, in order.
        weight: relative share of samples in resampled mode.
    """

    spec: str
    urls: tuple[str, ...]
    weight: float = 1.0


def is_remote(url: str) -> bool:
    """True for URLs that are opened by webdataset's gopen or fsspec rather than as local files."""
    return url.startswith("pipe:") or "://" in url


def expand_urls(spec: str | os.PathLike) -> list[str]:
    """Expand one spec (no ``::``) into shard paths or URLs.

    Raises:
        ValueError: when a local spec matches no shard.
    """
    spec = os.fspath(spec).strip()
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    urls: list[str] = []
    for item in braceexpand.braceexpand(spec):
        path = Path(item).expanduser()
        if path.is_dir():
            urls.extend(sorted(str(p) for p in path.glob("*.tar")))
        elif _GLOB_CHARS & set(item):
            urls.extend(sorted(glob.glob(str(path))))
        else:
            # A missing file is kept: the loader reports it by path and carries on with the other shards.
            urls.append(str(path))
    if not urls:
        raise ValueError(f"no shards found for {spec!r}")
    return urls


def parse_sources(spec: SourceSpec, weights: Sequence[float] | str | None = None) -> list[Source]:
    """Turn a source spec (see the module docstring) into a list of :class:`Source`.

    Args:
        spec: a string (``::`` separates sources), a path, or a list of strings, ``(spec, weight)`` pairs or
            ``{"url": spec, "weight": w}`` dicts.
        weights: optional weights for the sources, as a list or a ``::``-separated string; overrides inline ones.

    Raises:
        ValueError: on an empty spec, a weight count that does not match, or a negative / all-zero weight.
    """
    items: list[tuple[str, float | None]] = []
    if isinstance(spec, (str, os.PathLike)):
        items = [(s, None) for s in os.fspath(spec).split("::") if s.strip()]
    elif isinstance(spec, Mapping):
        items = [_one_item(spec)]
    else:
        items = [_one_item(s) for s in spec]
    if not items:
        raise ValueError("empty data source")
    if isinstance(weights, str):
        weights = [float(w) for w in weights.split("::")]
    if weights is not None:
        if len(weights) != len(items):
            raise ValueError(f"{len(weights)} weights for {len(items)} sources")
        items = [(s, float(w)) for (s, _), w in zip(items, weights)]
    sources = [Source(spec=s, urls=tuple(expand_urls(s)), weight=1.0 if w is None else w) for s, w in items]
    if any(s.weight < 0 for s in sources) or not any(s.weight > 0 for s in sources):
        raise ValueError(f"source weights must be >= 0 and not all zero, got {[s.weight for s in sources]}")
    return sources


def _one_item(item: Any) -> tuple[str, float | None]:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item), None
    if isinstance(item, Mapping):
        return os.fspath(item["url"]), item.get("weight")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return os.fspath(item[0]), float(item[1])
    raise ValueError(f"cannot read a data source from {item!r}")


def has_weights(sources: Sequence[Source]) -> bool:
    """True when the sources do not all have the same weight."""
    return len({s.weight for s in sources}) > 1


def shard_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts of the shards that ``sizes.json`` (or img2dataset's ``*_stats.json``) describe.

    Only local shards are looked up; remote sources need an explicit dataset size. Shards with no known count are
    absent from the result.
    """
    tables: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for url in urls:
        if is_remote(url):
            continue
        folder, name = os.path.split(url)
        if folder not in tables:
            tables[folder] = _read_sizes_file(os.path.join(folder, SIZES_FILE))
        count = tables[folder].get(name)
        if count is None:
            count = _read_stats_file(os.path.join(folder, name[: -len(".tar")] + "_stats.json"))
        if count is not None:
            sizes[url] = count
    return sizes


def dataset_size(urls: Sequence[str]) -> int | None:
    """Total samples of ``urls`` when every shard's count is known, else None."""
    sizes = shard_sizes(urls)
    if len(sizes) < len(set(urls)):
        return None
    return sum(sizes[u] for u in urls)


def _read_sizes_file(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict):
        return {}
    # Keys may be bare file names or paths relative to the folder; match on the file name.
    return {os.path.basename(str(k)): int(v) for k, v in table.items() if isinstance(v, (int, float))}


def _read_stats_file(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        return int(stats["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_sizes(folder: str | os.PathLike, sizes: Mapping[str, int]) -> Path:
    """Write ``sizes.json`` (shard file name -> sample count) atomically into ``folder``."""
    path = Path(folder) / SIZES_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(sizes.items())), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

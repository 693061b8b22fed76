"""An embedding index on disk, and search over it.

An index directory holds ``vectors.npy`` (float16 ``[N, D]``, L2-normalised rows), ``meta.jsonl`` (one JSON object
per row: ``path``, ``key``, ``caption`` and where the item came from) and ``index.json`` (model, width, count, source,
skipped items, format version), written last: its presence means the index is complete. ``vlkit embed`` writes
it (see :mod:`vlkit.serve.index_cli`); ``vlkit search`` and ``vlkit serve --index`` read it.

Search is exact by default: the float16 vectors are memory-mapped and scored in float32 blocks of
:data:`SEARCH_BLOCK_ROWS` rows, so memory stays bounded whatever the index size. An index built with faiss
(``vlkit embed --faiss``, or automatically from :data:`FAISS_AUTO_ROWS` rows when faiss-cpu is installed) also
holds ``faiss.index``, an HNSW graph over inner products, searched instead; its recall@10 against exact search is
measured when it is built and stored in ``index.json``.
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.utils.errors import UserError
from vlkit.utils.fs import write_text_durably

FORMAT = "vlkit-embedding-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
META_FILE = "meta.jsonl"
FAISS_FILE = "faiss.index"
PARTIAL_DIR = "partial"  # chunks and progress of an unfinished ``vlkit embed``
SEARCH_BLOCK_ROWS = 65536  # float32 scores of one block: SEARCH_BLOCK_ROWS x queries x 4 bytes
# From this many rows ``vlkit embed`` builds a faiss index when faiss is installed: exact search over a million
# 512-d vectors costs ~0.5 s per query on a laptop CPU, HNSW ~1 ms at recall@10 above 0.95.
FAISS_AUTO_ROWS = 1_000_000
FAISS_HNSW_M = 32  # graph degree: recall against memory (M x 8 bytes per row)
FAISS_EF_CONSTRUCTION = 80
FAISS_EF_SEARCH = 128
RECALL_K = 10
RECALL_QUERIES = 1000
FAISS_HINT = "pip install 'vlkit[faiss]'"


class NotAnIndex(UserError, ValueError):
    """A directory that is not (or not yet) a complete embedding index."""


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace a JSON file atomically and durably (a reader sees the old or the new file)."""
    write_text_durably(path, json.dumps(data, indent=2))


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError(f"faiss is not installed: {FAISS_HINT}") from None
    return faiss


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def create_index(out: str | os.PathLike, vectors: np.ndarray | torch.Tensor, metas: list[dict], **info: Any) -> Path:
    """Write a complete index from in-memory vectors ``[N, D]`` and ``N`` metadata rows; ``info`` goes into
    ``index.json`` (``model_id`` at least). The streaming writer of ``vlkit embed`` produces the same files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    array = vectors.numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    if len(array) != len(metas):
        raise ValueError(f"{len(array)} vectors but {len(metas)} metadata rows")
    tmp = out / f".{VECTORS_FILE}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array.astype(np.float16))
    os.replace(tmp, out / VECTORS_FILE)
    write_meta(out / META_FILE, metas)
    write_info(out, count=len(array), dim=int(array.shape[1]), **info)
    return out


def write_meta(path: Path, metas: Iterable[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in metas:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_info(out: Path, **info: Any) -> dict:
    """``index.json``: the completion marker, written after the vectors and metadata are durable."""
    data = {"format": FORMAT, "version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    data.setdefault("faiss", None)
    write_json_atomic(out / INDEX_FILE, data)
    return data


def read_info(directory: str | os.PathLike) -> dict:
    """The ``index.json`` of an index directory.

    Raises:
        NotAnIndex: the directory does not exist, holds no complete index, or another version.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NotAnIndex(f"{directory}: no such index directory")
    file = directory / INDEX_FILE
    if not file.is_file():
        if (directory / PARTIAL_DIR).is_dir():
            raise NotAnIndex(f"{directory}: an unfinished index: run the same vlkit embed command again to finish it")
        raise NotAnIndex(f"{directory}: not an embedding index (no {INDEX_FILE}; make one with vlkit embed)")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotAnIndex(f"{file}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise NotAnIndex(f'{file}: not an embedding index (no "format": "{FORMAT}")')
    if info.get("version") != FORMAT_VERSION:
        raise NotAnIndex(f"{file}: index format version {info.get('version')}, this vlkit reads {FORMAT_VERSION}")
    return info


class EmbeddingIndex:
    """A complete index directory, opened for search (see :meth:`open`)."""

    def __init__(self, directory: Path, info: dict, vectors: np.ndarray):
        self.directory = directory
        self.info = info
        self.vectors = vectors
        self._metas: list[dict] | None = None
        self._faiss: Any = None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> EmbeddingIndex:
        """Open an index directory; the vectors are memory-mapped, the metadata read on first use.

        Raises:
            NotAnIndex (a UserError naming the directory): not a complete index, or its files disagree.
        """
        directory = Path(directory)
        info = read_info(directory)
        try:
            vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise NotAnIndex(f"{directory / VECTORS_FILE}: cannot be read ({e})") from None
        if vectors.ndim != 2 or vectors.shape != (info.get("count"), info.get("dim")):
            raise NotAnIndex(f"{directory}: {VECTORS_FILE} has shape {vectors.shape}, {INDEX_FILE} says "
                              f"{info.get('count')} x {info.get('dim')}")  # fmt: skip
        return cls(directory, info, vectors)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def model_id(self) -> str:
        return str(self.info.get("model_id", ""))

    @property
    def model_path(self) -> str | None:
        return self.info.get("model_path")

    def metas(self) -> list[dict]:
        if self._metas is None:
            with open(self.directory / META_FILE, encoding="utf-8") as f:
                self._metas = [json.loads(line) for line in f if line.strip()]
            if len(self._metas) != len(self):
                raise NotAnIndex(f"{self.directory}: {META_FILE} has {len(self._metas)} rows for {len(self)} vectors")
        return self._metas

    def meta(self, row: int) -> dict:
        """The metadata of a row: ``path``, ``key``, ``caption`` (None where absent) and the source's extras."""
        if not 0 <= row < len(self):
            raise KeyError(f"row {row} is not in the index (0..{len(self) - 1})")
        return {"path": None, "key": None, "caption": None, **self.metas()[row]}

    def search(self, queries: torch.Tensor, k: int, exact: bool = False) -> list[list[Hit]]:
        """The ``k`` best rows by inner product for each normalised query ``[Q, D]``, best first. Uses the faiss
        index when the index has one, unless ``exact``."""
        queries = torch.as_tensor(queries, dtype=torch.float32).cpu()
        if queries.ndim == 1:
            queries = queries[None]
        if queries.shape[1] != self.dim:
            raise UserError(f"queries of width {queries.shape[1]} for an index of width {self.dim} "
                            f"(made with {self.model_id})")  # fmt: skip
        k = min(k, len(self))
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        if not exact and self.info.get("faiss"):
            scores, rows = self._faiss_search(queries, k)
        else:
            scores, rows = exact_topk(self.vectors, queries, k)
        # faiss pads with row -1 when it finds fewer than k
        return [[Hit(r, s) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows.tolist(), scores.tolist())]

    def _faiss_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = import_faiss()
        if self._faiss is None:
            self._faiss = faiss.read_index(str(self.directory / FAISS_FILE))
            self._faiss.hnsw.efSearch = max(FAISS_EF_SEARCH, k)
        scores, rows = self._faiss.search(np.ascontiguousarray(queries.numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(rows)

    def image_bytes(self, row: int) -> tuple[bytes, str]:
        """The original bytes of a row's image and their MIME type.

        Raises:
            KeyError: the row is not in the index, or has no image (a captions index).
            UserError: the image file or shard member is gone.
        """
        meta = self.meta(row)
        if meta.get("path"):
            path = Path(meta["path"])
            try:
                data = path.read_bytes()
            except OSError as e:
                raise UserError(f"row {row}: {path}: {e.strerror or e}") from None
            return data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if meta.get("url") and meta.get("member"):
            data = _shard_member(meta["url"], int(meta["index"]), str(meta["key"]), meta["member"])
            return data, _mime(meta["member"])
        raise KeyError(f"row {row} has no image (the index holds {self.info.get('modality', 'text')} embeddings)")


def _mime(ext: str) -> str:
    return mimetypes.guess_type(f"x.{ext.rsplit('.', 1)[-1]}")[0] or "application/octet-stream"


def _shard_member(url: str, index: int, key: str, member: str) -> bytes:
    from vlkit.data.shards import iter_tar
    from vlkit.data.stream import ShardError

    try:
        for record in iter_tar(url, skip=index, wanted=lambda ext: ext == member):
            if record.key == key and record.fields.get(member):
                return record.fields[member]
            break
    except ShardError as e:
        raise UserError(f"{url}: {e}") from None
    raise UserError(f"{url}: sample {key} ({member}) is no longer at position {index}")


def exact_topk(vectors: np.ndarray, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [Q, k], rows [Q, k]) of the best inner products, best first, scoring float32 blocks of the float16
    rows so that memory stays bounded; ties go to the lower row."""
    best_scores = torch.full((len(queries), 0), float("-inf"))
    best_rows = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(vectors), SEARCH_BLOCK_ROWS):
        block = torch.from_numpy(np.asarray(vectors[start : start + SEARCH_BLOCK_ROWS], dtype=np.float32))
        scores = queries @ block.T
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1, sorted=True)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
        order = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1, sorted=True).indices
        best_scores, best_rows = merged_scores.gather(1, order), merged_rows.gather(1, order)
    return best_scores, best_rows


def build_faiss(index: EmbeddingIndex, progress: bool = False) -> dict:
    """Build ``faiss.index`` (HNSW over inner products) beside the vectors, measure its recall@10 against exact
    search on up to :data:`RECALL_QUERIES` rows of the index as queries, and record both in ``index.json``.

    Returns:
        The ``faiss`` entry of ``index.json``: ``file``, ``type``, ``ef_search``, ``recall_at_10``, ``queries``,
        ``seconds``.
    """
    faiss = import_faiss()
    start = time.perf_counter()
    graph = faiss.IndexHNSWFlat(index.dim, FAISS_HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = FAISS_EF_CONSTRUCTION
    for begin in range(0, len(index), SEARCH_BLOCK_ROWS):
        graph.add(np.ascontiguousarray(index.vectors[begin : begin + SEARCH_BLOCK_ROWS], dtype=np.float32))
    tmp = index.directory / f".{FAISS_FILE}.tmp"
    faiss.write_index(graph, str(tmp))
    os.replace(tmp, index.directory / FAISS_FILE)
    seconds = time.perf_counter() - start
    graph.hnsw.efSearch = FAISS_EF_SEARCH
    recall, queries = faiss_recall(graph, index.vectors, RECALL_K)
    entry = {"file": FAISS_FILE, "type": f"HNSW{FAISS_HNSW_M},IP", "ef_search": FAISS_EF_SEARCH,
             f"recall_at_{RECALL_K}": round(recall, 4), "queries": queries, "seconds": round(seconds, 2)}  # fmt: skip
    index.info = {**index.info, "faiss": entry}
    write_json_atomic(index.directory / INDEX_FILE, index.info)
    return entry


def faiss_recall(graph: Any, vectors: np.ndarray, k: int, queries: int = RECALL_QUERIES) -> tuple[float, int]:
    """Mean |faiss top-k ∩ exact top-k| / k over a seeded sample of the index's own rows used as queries."""
    k = min(k, len(vectors))
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), size=min(queries, len(vectors)), replace=False))
    q = np.asarray(vectors[rows], dtype=np.float32)
    _, approx = graph.search(q, k)
    _, exact = exact_topk(vectors, torch.from_numpy(q), k)
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / (k * len(rows)), len(rows)

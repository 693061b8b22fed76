"""``vlkit embed`` (build an embedding index with a CLIP model) and ``vlkit search`` (query one).

``vlkit embed`` is resumable: items are read in a fixed order and embedded in batches; every ``--chunk-batches``
batches the vectors (``partial/chunk-N.npy``) and metadata rows (``partial/chunk-N.jsonl``) are written and flushed,
and only then ``partial/progress.json`` (atomically) records the chunk count and the position in the input just
after the chunk's last item. A killed run restarted with the same command resumes from that position, dropping any
chunk files the progress file does not count, so nothing is embedded twice or lost; the batches it forms are the
ones an uninterrupted run forms, so the index is the same. At the end the chunks are consolidated into the index
files of :mod:`vlkit.serve.index` and ``partial/`` is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.utils.argtypes import positive_int
from vlkit.utils.errors import UserError

CHUNK_BATCHES = 16
PROGRESS_FILE = "progress.json"
SOURCE_KINDS = ("images", "imagefolder", "shards", "captions")
# Shard members taken as the image, in this order of preference (webdataset's usual image extensions).
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images or captions with a CLIP model into a searchable index directory (resumable)",
        description="Embed a folder of images, an ImageFolder, webdataset shards or a text file of captions (one per "
        "line) with a CLIP model, into an index directory: vectors.npy (float16, normalised), meta.jsonl (one row per "
        "item: path or shard key, caption) and index.json. A killed run continues where it stopped when run again "
        "with the same arguments. Unreadable images are skipped and counted. With --faiss (automatic from "
        "1,000,000 items when faiss-cpu is installed) an HNSW index is built too and its recall@10 against exact "
        "search recorded in index.json.",
        epilog="examples:\n  vlkit embed --model runs/clip-tiny-shapes --shards data/shapes/val --out idx/shapes-val\n"
        "  vlkit embed --model models/clip-b32 --images ~/photos --out idx/photos --batch-size 128\n"
        "  vlkit embed --model models/clip-b32 --captions captions.txt --out idx/captions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a CLIP model: vlkit model/checkpoint/run directory, or a converted "
                   "Hugging Face / open_clip directory")  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="a folder of images (searched recursively; a NAME.txt beside "
                     "an image is its caption)")  # fmt: skip
    src.add_argument("--imagefolder", metavar="DIR", help="an ImageFolder (one sub-folder per class)")
    src.add_argument("--shards", metavar="SPEC", help="webdataset shards: a .tar, a folder of .tar files, a brace "
                     "pattern (data/train-{000..009}.tar), a glob or a URL")  # fmt: skip
    src.add_argument("--captions", metavar="FILE", help="a text file, one caption per line")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index directory to write")
    p.add_argument("--batch-size", type=positive_int, default=64, help="items per forward pass (default 64)")
    p.add_argument("--chunk-batches", type=positive_int, default=CHUNK_BATCHES, help="batches between durable "
                   f"progress points (default {CHUNK_BATCHES})")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an index made from other inputs or another model")
    faiss = p.add_mutually_exclusive_group()
    faiss.add_argument("--faiss", dest="faiss", action="store_const", const="yes", default="auto",
                       help="also build a faiss HNSW index (needs faiss-cpu: pip install 'vlkit[faiss]')")  # fmt: skip
    faiss.add_argument("--no-faiss", dest="faiss", action="store_const", const="no", help="never build one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_embed)

    s = sub.add_parser(
        "search",
        help="the top-k items of an embedding index for a text or an image",
        description="Search an index made by vlkit embed with a text query or an image (--image), embedded with the "
        "model the index was made with (or --model), and print rank, score, path or shard key, and caption.",
        epilog='examples:\n  vlkit search idx/shapes-val "a red circle"\n'
        "  vlkit search idx/photos --image query.jpg -k 10 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("index", metavar="INDEX_DIR", help="an index directory (vlkit embed --out)")
    s.add_argument("query", nargs="?", help="the text to search for")
    s.add_argument("--image", metavar="PATH", help="search with an image instead of a text")
    s.add_argument("-k", "--top-k", dest="k", type=positive_int, default=5, help="results (default 5)")
    s.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    s.add_argument("--model", help="the CLIP model to embed the query (default: the one recorded in index.json)")
    s.add_argument("--exact", action="store_true", help="exact search even when the index has a faiss index")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    s.set_defaults(func=run_search)


# --------------------------------------------------------------------------------------------------------------------
# Inputs: every source yields its items in a fixed order, each with the position just after it


@dataclass
class Item:
    cursor: list[int]  # [part, offset] of the next item: where a resumed run starts
    meta: dict
    text: str | None = None
    load: Callable[[], Any] | None = None  # () -> PIL image; raises ImageDecodeError
    skip: str | None = None  # a reason when the item cannot be embedded at all (a broken shard, no image member)


@dataclass
class Source:
    kind: str
    spec: str
    urls: list[str] = field(default_factory=list)  # shards
    files: list[str] = field(default_factory=list)  # images / imagefolder / captions lines
    labels: list[str | None] = field(default_factory=list)  # imagefolder: class names
    lines: list[int] = field(default_factory=list)  # captions: 1-based line numbers in the file

    @property
    def modality(self) -> str:
        return "text" if self.kind == "captions" else "image"

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec}

    def total(self) -> int | None:
        if self.kind != "shards":
            return len(self.files)
        from vlkit.data.sources import dataset_size

        return dataset_size(self.urls)

    def items(self, cursor: list[int]) -> Iterator[Item]:
        part, offset = cursor
        if self.kind == "shards":
            yield from self._shard_items(part, offset)
            return
        for i in range(offset, len(self.files)):
            yield self._file_item(i)

    def _file_item(self, i: int) -> Item:
        from vlkit.data.images import read_image

        if self.kind == "captions":
            return Item([0, i + 1], {"caption": self.files[i], "line": self.lines[i]}, text=self.files[i])
        path = self.files[i]
        meta: dict[str, Any] = {"path": path, "caption": _sidecar_caption(path)}
        if self.kind == "imagefolder":
            meta["label"] = self.labels[i]
        return Item([0, i + 1], meta, load=lambda: read_image(path))

    def _shard_items(self, part: int, offset: int) -> Iterator[Item]:
        from vlkit.data.images import decode_image
        from vlkit.data.shards import iter_tar
        from vlkit.data.stream import TOO_LARGE, ShardError

        wanted = set(SHARD_IMAGE_EXTS) | {"txt"}
        for shard in range(part, len(self.urls)):
            url, position = self.urls[shard], offset if shard == part else 0
            try:
                for record in iter_tar(url, skip=position, wanted=lambda ext: ext in wanted):
                    position = record.index + 1
                    member = next((e for e in SHARD_IMAGE_EXTS if isinstance(record.fields.get(e), bytes)), None)
                    meta = {"key": record.key, "caption": _first_caption(record.fields.get("txt")), "url": url,
                            "index": record.index, "member": member}  # fmt: skip
                    if member is None:
                        too_large = any(record.fields.get(e) is TOO_LARGE for e in SHARD_IMAGE_EXTS)
                        yield Item([shard, position], meta, skip="too_large" if too_large else "no_image")
                        continue
                    data, key = record.fields[member], record.key
                    yield Item([shard, position], meta, load=lambda d=data, k=key: decode_image(d, k))
            except ShardError as e:
                # The rest of a broken shard cannot be read: count it once and go on with the next shard.
                yield Item([shard + 1, 0], {"url": url}, skip=f"shard_{e.reason}")


def _sidecar_caption(path: str) -> str | None:
    text = Path(path).with_suffix(".txt")
    try:
        return _first_caption(text.read_bytes()) if text.is_file() else None
    except OSError:
        return None


def _first_caption(raw: bytes | None) -> str | None:
    if not raw:
        return None
    lines = [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return lines[0] if lines else None


def open_source(kind: str, spec: str) -> Source:
    """The items of ``--images`` / ``--imagefolder`` / ``--shards`` / ``--captions``, listed (not read) now.

    Raises:
        UserError: a missing path, a folder without images, an empty captions file, shards that match nothing.
    """
    from vlkit.data.imagefolder import IMAGE_EXTENSIONS, ImageFolder
    from vlkit.data.sources import expand_urls, is_remote

    if kind == "shards":
        try:
            urls = expand_urls(spec)
        except ValueError as e:
            raise UserError(f"--shards {spec}: {e}") from None
        missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
        if missing:
            raise UserError(f"--shards {spec}: no such shard: {', '.join(missing[:3])}")
        spec = spec if is_remote(spec) else os.path.abspath(os.path.expanduser(spec))
        return Source(kind, spec, urls=[u if is_remote(u) else os.path.abspath(u) for u in urls])
    path = Path(spec).expanduser().resolve()
    if kind == "captions":
        if not path.is_file():
            raise UserError(f"--captions {spec}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not numbered:
            raise UserError(f"--captions {spec}: no captions (one per line)")
        return Source(kind, str(path), files=[c for _, c in numbered], lines=[n for n, _ in numbered])
    if not path.is_dir():
        raise UserError(f"--{kind} {spec}: no such directory")
    if kind == "imagefolder":
        try:
            folder = ImageFolder(path)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"--imagefolder {spec}: {e}") from None
        files = [p for p, _ in folder.samples]
        labels = [folder.classes[c] for _, c in folder.samples]
    else:
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))  # fmt: skip
        labels = []
    if not files:
        raise UserError(f"--{kind} {spec}: no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
    return Source(kind, str(path), files=files, labels=labels)


# --------------------------------------------------------------------------------------------------------------------
# The resumable embedding run


class Chunks:
    """``partial/``: numbered chunk files and the progress file that says how many of them count."""

    def __init__(self, out: Path):
        self.dir = out / "partial"

    def progress(self) -> dict | None:
        file = self.dir / PROGRESS_FILE
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

    def start(self, state: dict) -> None:
        """Drop the files of a chunk that was being written when the last run stopped (not counted in progress);
        a new run writes its progress file at once, so that a run stopped before its first chunk resumes too."""
        from vlkit.serve.index import write_json_atomic

        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.dir.glob("chunk-*"):
            if int(f.name.split("-")[1].split(".")[0]) >= state["chunks"]:
                f.unlink()
        if self.progress() is None:
            write_json_atomic(self.dir / PROGRESS_FILE, state)

    def write(self, number: int, vectors: Any, metas: list[dict], state: dict) -> None:
        import numpy as np

        from vlkit.serve.index import write_json_atomic, write_meta
        from vlkit.utils.fs import fsync_dir

        tmp = self.dir / f".chunk-{number:06d}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"chunk-{number:06d}.npy")
        write_meta(self.dir / f"chunk-{number:06d}.jsonl", metas)
        fsync_dir(self.dir)
        write_json_atomic(self.dir / PROGRESS_FILE, state)  # last: the chunk counts only once it is durable

    def vectors(self, number: int) -> Any:
        import numpy as np

        return np.load(self.dir / f"chunk-{number:06d}.npy")

    def metas(self, number: int) -> Iterator[dict]:
        with open(self.dir / f"chunk-{number:06d}.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def embed(
    encoder: Any,
    source: Source,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_batches: int = CHUNK_BATCHES,
    workers: int = 4,
    progress: bool = True,
    faiss: str = "auto",
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Embed ``source`` into the index directory ``out`` with a :class:`~vlkit.serve.encoder.ClipEncoder`, resuming
    from ``out/partial`` when an earlier run with the same job stopped; returns the ``index.json`` contents.

    ``on_chunk(chunks_done)`` is called after each durable chunk (tests stop a run there to simulate a kill).
    Call :func:`check_out_dir` first: it refuses an index of another job.
    """
    import numpy as np
    import torch

    from vlkit.data.images import ImageDecodeError, aspect_problem
    from vlkit.eval.data import progress_bar

    out = Path(out)
    job = job_of(encoder.model_path, source)
    chunks = Chunks(out)
    state = chunks.progress() or {"job": job, "chunks": 0, "count": 0, "cursor": [0, 0], "skipped": {}, "seconds": 0.0}
    chunks.start(state)
    skipped = Counter(state["skipped"])
    buffer_vectors: list[torch.Tensor] = []
    buffer_metas: list[dict] = []
    pending: list[Item] = []
    batches_in_chunk, embedded_now, started = 0, 0, time.perf_counter()
    seconds_before = state["seconds"]

    def prepare(item: Item) -> Any:
        try:
            image = item.load()
        except ImageDecodeError as e:
            return e
        problem = aspect_problem(image.width, image.height)
        if problem is not None:  # the transform would blow it up (see aspect_problem)
            return ImageDecodeError("too_large", str(item.meta.get("path") or item.meta.get("key")), problem)
        return encoder.transform(image)

    def embed_pending(pool: ThreadPoolExecutor) -> None:
        nonlocal embedded_now
        if source.modality == "text":
            vectors, metas = encoder.embed_texts([it.text for it in pending]), [it.meta for it in pending]
        else:
            pixels, metas = [], []
            for item, result in zip(pending, pool.map(prepare, pending)):
                if isinstance(result, ImageDecodeError):
                    skipped[result.reason] += 1
                else:
                    pixels.append(result)
                    metas.append(item.meta)
            vectors = encoder.embed_pixels(torch.stack(pixels)) if pixels else torch.empty(0, encoder.dim)
        buffer_vectors.append(vectors.to(torch.float16))
        buffer_metas.extend(metas)
        embedded_now += len(metas)
        state["cursor"] = pending[-1].cursor
        pending.clear()

    def flush() -> None:
        nonlocal batches_in_chunk
        vectors = torch.cat(buffer_vectors).numpy() if buffer_vectors else np.zeros((0, encoder.dim), np.float16)
        state.update(count=state["count"] + len(buffer_metas), skipped=dict(skipped),
                     seconds=seconds_before + time.perf_counter() - started)  # fmt: skip
        state["chunks"] += 1
        chunks.write(state["chunks"] - 1, vectors, buffer_metas, state)
        buffer_vectors.clear()
        buffer_metas.clear()
        batches_in_chunk = 0
        if on_chunk is not None:
            on_chunk(state["chunks"])

    total = source.total()
    done_before = state["count"] + sum(state["skipped"].values())
    unit = "img" if source.modality == "image" else "text"
    with (
        progress_bar(progress, total, f"embedding {source.modality}s", unit) as bar,
        ThreadPoolExecutor(workers) as pool,
    ):
        bar.update(done_before)
        last_cursor = state["cursor"]
        for item in source.items(state["cursor"]):
            last_cursor = item.cursor
            if item.skip is not None:
                skipped[item.skip] += 1
                if not pending:  # nothing waits before it: the resume point moves past it
                    state["cursor"] = item.cursor
            else:
                pending.append(item)
            bar.update(1)
            if len(pending) == batch_size:
                embed_pending(pool)
                batches_in_chunk += 1
                if batches_in_chunk == chunk_batches:
                    flush()
        if pending:
            embed_pending(pool)
        moved = last_cursor != state["cursor"]
        state["cursor"] = last_cursor  # past skipped items after the last embedded one, counted in this flush
        if buffer_metas or skipped != Counter(state["skipped"]) or moved:
            flush()
    seconds = time.perf_counter() - started
    info = consolidate(out, chunks, state, encoder, source)
    info["run"] = {"items": embedded_now, "seconds": round(seconds, 2),
                   "items_per_second": round(embedded_now / seconds, 1) if seconds > 0 else None}  # fmt: skip
    return info


def consolidate(out: Path, chunks: Chunks, state: dict, encoder: Any, source: Source) -> dict:
    """Join the chunks into ``vectors.npy`` and ``meta.jsonl``, write ``index.json`` last, remove ``partial/``."""
    import numpy as np

    from vlkit.serve.index import META_FILE, VECTORS_FILE, write_info, write_meta

    count = state["count"]
    if count == 0:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(state["skipped"].items()))
        raise UserError(f"--{source.kind} {source.spec}: no item could be embedded (skipped: {detail or 'none'})")
    tmp = out / f".{VECTORS_FILE}.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(count, encoder.dim))
    row = 0
    for number in range(state["chunks"]):
        part = chunks.vectors(number)
        array[row : row + len(part)] = part
        row += len(part)
    array.flush()
    del array
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / VECTORS_FILE)
    write_meta(out / META_FILE, (m for number in range(state["chunks"]) for m in chunks.metas(number)))
    info = write_info(out, model_id=encoder.model_id, model_path=encoder.model_path, dim=encoder.dim, count=count,
                      modality=source.modality, source=source.describe(), skipped=state["skipped"],
                      skipped_total=sum(state["skipped"].values()), seconds=round(state["seconds"], 2))  # fmt: skip
    shutil.rmtree(chunks.dir)
    return info


def job_of(model_path: str, source: Source) -> dict:
    return {"model_path": model_path, "source": source.describe()}


def check_out_dir(out: Path, job: dict, overwrite: bool) -> str:
    """``"new"``, ``"resume"`` (an unfinished run of this job) or ``"done"`` (a finished index of this job).

    Raises:
        UserError: ``out`` is a file, holds an index or an unfinished run of another job, or other files (unless
            ``overwrite``: then the index files are removed and it is ``"new"``).
    """
    from vlkit.serve.index import FAISS_FILE, INDEX_FILE, META_FILE, VECTORS_FILE, NotAnIndex, read_info

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    chunks = Chunks(out)
    theirs = None
    if (out / INDEX_FILE).is_file():
        try:
            info = read_info(out)
        except NotAnIndex:
            info = {}
        theirs = {"model_path": info.get("model_path"), "source": info.get("source")}
        what = "an index"
    elif chunks.dir.is_dir():
        theirs = (chunks.progress() or {}).get("job")
        what = "an unfinished index"
    else:
        what = "other files"
    if theirs == job and not overwrite:
        if what == "an index":
            shutil.rmtree(chunks.dir, ignore_errors=True)  # left when a run stopped between index.json and cleanup
            return "done"
        return "resume"
    if not overwrite:
        made = ""
        if theirs and theirs.get("source"):
            made = f" made from {theirs['source']['kind']} {theirs['source']['spec']} with {theirs['model_path']}"
        raise UserError(f"--out {out}: holds {what}{made}; give another --out, or --overwrite to replace it")
    for name in (INDEX_FILE, VECTORS_FILE, META_FILE, FAISS_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(chunks.dir, ignore_errors=True)
    return "new"


def run_embed(args: argparse.Namespace) -> int:
    from vlkit.serve.encoder import ClipEncoder, model_id_for
    from vlkit.serve.index import FAISS_AUTO_ROWS, EmbeddingIndex, build_faiss, faiss_available, import_faiss

    kind = next(k for k in SOURCE_KINDS if getattr(args, k) is not None)
    source = open_source(kind, getattr(args, kind))
    if not os.path.exists(args.model):
        raise UserError(f"--model {args.model}: no such file or directory")
    if args.faiss == "yes":
        import_faiss()  # before hours of embedding: a missing extra fails now
    out = Path(args.out).expanduser()
    model_path = str(Path(args.model).expanduser().resolve())
    state = check_out_dir(out, job_of(model_path, source), args.overwrite)
    if state == "done":
        index = EmbeddingIndex.open(out)
        print(f"{out}: already complete: {len(index)} {source.modality}s embedded with {model_id_for(args.model)} "
              f"({index.info.get('skipped_total', 0)} skipped); nothing to do")  # fmt: skip
    else:
        encoder = ClipEncoder.load(args.model, device=args.device, precision=args.precision,
                                   batch_size=args.batch_size)  # fmt: skip
        if state == "resume":
            print(f"{out}: resuming an unfinished run", file=sys.stderr)
        info = embed(encoder, source, out, batch_size=args.batch_size, chunk_batches=args.chunk_batches,
                     workers=args.workers, progress=not args.quiet)  # fmt: skip
        run = info["run"]
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(info["skipped"].items()))
        print(f"{out}: {info['count']} {source.modality}s embedded with {encoder.model_id} ({info['dim']}-d); "
              f"this run: {run['items']} in {run['seconds']:.1f} s ({run['items_per_second']} {source.modality}s/s); "
              f"skipped: {info['skipped_total']}{f' ({skipped})' if skipped else ''}")  # fmt: skip
        index = EmbeddingIndex.open(out)
    want_faiss = args.faiss == "yes" or (args.faiss == "auto" and len(index) >= FAISS_AUTO_ROWS)
    if want_faiss and not index.info.get("faiss"):
        if not faiss_available():
            print(f"{out}: {len(index)} items: exact search will be slow; {FAISS_HINT_LINE}", file=sys.stderr)
            return 0
        entry = build_faiss(index)
        print(f"{out}: faiss {entry['type']} index built in {entry['seconds']} s; recall@10 against exact search "
              f"{entry['recall_at_10']:.4f} over {entry['queries']} queries")  # fmt: skip
    return 0


FAISS_HINT_LINE = "install faiss-cpu (pip install 'vlkit[faiss]') and run again with --faiss for an approximate index"


def run_search(args: argparse.Namespace) -> int:
    from vlkit.data.images import read_image
    from vlkit.serve.encoder import ClipEncoder
    from vlkit.serve.index import EmbeddingIndex

    if (args.query is None) == (args.image is None):
        raise UserError("give a text query or --image PATH (one of them)")
    if args.image is not None and not os.path.isfile(args.image):
        raise UserError(f"--image {args.image}: no such file")
    index = EmbeddingIndex.open(args.index)
    model = args.model or index.model_path
    if not model or not os.path.exists(model):
        raise UserError(f"{args.index}: the model it was made with ({model}) is not there; give --model PATH")
    encoder = ClipEncoder.load(model, device=args.device)
    if encoder.dim != index.dim:
        raise UserError(f"--model {model}: {encoder.dim}-d embeddings, the index holds {index.dim}-d ones "
                        f"(made with {index.model_id})")  # fmt: skip
    query = encoder.embed_images([read_image(args.image)]) if args.image else encoder.embed_texts([args.query])
    hits = index.search(query, args.k, exact=args.exact)[0]
    rows = [{"rank": i, "row": h.row, "score": round(h.score, 4), **index.meta(h.row)} for i, h in enumerate(hits, 1)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for r in rows:
        where = r["path"] or (f"{r['url']}#{r['key']}" if r.get("url") else r["key"]) or f"line {r.get('line')}"
        label = r["caption"] or r.get("label")
        caption = f"  {label}" if label and label != where else ""
        print(f"{r['rank']:>3}  {r['score']:.4f}  {where}{caption}")
    return 0

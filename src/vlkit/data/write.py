"""``vlkit data from-folder`` and ``vlkit data from-csv``: write webdataset shards from local images and captions.

Shards are ``OUT/000000.tar, 000001.tar, ...`` holding ``KEY.<image ext>``, ``KEY.txt`` (caption), ``KEY.cls`` (class
index, folder-per-class layout only) and ``KEY.json`` (``{"source": relative path}``), plus ``OUT/sizes.json``.
Each shard is written to ``NAME.tar.tmp``, flushed to disk and renamed, so an interrupted run never leaves a partial
shard under a final name. Keys are sequential numbers (never derived from file names), so nothing a source file is
called can make the writer or a later reader touch paths outside ``OUT``.

JPEG, PNG and WebP files are stored byte for byte; other formats PIL can read (GIF, BMP, TIFF, ...) are stored as PNG
(first frame). Every image is decoded once first (``--no-verify`` skips that) so broken files are left out and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlkit.data.sources import write_sizes
from vlkit.data.stream import default_decode
from vlkit.utils.argtypes import positive_int

KEEP_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
CONVERT_FORMATS = {".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}
IMAGE_SUFFIXES = set(KEEP_FORMATS) | CONVERT_FORMATS


class ShardWriter:
    """Writes samples into numbered tar shards of ``shard_size`` samples, atomically, and records ``sizes.json``.

    Args:
        out_dir: the output directory (created).
        shard_size: samples per shard.
        prefix: shard name prefix (``{prefix}{index:06d}.tar``).
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 1000, prefix: str = ""):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.prefix = prefix
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0
        self._name = ""

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; ``members`` maps extensions (``jpg``, ``txt``, ...) to bytes."""
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # reproducible shards
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def close(self) -> dict[str, int]:
        """Finish the last shard and write ``sizes.json``; returns shard name -> sample count."""
        if self._tar is not None:
            self._finish()
        write_sizes(self.out_dir, self.sizes)
        return self.sizes

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp`` file) after an error."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
            self._tar = None

    def _open(self) -> None:
        self._name = f"{self.prefix}{len(self.sizes):06d}.tar"
        self._file = open(self.out_dir / (self._name + ".tmp"), "wb")  # noqa: SIM115 (closed in _finish/abort)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------------------------
# Collecting samples


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def detect_layout(src: Path) -> str:
    """ "captions" when images have sidecar ``.txt`` files, "classes" for one sub-folder of images per class."""
    top_images = [p for p in src.iterdir() if _is_image(p)]
    subdirs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not top_images and subdirs:
        has_txt = any(p.suffix.lower() == ".txt" for d in subdirs for p in d.rglob("*.txt"))
        return "captions" if has_txt else "classes"
    return "captions"


def folder_items(src: Path, layout: str) -> tuple[list[tuple[Path, str | None, int | None]], list[str]]:
    """(image path, caption or None, class index or None) in a stable order, and the class names."""
    if layout == "classes":
        classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
        items = []
        for index, name in enumerate(classes):
            for path in sorted(p for p in (src / name).rglob("*") if _is_image(p)):
                items.append((path, name.replace("_", " "), index))
        return items, classes
    items = []
    for path in sorted(p for p in src.rglob("*") if _is_image(p)):
        sidecar = path.with_suffix(".txt")
        caption = _read_text(sidecar) if sidecar.is_file() else None
        items.append((path, caption, None))
    return items, []


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def _image_member(path: Path, verify: bool) -> tuple[str, bytes]:
    """(extension, bytes) to store; raises on an unreadable image (with ``.reason`` when the decoder gives one)."""
    data = path.read_bytes()
    ext = KEEP_FORMATS.get(path.suffix.lower())
    if ext is not None:
        if verify:
            default_decode(data, str(path))
        return ext, data
    img = default_decode(data, str(path))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def write_samples(
    items: Iterable[tuple[Path, str | None, int | None]],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    verify: bool = True,
    root: Path | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict:
    """Write ``(image path, caption, class index)`` items as shards; returns a summary with skip counts by reason."""
    from tqdm import tqdm

    skipped: Counter = Counter()
    written = 0
    with ShardWriter(out_dir, shard_size) as writer:
        bar = tqdm(items, total=total, unit="img", desc="writing shards", file=sys.stderr, disable=not progress)
        for path, caption, label in bar:
            reason = _write_one(writer, written, path, caption, label, verify, root)
            if reason is None:
                written += 1
            else:
                skipped[reason] += 1
                print(f"skipped {path}: {reason}", file=sys.stderr)
    return {
        "out": str(out_dir),
        "samples": written,
        "shards": len(writer.sizes),
        "skipped": dict(skipped),
        "sizes": writer.sizes,
    }


def _write_one(writer, index, path, caption, label, verify, root) -> str | None:
    if caption is None and label is None:
        return "no_caption"
    if caption is not None and not caption.strip() and label is None:
        return "empty_caption"
    try:
        ext, data = _image_member(path, verify)
    except FileNotFoundError:
        return "missing_file"
    except Exception as e:
        return getattr(e, "reason", None) or "corrupt"
    members = {ext: data}
    if caption is not None:
        members["txt"] = caption.encode("utf-8")
    if label is not None:
        members["cls"] = str(label).encode()
    source = os.path.relpath(path, root) if root is not None else str(path)
    members["json"] = json.dumps({"source": source}, ensure_ascii=False).encode("utf-8")
    writer.write(f"{index:09d}", members)
    return None


def _prepare_out(out: Path, overwrite: bool) -> None:
    if not out.is_dir():
        return
    existing = list(out.glob("*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} shard(s); pass --overwrite to replace them")
    # Stale shards with higher numbers than the new run writes would otherwise join the dataset.
    for p in existing + list(out.glob("*.tar.tmp")):
        p.unlink()


def from_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    layout: str = "auto",
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write shards from a folder of images with sidecar captions, or of one sub-folder per class.

    Raises:
        FileNotFoundError: when ``src`` is not a directory.
        FileExistsError: when ``out`` already has shards and ``overwrite`` is False.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    _prepare_out(out, overwrite)
    if layout == "auto":
        layout = detect_layout(src)
    items, classes = folder_items(src, layout)
    summary = write_samples(
        items, out, shard_size=shard_size, verify=verify, root=src, total=len(items), progress=progress
    )
    if layout == "classes":
        (out / "classes.json").write_text(json.dumps({"classes": classes}, indent=1) + "\n", encoding="utf-8")
    summary["layout"] = layout
    return summary


def from_csv(
    csv_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    image_col: str | None = None,
    caption_col: str | None = None,
    delimiter: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write shards from a CSV/TSV of image paths (relative to the file) and captions; bad rows are counted."""
    from vlkit.data.csvdata import read_rows

    rows = read_rows(csv_path, image_col=image_col, caption_col=caption_col, delimiter=delimiter)
    out = Path(out)
    _prepare_out(out, overwrite)
    bad = sum(1 for r in rows if r[3])
    items = _csv_items(rows)
    summary = write_samples(
        items,
        out,
        shard_size=shard_size,
        verify=verify,
        root=Path(csv_path).resolve().parent,
        total=len(rows) - bad,
        progress=progress,
    )
    if bad:
        summary["skipped"]["bad_row"] = bad
    return summary


def _csv_items(rows) -> Iterator[tuple[Path, str | None, int | None]]:
    for image, caption, _, problem in rows:
        if not problem:
            yield Path(image), caption.strip() if caption is not None else None, None


# --------------------------------------------------------------------------------------------------------------------
# Command line


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory for the shards and sizes.json")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-verify", action="store_true", help="store images without decoding them first")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``from-folder`` and ``from-csv`` to the ``vlkit data`` sub-commands."""
    p = subparsers.add_parser(
        "from-folder",
        help="write webdataset shards from images + sidecar .txt captions, or one sub-folder per class",
        description=__doc__.replace("``", ""),  # docstring markup is noise in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="folder of images (captions in IMAGE.txt) or of class sub-folders")
    p.add_argument(
        "--layout",
        choices=("auto", "captions", "classes"),
        default="auto",
        help="captions: sidecar .txt; classes: SRC/<class>/*.jpg, writes cls and classes.json (default: detect)",
    )
    _common(p)
    p.set_defaults(func=run_from_folder)

    p = subparsers.add_parser(
        "from-csv",
        help="write webdataset shards from a CSV/TSV of image paths and captions",
        description=__doc__.replace("``", ""),  # docstring markup is noise in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="CSV/TSV with a header; image paths relative to the file")
    p.add_argument("--image-col", help="image path column (default: filepath, image, path, ...)")
    p.add_argument("--caption-col", help="caption column (default: title, caption, text, ...)")
    p.add_argument("--delimiter", help="field delimiter (default: from the extension, else sniffed)")
    _common(p)
    p.set_defaults(func=run_from_csv)


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {summary['out']} (skipped: {skipped})")


def run_from_folder(args: argparse.Namespace) -> int:
    try:
        summary = from_folder(
            args.src,
            args.out,
            shard_size=args.shard_size,
            layout=args.layout,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            progress=not args.json,
        )
    except (FileNotFoundError, FileExistsError) as e:
        print(f"vlkit data from-folder: error: {e}", file=sys.stderr)
        return 2
    _report(summary, args.json)
    return 0


def run_from_csv(args: argparse.Namespace) -> int:
    try:
        summary = from_csv(
            args.file,
            args.out,
            shard_size=args.shard_size,
            image_col=args.image_col,
            caption_col=args.caption_col,
            delimiter=args.delimiter,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            progress=not args.json,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"vlkit data from-csv: error: {e}", file=sys.stderr)
        return 2
    _report(summary, args.json)
    return 0
